"""A real OpenAI-compatible chat-completions server on 127.0.0.1 for tests and the benchmark.

It speaks POST /v1/chat/completions, checks the request the way a strict server would (model,
an image_url data URL, response_format json_schema strict) and replies with a structured caption
derived from the request: the image's id is a hash of the image bytes sent, and the caption names
it. A *fault plan* decides per (image id, attempt number) what happens instead:

    ok, 429 (retry-after), 429ms (retry-after-ms), 500, 503, stall (sleep past the client's
    time-out), malformed (invalid JSON body), badjson (message content not JSON), badschema
    (JSON missing fields / wrong quality word), refusal, 400, 401

Every request is logged (image id, attempt, action) so tests can check that no image was
captioned twice and no finished request was repeated.

Run standalone (the benchmark and the demo do): python -m tests.kit.fake_openai (or python tests/kit/fake_openai.py) --latency 0.05 --fault-rate 0.05
prints ``PORT <n>`` and serves until killed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

QUALITY = ("worst quality", "low quality", "average quality", "best quality", "masterpiece")
ACTIONS = ("ok", "429", "429ms", "500", "503", "stall", "malformed", "badjson", "badschema", "refusal", "400", "401")

FaultPlan = Callable[[str, int], str]


def always_ok(image_id: str, attempt: int) -> str:
    return "ok"


def random_faults(rate: float, seed: int = 0, kinds: tuple[str, ...] = ("429", "429ms", "500", "503", "malformed", "badschema", "refusal")) -> FaultPlan:
    """A deterministic plan: each (image, attempt) fails with probability ``rate`` (hash-based)."""

    def plan(image_id: str, attempt: int) -> str:
        h = hashlib.blake2b(f"{seed}:{image_id}:{attempt}".encode(), digest_size=8).digest()
        u = int.from_bytes(h[:4], "big") / 2**32
        if u >= rate:
            return "ok"
        return kinds[int.from_bytes(h[4:], "big") % len(kinds)]

    return plan


def image_id_of(data_url: str) -> str:
    """The id the server gives an image: blake2b of the base64 payload of its data URL."""
    payload = data_url.split(",", 1)[1] if "," in data_url else data_url
    return hashlib.blake2b(payload.encode("ascii"), digest_size=6).hexdigest()


def caption_for(image_id: str) -> dict:
    n = int(image_id, 16)
    return {
        "summary": f"a test image number {image_id} on a plain background",
        "elements": ["flat colour", "studio lighting", f"tag {image_id[:4]}"],
        "inspired_by": None if n % 3 == 0 else "mark rothko",
        "quality": QUALITY[n % 5],
    }


class FakeOpenAI:
    def __init__(self, plan: FaultPlan = always_ok, *, latency: float = 0.0, stall: float = 3.0, api_key: str | None = None):
        self.plan = plan
        self.latency = latency
        self.stall = stall
        self.api_key = api_key
        self.lock = threading.Lock()
        self.log: list[tuple[str, int, str]] = []
        self.attempts: Counter = Counter()
        self.served_ok: Counter = Counter()
        self.auth: Counter = Counter()
        self.bad_requests: list[str] = []
        self.httpd: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, port: int = 0) -> str:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # as real servers do; else delayed ACKs add ~40 ms a request

            def log_message(self, *a):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                server.handle(self, raw)

            def _send(self, code, obj=None, body=None, headers=None):
                data = body if body is not None else json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.Handler = Handler
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        return self.base_url

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- protocol --------------------------------------------------------------------------
    def _check(self, req) -> tuple[str | None, str | None]:
        """(error, data URL) — the checks a strict OpenAI-compatible server makes."""
        if not isinstance(req, dict) or not req.get("model"):
            return "model is required", None
        rf = req.get("response_format") or {}
        js = rf.get("json_schema") or {}
        if rf.get("type") != "json_schema" or js.get("strict") is not True or not js.get("name"):
            return "response_format must be a strict json_schema", None
        schema = js.get("schema") or {}
        if schema.get("additionalProperties") is not False or set(schema.get("required", [])) != set(schema.get("properties", {})):
            return "strict schemas need every property required and additionalProperties false", None
        url = None
        for m in req.get("messages") or []:
            content = m.get("content")
            if isinstance(content, list):
                for part in content:
                    if part.get("type") == "image_url":
                        url = (part.get("image_url") or {}).get("url")
        if not url or not url.startswith("data:image/jpeg;base64,"):
            return "expected an image_url with a base64 JPEG data URL", None
        try:
            base64.b64decode(url.split(",", 1)[1], validate=True)
        except ValueError:
            return "image_url is not valid base64", None
        return None, url

    def handle(self, h, raw: bytes) -> None:
        auth = h.headers.get("Authorization") or ""
        try:
            req = json.loads(raw)
        except json.JSONDecodeError:
            return h._send(400, {"error": {"message": "request body is not JSON"}})
        err, url = self._check(req)
        if err:
            with self.lock:
                self.bad_requests.append(err)
            return h._send(400, {"error": {"message": err}})
        iid = image_id_of(url)
        with self.lock:
            self.auth[auth] += 1
            self.attempts[iid] += 1
            attempt = self.attempts[iid]
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            action = "401"
        else:
            action = self.plan(iid, attempt)
        with self.lock:
            self.log.append((iid, attempt, action))
        if self.latency:
            time.sleep(self.latency)
        model = req["model"]
        if action == "ok":
            with self.lock:
                self.served_ok[iid] += 1
            return h._send(200, _completion(model, json.dumps(caption_for(iid))))
        if action == "429":
            return h._send(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, headers={"retry-after": "0.05"})
        if action == "429ms":
            return h._send(429, {"error": {"message": "Rate limit reached"}}, headers={"retry-after-ms": "30"})
        if action in ("500", "503"):
            return h._send(int(action), {"error": {"message": "The server had an error while processing your request"}})
        if action == "stall":
            time.sleep(self.stall)
            return h._send(200, _completion(model, json.dumps(caption_for(iid))))
        if action == "malformed":
            return h._send(200, body=b'{"id": "x", "choices": [{"message": {"content": "{\\"summ')
        if action == "badjson":
            return h._send(200, _completion(model, "Sure! Here is a caption: a red square."))
        if action == "badschema":
            bad = caption_for(iid)
            bad.pop("summary")
            bad["quality"] = "great quality"
            return h._send(200, _completion(model, json.dumps(bad)))
        if action == "refusal":
            return h._send(200, _completion(model, None, refusal="I'm sorry, I can't help with that request."))
        if action == "400":
            return h._send(400, {"error": {"message": "Invalid image"}})
        if action == "401":
            return h._send(401, {"error": {"message": "Incorrect API key provided"}})
        return h._send(500, {"error": {"message": f"unknown fault {action}"}})

    # -- views for assertions --------------------------------------------------------------
    def actions_for(self, iid: str) -> list[str]:
        with self.lock:
            return [a for i, _, a in self.log if i == iid]


def _completion(model: str, content: str | None, refusal: str | None = None) -> dict:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": refusal}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 40, "total_tokens": 160},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds added to every request")
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stall", type=float, default=3.0)
    ap.add_argument("--forever", action="store_true", help="serve until killed (default: until stdin closes)")
    a = ap.parse_args()
    plan = random_faults(a.fault_rate, a.seed) if a.fault_rate else always_ok
    srv = FakeOpenAI(plan, latency=a.latency, stall=a.stall)
    srv.start(a.port)
    print(f"PORT {srv.port}", flush=True)
    if a.forever:
        try:
            threading.Event().wait()
        finally:
            srv.stop()
    try:
        while True:
            line = sys.stdin.readline()
            if not line:  # parent closed stdin: exit
                break
            if line.strip() == "stats":
                with srv.lock:
                    acts = Counter(a for _, _, a in srv.log)
                    print(json.dumps({"requests": len(srv.log), "actions": acts, "served_ok": len(srv.served_ok),
                                      "served_twice": sum(1 for v in srv.served_ok.values() if v > 1)}), flush=True)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
