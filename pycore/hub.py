"""Model names as users give them: a local file or folder, or a Hugging Face hub repository.

One place decides whether a name is local, maps hub errors to one-line messages (offline and not
cached, no such repository, no such file, network down), and names the file suffixes that are
pickles (never unpickled unless the user says so, and then only with ``weights_only=True``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from pycore.errors import HwError, first_line

#: Suffixes of pickled checkpoints.
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
#: Suffixes of single-file weights hw reads without unpickling.
SAFE_SUFFIXES = (".safetensors",)


class ModelNotFound(HwError):
    """A model name that is neither an existing local path nor a reachable hub repository."""


def offline(local_files_only: bool | None = None) -> bool:
    """Whether hub downloads are off: an explicit flag, else $HF_HUB_OFFLINE, else whether the hub's
    host name does not resolve (no network: huggingface_hub would retry for ~25 s per file)."""
    if local_files_only is not None:
        return local_files_only
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no"):
        return True
    return not hub_resolvable()


@functools.cache
def hub_resolvable() -> bool:
    """Whether the hub endpoint's host name resolves (once per process). Behind a proxy the proxy
    resolves names, so the answer is yes without asking."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return False
    return True


def looks_local(name: str) -> bool:
    """A name that can only mean a local path, so a missing one is 'not found' at once rather
    than a hub lookup: absolute, ``./``/``../``/``~``, a Windows path, more than one ``/``
    (hub ids are ``owner/repo``), ``dir/name`` where ``dir`` is an existing local folder (a typo
    of a local path), or a single name or ``dir/file`` ending in a weights suffix."""
    p = Path(name)
    if p.is_absolute() or name.startswith((".", "~")) or "\\" in name:
        return True
    if "/" in name and p.parent.is_dir():
        return True
    if p.suffix.lower() in SAFE_SUFFIXES + PICKLE_SUFFIXES:
        return name.count("/") < 2  # owner/repo/file.safetensors is a file inside a hub repo
    return name.count("/") > 1


def check_local(name: str, what: str = "model") -> Path | None:
    """The local path ``name`` names, if it exists; an error at once if it can only be local and is
    missing; None when it should be looked up on the hub."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    if looks_local(name):
        parent = p.parent
        hint = "" if parent.is_dir() or str(parent) in ("", ".") else f" (folder {parent} does not exist either)"
        raise ModelNotFound(f"{what} {name}: no such file or folder{hint}")
    return None


def how_to_download(repo: str) -> str:
    return f"run `hf download {repo}` (or `huggingface-cli download {repo}`) on a machine with internet, or pass a local path"


def hub_error(e: BaseException, repo: str, what: str = "model", filename: str | None = None) -> HwError:
    """One-line error for a failed hub lookup of ``repo`` (``filename`` inside it, if any)."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    item = f"{repo}/{filename}" if filename else repo
    # LocalEntryNotFoundError subclasses EntryNotFoundError in recent huggingface_hub: test it first.
    if isinstance(e, LocalEntryNotFoundError | OfflineModeIsEnabled) or (offline() and not isinstance(e, EntryNotFoundError)):
        return ModelNotFound(f"{what} {item}: not a local path, and not in the Hugging Face cache while hub access is off "
                             f"(offline or HF_HUB_OFFLINE); {how_to_download(repo)}")  # fmt: skip
    if isinstance(e, GatedRepoError):
        return ModelNotFound(f"{what} {repo} is gated: accept its licence on the hub and log in with `hf auth login`")
    if isinstance(e, RepositoryNotFoundError):
        return ModelNotFound(f"{what} {repo}: not a local path, and no such repository on the Hugging Face hub "
                             "(or it is private: log in with `hf auth login`)")  # fmt: skip
    if isinstance(e, RevisionNotFoundError):
        return ModelNotFound(f"{what} {repo}: no such revision on the hub")
    if isinstance(e, EntryNotFoundError):
        return ModelNotFound(f"{what} {repo} has no file {filename}" if filename else f"{what} {repo}: file not found")
    text = first_line(e)
    if any(k in text.lower() for k in ("connect", "resolve", "timed out", "timeout", "network", "offline")):
        return ModelNotFound(f"{what} {item}: cannot reach the Hugging Face hub ({text}); {how_to_download(repo)}")
    return HwError(f"{what} {item}: {text}")


def hub_file(repo: str, filename: str, *, what: str = "model", local_files_only: bool | None = None,
             missing_ok: bool = False) -> Path | None:  # fmt: skip
    """A file of a hub repository, from the cache or downloaded; None when ``missing_ok`` and the
    repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo, filename, local_files_only=offline(local_files_only)))
    except Exception as e:
        if missing_ok and isinstance(e, EntryNotFoundError) and not isinstance(e, LocalEntryNotFoundError):
            return None
        raise hub_error(e, repo, what, filename) from None
