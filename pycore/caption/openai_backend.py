"""Captions from any OpenAI-compatible chat-completions server (GPT-4o, vLLM, llama.cpp, Ollama).

Images go as base64 JPEG data URLs; the reply is constrained with ``response_format`` json_schema
(strict) and validated again here with the pydantic model. Requests run concurrently on one
asyncio loop (image encoding in a thread pool); 408/409/429/5xx, time-outs, dropped connections,
refusals and invalid or schema-violating replies are retried with exponential backoff and jitter
(``retry-after-ms`` / ``retry-after`` honoured), up to ``max_attempts``; then the image is
recorded as failed with the reason. A failure is never a caption. 401/403/404 stop the run
(wrong key, model or URL would fail every image).

The API key is passed in by the caller (read from an environment variable by the CLI); it is
only ever put in the Authorization header, and scrubbed from any server message we keep.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pycore.caption.schema import QUALITY_WORDS, response_format
from pycore.errors import HwError

DEFAULT_PROMPT = (
    "Caption this image for training a text-to-image model. Return JSON with: "
    "summary — one sentence describing the whole image (subject, medium, setting, action); "
    "elements — 4 to 10 short tags for visual elements: style and technique, composition and "
    "framing, colour palette, lighting, notable details of subjects, hair, clothing, expression, pose; "
    "inspired_by — the artist, photographer or art movement the image is most reminiscent of "
    "(just the name or movement), or null if none fits; "
    f"quality — the aesthetic quality, exactly one of: {', '.join(QUALITY_WORDS)}. "
    "Describe only what is visible. No text outside the JSON."
)
SYSTEM_PROMPT = "You are a precise image captioner. You reply only with JSON that matches the given schema."

RETRY_STATUSES = frozenset({408, 409, 429})
FATAL_STATUSES = {401: "authentication failed", 403: "permission denied", 404: "not found (check --base-url and --model)"}


@dataclass
class OpenAIConfig:
    """Options of the OpenAI-compatible backend (see `hw caption --help`)."""

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o"
    concurrency: int = 8
    max_attempts: int = 6
    timeout: float = 60.0
    backoff_base: float = 0.5
    backoff_max: float = 8.0
    max_retry_wait: float = 120.0
    max_side: int = 768
    detail: str = "low"
    temperature: float | None = 0.2
    max_tokens: int = 400
    prompt: str = DEFAULT_PROMPT
    jpeg_quality: int = 90
    encode_threads: int = 0

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise HwError(f"--base-url must start with http:// or https:// (got {self.base_url!r})")
        self.base_url = self.base_url.rstrip("/")
        if not self.model.strip():
            raise HwError("--model is empty")
        if self.concurrency < 1 or self.concurrency > 1024:
            raise HwError(f"--concurrency must be 1–1024 (got {self.concurrency})")
        if self.max_attempts < 1:
            raise HwError(f"--max-attempts must be at least 1 (got {self.max_attempts})")
        if self.timeout <= 0:
            raise HwError(f"--timeout must be positive (got {self.timeout})")
        if self.backoff_base < 0 or self.backoff_max < self.backoff_base:
            raise HwError("backoff must satisfy 0 ≤ base ≤ max")
        if self.max_side < 0:
            raise HwError(f"--max-side must be ≥ 0 (got {self.max_side})")
        if self.detail not in ("low", "high", "auto"):
            raise HwError(f"--detail must be low, high or auto (got {self.detail!r})")
        if self.temperature is not None and not 0 <= self.temperature <= 2:
            raise HwError(f"--temperature must be within 0–2 (got {self.temperature})")
        if self.max_tokens < 16:
            raise HwError(f"--max-tokens must be at least 16 (got {self.max_tokens})")
        if not self.prompt.strip():
            raise HwError("the prompt is empty")
        if not 1 <= self.jpeg_quality <= 100:
            raise HwError(f"JPEG quality must be 1–100 (got {self.jpeg_quality})")

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def job_options(self) -> dict[str, Any]:
        """What decides a reply (the job fingerprint): the model and what it is sent — not the
        server's address (a restarted local server keeps its results), concurrency, retries or time-outs."""
        return {"backend": "openai", "model": self.model, "prompt": self.prompt,
                "max_side": self.max_side, "detail": self.detail, "temperature": self.temperature,
                "max_tokens": self.max_tokens, "jpeg_quality": self.jpeg_quality, "schema": 1}  # fmt: skip


def request_body(cfg: OpenAIConfig, data_url: str) -> dict[str, Any]:
    """The chat-completions request for one image (also the Batch API line's body)."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": cfg.prompt},
                    {"type": "image_url", "image_url": {"url": data_url, "detail": cfg.detail}},
                ],
            },
        ],
        "response_format": response_format(),
        "max_tokens": cfg.max_tokens,
    }
    if cfg.temperature is not None:
        body["temperature"] = cfg.temperature
    return body


# ------------------------------------------------------------------------------------------
# Replies


class ReplyError(Exception):
    """A 200 reply that is not a usable caption (retryable)."""


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def parse_reply(payload: Any) -> tuple[dict[str, Any], dict[str, int]]:
    """(caption dict, usage) from a chat-completions response body; :class:`ReplyError` if unusable."""
    from pydantic import ValidationError

    from pycore.caption.schema import Caption

    usage = _usage(payload)
    if not isinstance(payload, dict) or not isinstance(payload.get("choices"), list) or not payload["choices"]:
        raise ReplyError("malformed reply: no choices")
    choice = payload["choices"][0]
    msg = choice.get("message") if isinstance(choice, dict) else None
    if not isinstance(msg, dict):
        raise ReplyError("malformed reply: no message")
    if msg.get("refusal"):
        raise ReplyError(f"refused: {_one_line(msg['refusal'], 160)}")
    content = msg.get("content")
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        fr = choice.get("finish_reason")
        raise ReplyError(f"empty reply (finish_reason {fr})" if fr else "empty reply")
    try:
        data = json.loads(content)
    except json.JSONDecodeError as e:
        trunc = " (truncated: finish_reason length; raise --max-tokens)" if choice.get("finish_reason") == "length" else ""
        raise ReplyError(f"invalid JSON in reply{trunc}: {e.msg} at char {e.pos}") from None
    try:
        cap = Caption.model_validate(data)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'reply'}: {err['msg']}" for err in e.errors()[:3])
        raise ReplyError(f"reply does not match the schema: {_one_line(errs, 200)}") from None
    return cap.model_dump(), usage


def _usage(payload: Any) -> dict[str, int]:
    u = payload.get("usage") if isinstance(payload, dict) else None
    if not isinstance(u, dict):
        return {}
    return {k: int(u[k]) for k in ("prompt_tokens", "completion_tokens", "total_tokens") if isinstance(u.get(k), int | float)}


def retry_after_seconds(headers: Any) -> float | None:
    """The server's requested wait: ``retry-after-ms`` (milliseconds) or ``retry-after`` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            v = float(ms) / 1000.0
            if v >= 0:
                return v
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        v = float(ra)
        return v if v >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def backoff_seconds(cfg: OpenAIConfig, attempt: int, rng: random.Random) -> float:
    """Exponential backoff with jitter: base·2^(attempt-1), capped, times a factor in [0.5, 1]."""
    d = min(cfg.backoff_max, cfg.backoff_base * (2 ** (attempt - 1)))
    return d * (0.5 + 0.5 * rng.random())


def _server_message(resp: Any) -> str:
    try:
        j = resp.json()
        if isinstance(j, dict) and isinstance(j.get("error"), dict) and j["error"].get("message"):
            return _one_line(j["error"]["message"], 160)
        if isinstance(j, dict) and isinstance(j.get("error"), str):
            return _one_line(j["error"], 160)
    except (ValueError, UnicodeDecodeError):
        pass
    return ""


# ------------------------------------------------------------------------------------------
# The run
#
# Outcomes of one image: "ok" (a caption) and "failed" (an answer about this image: refused,
# invalid image, replies that never matched the schema, HTTP 4xx, 429/5xx until the attempts
# ran out) are stored; "pending" (no HTTP response at all: connection refused or reset, DNS
# failure, time-outs) is a transport failure — it says nothing about the image, so it is never
# stored and the next run asks again. A server that cannot be reached stops the run at once.

#: Consecutive transport failures (no HTTP response in between) that stop a run as "unreachable",
#: per request slot; at least :data:`MIN_UNREACHABLE_STREAK`.
UNREACHABLE_PER_SLOT = 2
MIN_UNREACHABLE_STREAK = 4
#: Seconds to wait for a TCP/TLS connection (at most --timeout): a server that does not accept
#: one in this time before it ever answered is unreachable (a wrong address, a firewall).
CONNECT_TIMEOUT = 10.0


@dataclass
class RunStats:
    requests: int = 0
    retries: int = 0
    done: int = 0
    failed: int = 0
    pending: int = 0
    http: Counter = field(default_factory=Counter)
    usage: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "retries": self.retries, "done": self.done, "failed": self.failed,
                "not_answered": self.pending,
                "http_status": {str(k): v for k, v in sorted(self.http.items(), key=lambda kv: str(kv[0]))},
                "usage": dict(self.usage), "seconds": round(self.seconds, 3)}  # fmt: skip


class FatalApiError(HwError):
    """An error that would fail every request (bad key, unknown model or URL, unreachable server)."""


@dataclass
class _Try:
    """One attempt's result: done (ok or an answer that is final), or retry after ``wait``."""

    status: str  # ok | failed | retry | transport
    caption: dict[str, Any] | None = None
    reason: str = ""
    wait: float | None = None


def public_url(url: str) -> str:
    """The URL without user:password@ or a query string (either could hold a credential)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _transport_reason(e: BaseException) -> str:
    """'connection refused', 'name or service not known', … from an httpx transport error."""
    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
            return os.strerror(cause.errno).lower()  # "connection refused", not asyncio's "connect call failed"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()  # DNS: "name or service not known"
        cause = cause.__cause__ or cause.__context__
    text = " ".join(str(e).split())
    return text[:120] if text else type(e).__name__


class OpenAICaptioner:
    """Caption items ``(key, path)`` concurrently; every outcome goes to ``on_record``.

    Records have status ok or failed (store them) or pending (a transport failure: do not store).
    """

    def __init__(self, cfg: OpenAIConfig, api_key: str | None, *, job: str, seed: int | None = None):
        self.cfg = cfg
        self._key = api_key or None
        self.job = job
        self.stats = RunStats()
        self._rng = random.Random(seed)
        self._fatal: str | None = None
        self._template: str | None = None
        self._responses = 0  # HTTP responses received (any status)
        self._streak = 0  # transport failures since the last HTTP response
        self._streak_limit = max(MIN_UNREACHABLE_STREAK, UNREACHABLE_PER_SLOT * cfg.concurrency)

    _MARK = "HW-IMAGE-DATA-URL-7f3a9c"

    def _body(self, data_url: str) -> bytes:
        """The request JSON; the (large, escape-free) data URL is spliced into a cached template."""
        if self._template is None:
            self._template = json.dumps(request_body(self.cfg, self._MARK))
        if self._template.count(self._MARK) != 1 or not data_url.startswith("data:image/jpeg;base64,"):
            return json.dumps(request_body(self.cfg, data_url)).encode("utf-8")
        return self._template.replace(self._MARK, data_url).encode("utf-8")

    def _scrub(self, text: str) -> str:
        if self._key and self._key in text:
            text = text.replace(self._key, "***")
        return text

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "User-Agent": "hw-caption"}
        if self._key:
            h["Authorization"] = f"Bearer {self._key}"
        return h

    def _transport_failure(self, reason: str, *, refused: str | None = None) -> _Try:
        """Count a request that got no HTTP response; stop the run when the server looks unreachable
        (``refused``: why a connection could not be made — fatal before the server ever answered)."""
        self._streak += 1
        where = public_url(self.cfg.base_url)
        if refused is not None and self._responses == 0:
            self._fatal = f"cannot reach the caption server {where}: {refused}"
        elif self._streak >= self._streak_limit:
            self._fatal = (f"the caption server {where} stopped answering ({self._streak} requests in a row "
                           f"without a response, last: {reason})")  # fmt: skip
        return _Try("transport", reason=reason)

    def _answer(self, resp: Any) -> _Try:
        """Classify an HTTP response."""
        status = resp.status_code
        self.stats.http[status] += 1
        self._responses += 1
        self._streak = 0
        if status == 200:
            try:
                payload = json.loads(resp.content)
            except (json.JSONDecodeError, UnicodeDecodeError):
                return _Try("retry", reason="invalid JSON response body")
            for k, v in _usage(payload).items():
                self.stats.usage[k] += v
            try:
                caption, _ = parse_reply(payload)
            except ReplyError as e:
                return _Try("retry", reason=self._scrub(str(e)))
            return _Try("ok", caption=caption)
        msg = self._scrub(_server_message(resp))
        if status in FATAL_STATUSES:
            self._fatal = f"HTTP {status} {FATAL_STATUSES[status]}" + (f": {msg}" if msg else "")
            return _Try("failed", reason=self._fatal)
        if status in RETRY_STATUSES or status >= 500:
            wait = retry_after_seconds(resp.headers)
            return _Try("retry", reason=f"HTTP {status}" + (f" ({msg})" if msg else ""),
                        wait=None if wait is None else min(wait, self.cfg.max_retry_wait))  # fmt: skip
        return _Try("failed", reason=f"HTTP {status}" + (f": {msg}" if msg else ""))

    async def _attempt(self, client: Any, body: bytes) -> _Try:
        import httpx

        cfg = self.cfg
        self.stats.requests += 1
        try:
            async with asyncio.timeout(cfg.timeout):
                resp = await client.post(cfg.url, content=body, headers=self._headers())
        except httpx.ConnectTimeout:
            self.stats.http["connection"] += 1
            why = f"no connection within {min(cfg.timeout, CONNECT_TIMEOUT):g}s"
            return self._transport_failure(f"connection error (ConnectTimeout: {why})", refused=why)
        except (TimeoutError, httpx.TimeoutException):
            self.stats.http["timeout"] += 1
            return self._transport_failure(f"timed out ({cfg.timeout:g}s)")
        except httpx.TransportError as e:
            self.stats.http["connection"] += 1
            why = _transport_reason(e)
            refused = why if isinstance(e, httpx.ConnectError) else None
            return self._transport_failure(f"connection error ({type(e).__name__}: {why})", refused=refused)
        return self._answer(resp)

    async def request(self, client: Any, data_url: str) -> tuple[str, dict[str, Any] | None, str | None, int]:
        """One image through the retry loop → (status, caption, reason, attempts).

        status: "ok"; "failed" (the server's answer to the last attempt was not a caption: stored);
        "pending" (the last attempt got no HTTP response, or the run stopped: not this image's
        outcome, asked again next run).
        """
        cfg = self.cfg
        body = self._body(data_url)
        last = _Try("transport", reason="no attempt made")
        attempt = 0
        for attempt in range(1, cfg.max_attempts + 1):
            if self._fatal:
                return "pending", None, f"run stopped: {self._fatal}", attempt - 1
            last = await self._attempt(client, body)
            if last.status == "ok":
                return "ok", last.caption, None, attempt
            if last.status == "failed":
                return ("pending" if self._fatal else "failed"), None, last.reason, attempt
            if self._fatal:
                break
            if attempt < cfg.max_attempts:
                self.stats.retries += 1
                await asyncio.sleep(last.wait if last.wait is not None else backoff_seconds(cfg, attempt, self._rng))
        reason = f"{last.reason} after {attempt} attempt{'s' if attempt != 1 else ''}"
        return ("pending" if last.status == "transport" or self._fatal else "failed"), None, reason, attempt

    async def _produce(self, items: Sequence[tuple[str, str]], ready: asyncio.Queue, n_enc: int, n_workers: int, enc_pool) -> None:
        """Encode images in the pool and queue them; then one None per worker."""
        from pycore.caption.images import ImageLoadError, data_url

        loop = asyncio.get_running_loop()
        cfg = self.cfg
        slots = asyncio.Semaphore(n_enc)

        async def encode(key: str, path: str) -> None:
            try:
                url = await loop.run_in_executor(enc_pool, data_url, path, cfg.max_side, cfg.jpeg_quality)
                await ready.put((key, url, None))
            except ImageLoadError as e:
                await ready.put((key, None, str(e)))
            finally:
                slots.release()

        tasks: set[asyncio.Task] = set()
        try:
            for key, path in items:
                if self._fatal:
                    break
                await slots.acquire()
                t = asyncio.create_task(encode(key, path))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for t in list(tasks):
                t.cancel()
        for _ in range(n_workers):  # tell every worker there is no more work
            await ready.put(None)

    async def _next(self, ready: asyncio.Queue, producer: asyncio.Task) -> Any:
        """The next queued item; None when there is no more (or the producer failed)."""
        getter = asyncio.ensure_future(ready.get())
        await asyncio.wait({getter, producer}, return_when=asyncio.FIRST_COMPLETED)
        if getter.done():
            return getter.result()
        getter.cancel()
        if producer.exception() is not None:
            return None
        return await ready.get()

    async def _record(self, client: Any, key: str, url: str | None, load_error: str | None) -> dict[str, Any]:
        from pycore.caption.store import failed_record, ok_record, pending_record

        extra = {"model": self.cfg.model}
        if url is None:
            return failed_record(key, self.job, load_error or "cannot read image", attempts=0, **extra)
        status, caption, error, attempts = await self.request(client, url)
        if status == "ok":
            return ok_record(key, self.job, caption, attempts=attempts, **extra)
        if status == "failed":
            return failed_record(key, self.job, error or "failed", attempts=attempts, **extra)
        return pending_record(key, self.job, error or "no response", attempts=attempts, **extra)

    async def _worker(self, client: Any, ready: asyncio.Queue, producer: asyncio.Task, on_record, write_pool) -> None:
        loop = asyncio.get_running_loop()
        while not self._fatal:
            item = await self._next(ready, producer)
            if item is None:
                return
            rec = await self._record(client, *item)
            if self._fatal and rec["status"] != "ok":
                return  # a key/model/URL/network problem is not this image's failure: left for the next run
            await loop.run_in_executor(write_pool, on_record, rec)
            if rec["status"] == "ok":
                self.stats.done += 1
            elif rec["status"] == "failed":
                self.stats.failed += 1
            else:
                self.stats.pending += 1

    async def _run(self, items: Sequence[tuple[str, str]], on_record: Callable[[dict[str, Any]], None]) -> None:
        import httpx

        cfg = self.cfg
        n_enc = cfg.encode_threads or min(cfg.concurrency, os.cpu_count() or 1)
        n_workers = min(cfg.concurrency, max(1, len(items)))
        enc_pool = ThreadPoolExecutor(max_workers=n_enc, thread_name_prefix="hw-encode")
        write_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hw-store")
        # Encoded images wait here for a free request slot: encoding overlaps the requests in
        # flight, and at most concurrency + encoder threads images are held in memory.
        ready: asyncio.Queue[tuple[str, str | None, str | None] | None] = asyncio.Queue(maxsize=cfg.concurrency + n_enc)
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        t0 = time.perf_counter()
        producer = asyncio.create_task(self._produce(items, ready, n_enc, n_workers, enc_pool))
        try:
            async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(cfg.timeout + 5.0, connect=min(cfg.timeout, CONNECT_TIMEOUT))) as client:
                await asyncio.gather(*(self._worker(client, ready, producer, on_record, write_pool) for _ in range(n_workers)))
            if producer.done() and producer.exception() is not None:
                raise producer.exception()  # type: ignore[misc]
        finally:
            producer.cancel()
            try:
                await producer
            except asyncio.CancelledError:
                pass
            enc_pool.shutdown(wait=False, cancel_futures=True)
            write_pool.shutdown(wait=True)
            self.stats.seconds = time.perf_counter() - t0
        if self._fatal:
            raise FatalApiError(f"{self._fatal} — stopped; finished results are saved, re-run to resume")

    def run(self, items: Sequence[tuple[str, str]], on_record: Callable[[dict[str, Any]], None]) -> RunStats:
        """Caption every item; blocks until done. Raises :class:`FatalApiError` on 401/403/404 and
        when the server cannot be reached."""
        asyncio.run(self._run(items, on_record))
        return self.stats
