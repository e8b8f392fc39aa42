"""Where PS-VAE model files live inside ComfyUI, and cheap header-only checks on them.

`models/psvae` is registered under the folder key "psvae" (docs/COMFYUI_PACK.md, Development): folders that
`extra_model_paths.yaml` already added under that key are kept, the default folder goes first, the
pack's bundled `models/` folder last (so a user's file of the same name wins: ComfyUI resolves a
name in folder order), and the extension set is fixed (a new key would otherwise list every file,
READMEs included).

Each loader slot lists the files of its kind only (read from the safetensors header, cached per
path, size and mtime). Files whose kind cannot be read (pickles, foreign or damaged files) are
listed in both slots on purpose: picking one gives an error that explains why it cannot be
loaded, instead of a file that silently never shows up.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache

import folder_paths

from ..psvae_core import checkpoint

FOLDER = "psvae"
EXTENSIONS = {".safetensors", ".pt", ".pth", ".ckpt"}
NONE = "none"
KIND_VAE = "vae"
KIND_GENERATOR = "generator"


BUNDLED_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")


def default_folder() -> str:
    return os.path.join(folder_paths.models_dir, FOLDER)


def register_model_folder() -> None:
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    default = default_folder()
    if default not in paths:
        paths.insert(0, default)
    if BUNDLED_FOLDER in paths:  # last, whatever the yaml said: the user's files win
        paths.remove(BUNDLED_FOLDER)
    paths.append(BUNDLED_FOLDER)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)
    try:  # so users see where files go; harmless if it already exists or cannot be made
        os.makedirs(default, exist_ok=True)
    except OSError as err:
        logging.debug("PS-VAE: could not create %s: %s", default, err)


def searched_folders() -> str:
    return ", ".join(folder_paths.get_folder_paths(FOLDER)) or default_folder()


def list_files(kind: str | None = None) -> list[str]:
    """Every listed file, or those a `kind` slot offers: its kind, or a kind that cannot be read."""
    files = folder_paths.get_filename_list(FOLDER)
    if kind is None:
        return files
    return [name for name in files if file_kind(name) in (kind, None)]


def file_kind(name: str) -> str | None:
    """The PS-VAE kind ("vae", "generator", ...) in a listed file's header, or None when unreadable."""
    path = folder_paths.get_full_path(FOLDER, name)
    try:
        st = os.stat(path)
    except (OSError, TypeError):
        return None
    return _header_kind(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=1024)
def _header_kind(path: str, size: int, mtime_ns: int) -> str | None:
    # size and mtime are part of the key: a file rewritten in place is read again.
    try:
        meta = checkpoint.read_metadata(path)
    except (OSError, checkpoint.CheckpointError):
        return None
    return (meta.get("kind") or None) if meta.get("format") == checkpoint.FORMAT else None


def resolve(name: str, what: str) -> str:
    """Full path of a listed file, or a FileNotFoundError that says where we looked.

    ComfyUI's get_full_path skips a listed entry that is not a regular file (a FIFO, a symlink loop,
    a dangling link): its path is returned anyway, so that the checkpoint reader says what it is
    instead of "not found"."""
    path = folder_paths.get_full_path(FOLDER, name) if name else None
    if path is None and name in list_files():
        entries = (os.path.join(folder, name) for folder in folder_paths.get_folder_paths(FOLDER))
        path = next((p for p in entries if os.path.lexists(p)), None)
    if path is None:
        raise FileNotFoundError(
            f"{what} file {name!r} was not found in the 'psvae' model folder(s): {searched_folders()}. "
            "Put the .safetensors file there (or add a 'psvae:' entry to extra_model_paths.yaml) and "
            "refresh the browser page (press R) so the list is re-read.")
    return path


def kind_problem(name: str, expected_kind: str) -> str | None:
    """Header-only check of a chosen file; a user-facing message, or None when it looks right."""
    label = "VAE" if expected_kind == KIND_VAE else "generator"
    try:
        path = resolve(name, label)
        meta = checkpoint.read_metadata(path)
    except (FileNotFoundError, checkpoint.CheckpointError) as err:
        return str(err)
    if meta.get("format") != checkpoint.FORMAT:
        return (f"{name} is a safetensors file but not a PS-VAE file (no format={checkpoint.FORMAT!r} metadata); "
                "pick a file exported by the PS-VAE trainer")
    kind = meta.get("kind", "")
    if kind != expected_kind:
        other = {"vae": "vae_name", "generator": "generator_name"}.get(kind)
        hint = f" It belongs in the loader's {other} slot." if other else ""
        return f"{name} is a PS-VAE {kind or 'unknown-kind'} file, but this slot needs a {expected_kind} file.{hint}"
    return None

