"""One self-contained `.safetensors` file per component (VAE, generator, ...).

A file carries its tensors plus flat string metadata: format and version, component kind, the full
config as JSON, latent stats, provenance and the SAI ModelSpec keys other tools display. Loading
checks the raw header ourselves before safetensors sees the file, so every problem (missing,
pickle in disguise, truncated download, wrong kind, too new) ends as one `CheckpointError` that
says what is wrong and what to do. Nothing here ever unpickles.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import stat
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .provenance import package_version

FORMAT = "psvae"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; a larger length means "not safetensors"
# 4x the largest model here (the 1.7B generator in float32 is 6.8 GB): bounds what loading and
# `fingerprint` read, so a huge (e.g. sparse) file is refused at once instead of read for minutes.
MAX_FILE_BYTES = 32 << 30
_SHOW = 5  # how many keys of each problem an error message lists

RESERVED_KEYS = frozenset({
    "format", "format_version", "kind", "config", "latent_stats", "provenance",
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation",
    "modelspec.title", "modelspec.date",
})

# Leading bytes of files users rename to .safetensors; only used to explain a failed header.
_FOREIGN_MAGIC = (
    (b"PK\x03\x04", "a zip archive, i.e. a PyTorch .pt/.ckpt written by torch.save, which holds a pickle"),
    (b"\x80\x02", "a Python pickle (e.g. a legacy torch.save .pt/.ckpt)"),
    (b"\x80\x03", "a Python pickle (e.g. a legacy torch.save .pt/.ckpt)"),
    (b"\x80\x04", "a Python pickle"),
    (b"\x80\x05", "a Python pickle"),
    (b"GGUF", "a GGUF file"),
)


class CheckpointError(ValueError):
    """Any problem with a checkpoint file; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class Component:
    kind: str
    format_version: int
    config: dict
    tensors: dict
    latent_stats: Optional[dict]
    provenance: dict
    metadata: dict
    shapes: dict  # tensor name -> shape, from the header


def _fail(path, problem: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; {fix}")


# ----------------------------------------------------------------------------------------- save

def _core_version() -> str:
    try:  # resolved at call time: psvae_core/__init__ may import this module
        from . import __version__
        return str(__version__)
    except ImportError:
        pass
    try:
        from importlib.metadata import version
        return version("ps-vae")
    except Exception:
        return "unknown"


def _to_json(value: Any, what: str, path) -> str:
    # Tensors (e.g. latent-stat buffers) become lists; NaN/inf are refused since JSON has no such values.
    def default(obj):
        if isinstance(obj, torch.Tensor):
            return obj.detach().cpu().tolist()
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False, default=default)
    except (TypeError, ValueError) as e:
        raise _fail(path, f"{what} cannot be stored as JSON ({e})",
                    "pass plain dicts/lists/str/int/finite floats") from None


def _prepare_tensors(tensors: dict, path) -> dict[str, torch.Tensor]:
    if not isinstance(tensors, dict):
        raise _fail(path, f"tensors must be a dict of name -> torch.Tensor, got {type(tensors).__name__}",
                    "pass e.g. module.state_dict()")
    out, seen = {}, set()
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise _fail(path, f"entry {name!r} is {type(t).__name__}, not a torch.Tensor under a str name",
                        "store only tensors; put other values in config/provenance/extra_metadata")
        if t.is_meta:
            raise _fail(path, f"tensor {name!r} is on the meta device and has no data",
                        "materialise the model's weights before saving")
        t = t.detach().cpu().contiguous()
        # safetensors refuses tensors sharing storage (tied weights, views): give each its own copy.
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        elif t.numel():
            seen.add(ptr)
        out[name] = t
    return out


def save_component(path, *, kind: str, config: dict, tensors: dict,
                   latent_stats: Optional[dict] = None, provenance: Optional[dict] = None,
                   extra_metadata: Optional[dict] = None) -> None:
    """Write one component atomically: a crash never leaves a half file under `path`."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise _fail(path, f"a component file must end in {SUFFIX}", f"choose a name like {path.stem}{SUFFIX}")
    if not isinstance(kind, str) or not kind:
        raise _fail(path, f"kind must be a non-empty str, got {kind!r}", 'pass e.g. kind="vae"')
    if not isinstance(config, dict):
        raise _fail(path, f"config must be a dict, got {type(config).__name__}", "pass cfg.to_dict()")
    extra = dict(extra_metadata or {})
    clash = sorted(k for k in extra if k in RESERVED_KEYS)
    if clash:
        raise _fail(path, f"extra_metadata uses reserved key(s) {clash}", "rename them, e.g. with a 'psvae.' prefix")
    bad = [k for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise _fail(path, f"extra_metadata must map str -> str; offending key(s) {bad[:_SHOW]}",
                    "JSON-encode nested values")
    prepared = _prepare_tensors(tensors, path)

    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # The transformers version: a tensor-name mismatch can then say which version wrote the file.
    prov = {**(provenance or {}), "created": created, "psvae_core": _core_version(),
            "transformers": package_version("transformers")}
    metadata = {
        **extra,
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": _to_json(config, "config", path),
        "latent_stats": _to_json(latent_stats, "latent_stats", path),
        "provenance": _to_json(prov, "provenance", path),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"ps-vae/{kind}",
        "modelspec.implementation": "psvae_core",
        "modelspec.title": path.stem,
        "modelspec.date": created,
    }

    # Same folder so os.replace is an atomic rename; a non-.safetensors name keeps loaders from listing it.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        mode = tmp.stat().st_mode & 0o777  # 0o666 minus the umask, read without touching the process umask
        save_file(prepared, tmp, metadata=metadata)
        os.chmod(tmp, mode)  # safetensors may write a private (0o600) file
        fd = os.open(tmp, os.O_RDWR)  # Windows fsync needs a writable handle
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise _fail(path, f"writing failed ({type(e).__name__}: {e})",
                        "check free disk space and write permission; the previous file, if any, is untouched") from e
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Best-effort fsync of a file or folder (a folder: makes a rename in it durable on POSIX);
    anything that cannot be opened read-only this way (a folder on Windows) is passed over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------------------- read

def _foreign_kind(lead: bytes) -> Optional[str]:
    # Every safetensors header starts with "{" at byte 8, so a real (even truncated) one never matches.
    if lead[8:9] == b"{":
        return None
    return next((what for magic, what in _FOREIGN_MAGIC if lead.startswith(magic)), None)


def _incomplete(path, have: int, need: str) -> CheckpointError:
    return _fail(path, f"the file is incomplete ({have} of {need} bytes)", "re-download or re-export it")


def _stat_file(path: Path) -> os.stat_result:
    """The stat of a regular file, or a CheckpointError that says what `path` is instead."""
    try:
        st = path.stat()
    except FileNotFoundError:
        folder = path.parent.resolve()
        where = f"searched in {folder}" if folder.is_dir() else f"the folder {folder} does not exist"
        raise _fail(path, f"file not found ({where})", "check the name and folder, or download/export the file there") from None
    except OSError as e:  # ELOOP (a symlink loop), EACCES, ENAMETOOLONG, ...
        raise _fail(path, f"the file cannot be opened ({e.strerror or e})",
                    "check the path, its symbolic links and permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise _fail(path, "this is a folder, not a file", f"pick a {SUFFIX} file inside it")
    if not stat.S_ISREG(st.st_mode):
        what = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise _fail(path, f"this is {what}, not a regular file", f"pick a {SUFFIX} file")
    return st


def read_header(path) -> dict:
    """The parsed safetensors header (tensor entries + "__metadata__"), validated against the file size."""
    path = Path(path)
    st = _stat_file(path)
    size = st.st_size
    if size > MAX_FILE_BYTES:
        raise _fail(path, f"the file is {size / (1 << 30):.1f} GiB, more than any PS-VAE component "
                          f"({MAX_FILE_BYTES >> 30} GiB at most)", "pick the right file; this one is not a PS-VAE export")
    with open(path, "rb") as f:
        lead = f.read(9)
        what = _foreign_kind(lead)
        if what:
            raise _fail(path, f"this is not a safetensors file: it looks like {what}",
                        "this loader never unpickles (a pickle can run arbitrary code); "
                        "use a .safetensors export of the model")
        if len(lead) < 8:
            raise _incomplete(path, size, "at least 8")
        (n,) = struct.unpack("<Q", lead[:8])
        if n > MAX_HEADER_BYTES:
            raise _fail(path, f"this is not a safetensors file (its first 8 bytes give a header length of {n} bytes)",
                        f"pick a {SUFFIX} file exported by the PS-VAE trainer")
        if 8 + n > size:
            raise _incomplete(path, size, f"at least {8 + n}")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"the safetensors header is not valid JSON ({e})",
                    "the file is corrupt; re-download or re-export it") from None
    except RecursionError:
        raise _fail(path, "the safetensors header nests JSON too deeply to be a real header",
                    "the file is corrupt; re-download or re-export it") from None
    if not isinstance(header, dict):
        raise _fail(path, "the safetensors header is not a JSON object", "the file is corrupt; re-download or re-export it")

    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail(path, "the header's __metadata__ is not a str -> str mapping",
                    "the file is corrupt; re-download or re-export it")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            raise _fail(path, f"the header entry for tensor {name!r} is malformed",
                        "the file is corrupt; re-download or re-export it")
        end = max(end, offsets[1])
    expected = 8 + n + end
    if size < expected:
        raise _incomplete(path, size, str(expected))
    if size > expected:
        raise _fail(path, f"the file has {size - expected} unexpected bytes after its data ({size} instead of {expected})",
                    "the file is corrupt; re-download or re-export it")
    return header


def read_metadata(path) -> dict[str, str]:
    """The raw str -> str metadata; reads the header only, never the tensor data."""
    return dict(read_header(path).get("__metadata__", {}))


def _json_field(path, meta: dict, key: str):
    try:
        return json.loads(meta[key])
    except KeyError:
        raise _fail(path, f"the PS-VAE metadata has no {key!r} entry", "re-export the file with the PS-VAE trainer") from None
    except json.JSONDecodeError as e:
        raise _fail(path, f"the {key!r} metadata is not valid JSON ({e})",
                    "the file is corrupt or was edited by hand; re-export it with the PS-VAE trainer") from None
    except RecursionError:
        raise _fail(path, f"the {key!r} metadata nests JSON too deeply",
                    "the file is corrupt or was edited by hand; re-export it with the PS-VAE trainer") from None


def load_component(path, *, expected_kind: Optional[str] = None, device="cpu", read_tensors: bool = True) -> Component:
    """Validate and load one component file; every problem raises CheckpointError.
    read_tensors=False reads the header only (`tensors` is then None; see `build_checked`)."""
    path = Path(path)
    header = read_header(path)
    meta = dict(header.get("__metadata__", {}))
    shapes = {k: list(v.get("shape", [])) if isinstance(v.get("shape"), list) else [-1]
              for k, v in header.items() if k != "__metadata__"}
    if meta.get("format") != FORMAT:
        arch = meta.get("modelspec.architecture")
        hint = f" (its modelspec.architecture is {arch!r})" if arch else ""
        raise _fail(path, f"this is a safetensors file but not a PS-VAE file: it has no format={FORMAT!r} metadata{hint}",
                    "pick a file exported by the PS-VAE trainer")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise _fail(path, f"format_version {meta.get('format_version')!r} is not an integer",
                    "the file is corrupt; re-export it with the PS-VAE trainer") from None
    if version < 1:
        raise _fail(path, f"format_version {version} is not a valid version (versions start at 1)",
                    "the file is corrupt; re-export it with the PS-VAE trainer")
    if version > FORMAT_VERSION:
        raise _fail(path, f"written by a newer version of psvae_core (format {version}, this one reads up to {FORMAT_VERSION})",
                    "update the pack")
    kind = meta.get("kind", "")
    if expected_kind is not None and kind != expected_kind:
        raise _fail(path, f"this is a {kind} file, the {expected_kind} loader needs a {expected_kind} file",
                    f"pick a {expected_kind} file or use the {kind} loader")
    config = _json_field(path, meta, "config")
    if not isinstance(config, dict):
        raise _fail(path, "the 'config' metadata is not a JSON object", "re-export the file with the PS-VAE trainer")
    latent_stats = _json_field(path, meta, "latent_stats") if "latent_stats" in meta else None
    provenance = _json_field(path, meta, "provenance") if "provenance" in meta else {}

    tensors = _read_tensors(path, device) if read_tensors else None
    return Component(kind=kind, format_version=version, config=config, tensors=tensors,
                     latent_stats=latent_stats, provenance=provenance, metadata=meta, shapes=shapes)


def _read_tensors(path, device) -> dict:
    if isinstance(device, torch.device):
        device = str(device)
    try:  # the header is already checked; this guards the data itself (and a file changed meanwhile)
        return load_file(path, device=device)
    except Exception as e:
        raise _fail(path, f"safetensors could not read the tensors ({type(e).__name__}: {e})",
                    "the file is corrupt or incomplete; re-download or re-export it") from e


def _listing(problem: str, items: list) -> str:
    more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"{len(items)} {problem}: {', '.join(items[:_SHOW])}{more}"


def _check_fits(own: dict, stored: dict, source: str, provenance: Optional[dict]) -> None:
    """Names and shapes (name -> list) of the file's tensors against the model's, both under file names."""
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    mismatched = sorted(f"{k} (file {stored[k]}, model {own[k]})" for k in set(own) & set(stored) if stored[k] != own[k])
    problems = [_listing(what, items) for what, items in
                (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", mismatched))
                if items]
    if not problems:
        return
    renamed = missing and sorted(own[k] for k in missing) == sorted(stored[k] for k in unexpected)
    written = (provenance or {}).get("transformers")
    installed = package_version("transformers")
    if renamed and written != installed:
        by = f"transformers {written}" if isinstance(written, str) else "a transformers version it does not record"
        raise CheckpointError(
            f"{source}: {len(missing)} tensor name(s) differ between the file and this model "
            f"({'; '.join(problems)}): the file was written under {by} and this is transformers {installed}, "
            "which names these tensors in a way this psvae_core does not map; update the PS-VAE pack"
            + (f", or install transformers=={written}" if isinstance(written, str) else ""))
    raise CheckpointError(f"{source}: the weights do not fit this model: {'; '.join(problems)}; "
                          "the file was made for another component or config, pick the matching file")


def load_state_dict_checked(module: nn.Module, tensors: dict, *, source: str,
                            names: Optional[Callable[[str], str]] = None,
                            provenance: Optional[dict] = None, dtype: Optional[torch.dtype] = None,
                            assign: bool = False) -> None:
    """Strict load whose error lists what does not fit; stored tensors take the module's dtypes
    (floating ones `dtype` when given; a tensor already of its dtype is not copied).

    `names` maps a state-dict key to its name in files (e.g. `encoders.file_names`), applied to the
    module's keys and to the file's (which migrates files written under other names); the file's
    `provenance` lets a name mismatch say which transformers version wrote it. assign=True makes the
    given tensors the module's own (`nn.Module.load_state_dict(assign=True)`): no copy, the way
    to fill a module whose parameters are on the meta device."""
    names = names or (lambda key: key)
    state = module.state_dict()
    live = {names(k): k for k in state}
    own = {name: state[k] for name, k in live.items()}
    tensors = {names(k): t for k, t in tensors.items()}
    _check_fits({k: list(t.shape) for k, t in own.items()}, {k: list(t.shape) for k, t in tensors.items()},
                source, provenance)
    target = lambda t: dtype if dtype is not None and t.is_floating_point() else t.dtype  # noqa: E731
    cast = {live[k]: t.to(dtype=target(own[k])) for k, t in tensors.items()}
    try:
        module.load_state_dict(cast, strict=True, assign=assign)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: loading the weights failed ({e}); pick the matching file") from e


def _finite(t: torch.Tensor) -> bool:
    # A finite sum proves every element finite (NaN and Inf propagate) without a mask of the tensor's
    # size; only a sum that overflows needs the element-wise check.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def build_checked(path, component: Component, build: Callable[[], nn.Module], *,
                  names: Optional[Callable[[nn.Module], Callable[[str], str]]] = None,
                  device="cpu", dtype: Optional[torch.dtype] = None) -> nn.Module:
    """`build()` (a model from the stored config) holding the component's tensors, on `device`
    (floating tensors in `dtype` when given); every failure is a CheckpointError naming the file.

    The model is first built on the meta device (nothing allocated) and its tensor names and shapes
    compared with the file's header: a config that does not fit the weights (absurd sizes included)
    never gets allocated, nor is any tensor data read (a component read with read_tensors=False is
    read only now), and a config that cannot build at all is reported, not raised as whatever it hit.
    Non-finite weights are refused. Then it is built again with its parameters on the meta device
    (no random init) and its buffers computed as usual (the non-persistent ones a state dict does
    not carry: RoPE frequencies, position ids), and the file's tensors, memory-mapped and read
    straight onto `device`, become its parameters: on the CPU, in the file's dtype, they are the
    mapped file itself (no copy); a dtype change makes the one copy needed."""
    from accelerate import init_empty_weights

    names = names or (lambda module: (lambda key: key))
    try:
        with torch.device("meta"):
            skeleton = build()
    except Exception as e:  # a stored config is untrusted input: any failure while building is its fault
        raise _fail(path, f"the stored config does not build a model ({type(e).__name__}: {e})",
                    "the file is corrupt or was edited by hand; re-export it with the PS-VAE trainer") from None
    name = names(skeleton)
    _check_fits({name(k): list(v.shape) for k, v in skeleton.state_dict().items()},
                {name(k): shape for k, shape in component.shapes.items()}, str(path), component.provenance)
    del skeleton
    device = torch.device(device)
    tensors = component.tensors if component.tensors is not None else _read_tensors(path, device)
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not _finite(t)]
    if bad:
        raise _fail(path, _listing("tensor(s) holding NaN/Inf values", sorted(bad)),
                    "the weights are broken (e.g. exported from a diverged run); re-export from an earlier checkpoint")
    with init_empty_weights(include_buffers=False):
        model = build()
    load_state_dict_checked(model, {k: t.to(device) for k, t in tensors.items()}, source=str(path),
                            names=names(model), provenance=component.provenance, dtype=dtype, assign=True)
    left = [k for k, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:  # a module that moves its buffers to its parameters' device at build time: a defect here
        raise RuntimeError(f"{path}: loading left {_listing('tensor(s) on the meta device', left)}")
    return model.to(device=device, dtype=dtype)  # the buffers the file does not hold


# ---------------------------------------------------------------------------------- identity

_FINGERPRINTS: dict[tuple, str] = {}


def fingerprint(path) -> str:
    """The identity of a component file: sha256 over its config, latent stats, kind and tensor
    header entries (sorted JSON), then every byte of its tensor data.

    Provenance and dates are left out, so re-saving the same weights keeps the fingerprint; any
    weight, config or stats change alters it (so does a re-export in another dtype). A generator
    records its VAE's fingerprint; the trainer's latent cache is keyed by it. Memoised per
    (path, size, mtime) within a process.
    """
    path = Path(path)
    st = _stat_file(path)
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo in _FINGERPRINTS:
        return _FINGERPRINTS[memo]
    header = read_header(path)
    meta = header.get("__metadata__", {})
    described = {"config": meta.get("config"), "latent_stats": meta.get("latent_stats"), "kind": meta.get("kind"),
                 "tensors": {k: v for k, v in sorted(header.items()) if k != "__metadata__"}}
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    with open(path, "rb") as f:
        f.seek(8 + struct.unpack("<Q", f.read(8))[0])
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    _FINGERPRINTS[memo] = value = digest.hexdigest()
    return value
