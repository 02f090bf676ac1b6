"""Content hashes of files, streamed in 1 MiB blocks (checkpoint manifests, data sets, tokenizers, weights)."""

from __future__ import annotations

import hashlib
import os


def sha256_file(path: str | os.PathLike, h: hashlib._Hash | None = None) -> str:
    """Hex sha256 of a file's bytes; with `h`, feed the bytes into that running hash and return its digest."""
    h = h if h is not None else hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
