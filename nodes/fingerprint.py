"""The identity of a VAE file: the same sha256 the trainer's latent cache uses (`vae_fingerprint`
in trainer/text_data.py), so a generator can record which VAE its training latents came from.

sha256 over {config, latent_stats, kind, the tensor header entries} (as sorted JSON) followed by
every byte of the tensor data. Provenance and dates are left out: re-saving the same weights keeps
the fingerprint, any weight, config or stats change alters it (so does a re-export in another
dtype). Memoised per (path, size, mtime), so a file is hashed once per ComfyUI process.

Standard library only and no package-relative imports: the test harness loads this file on its own
to write tiny generator files that record a VAE, and a test checks it against the trainer's.
(Both copies should move into psvae_core.checkpoint; see docs/COMFYUI_PACK.md.)
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading

_MEMO: dict[tuple, str] = {}
_LOCK = threading.Lock()


def _header(f) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", f.read(8))
    return n, json.loads(f.read(n).decode("utf-8"))


def vae_fingerprint(path) -> str:
    path = os.fspath(path)
    st = os.stat(path)
    memo = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if memo in _MEMO:
            return _MEMO[memo]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n, header = _header(f)
        meta = header.get("__metadata__", {})
        described = {"config": meta.get("config"), "latent_stats": meta.get("latent_stats"), "kind": meta.get("kind"),
                     "tensors": {k: v for k, v in sorted(header.items()) if k != "__metadata__"}}
        h.update(json.dumps(described, sort_keys=True).encode())
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _LOCK:
        _MEMO[memo] = digest
    return digest
