"""A generator of malformed inputs (files and images) and the error each must end in.

`cases(folder)` writes the malformed files into `folder` and returns `Case`s: a name, a call that
feeds one bad input to a public entry point (`PSVAE.from_file`, `FusionDiffuser.from_file`,
`read_metadata`, `fingerprint`, `to_model_images`, `PSVAE.encode`) and the documented error type
(docs/CHECKPOINTS.md, README "Image input"). Run as a script it runs every case under a memory cap
(RLIMIT_AS) and prints one JSON line per case; tests/test_malformed.py runs it in a subprocess with
a time limit, so a case that allocates without bound fails as MemoryError and a hang as a timeout.
"""
from __future__ import annotations

import json
import os
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from psvae_core.autoencoder import PSVAE  # noqa: E402
from psvae_core.checkpoint import CheckpointError, fingerprint, read_metadata  # noqa: E402
from psvae_core.fusion import PRESETS, FusionDiffuser  # noqa: E402
from psvae_core.images import ImageInputError, to_model_images  # noqa: E402

BASE_VAE = ROOT / "tests" / "data" / "layouts" / "dinov2_reg-tf4.safetensors"
DEEP = 100_000  # nesting levels: far past the JSON parser's recursion limit
MEMORY_CAP = 6 << 30  # bytes of address space (importing torch alone maps ~3.3 GiB)


@dataclass
class Case:
    name: str
    run: Callable[[], object]
    expected: type
    path: Path | None = None  # a file case's message must name its file


def _rewrite(src: Path, dst: Path, tensors=None, **meta_changes) -> Path:
    meta = read_metadata(src)
    meta.update({k: v for k, v in meta_changes.items() if v is not None})
    for k in [k for k, v in meta_changes.items() if v is None]:
        meta.pop(k, None)
    save_file(tensors if tensors is not None else load_file(src), dst, metadata=meta)
    return dst


def _set(config: dict, dotted: str, value) -> dict:
    config = json.loads(json.dumps(config))
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node[key]
    node[leaf] = value
    return config


def _raw_header_file(dst: Path, header: bytes, data: bytes = b"") -> Path:
    dst.write_bytes(len(header).to_bytes(8, "little") + header + data)
    return dst


# Stored VAE configs that pass the JSON check but must not build (or must not fit the weights).
VAE_CONFIGS = [
    ("encoder.hf_config.num_attention_heads", v) for v in (0, -1, 3, "4", 2.0, None, True)] + [
    ("encoder.hf_config.hidden_size", v) for v in (-64, 0, 16.0, 10 ** 9, 64, 60000)] + [
    ("encoder.hf_config.num_hidden_layers", v) for v in (0, -1, 10 ** 6, 1000, 2.5)] + [
    ("encoder.hf_config.patch_size", v) for v in (0, -14, 14.0, 10 ** 6)] + [
    ("encoder.hf_config.intermediate_size", v) for v in (0, 10 ** 8)] + [
    ("encoder.hf_config.model_type", v) for v in ("gpt2", None, 7)] + [
    ("encoder.hf_config", v) for v in (None, {}, [], "x")] + [
    ("encoder.family", v) for v in ("x", "dinov3", None)] + [
    ("encoder.image_size", v) for v in (0, -1, 10 ** 6, "224")] + [
    ("encoder.feature_norm", "x"), ("encoder.image_std", [0, 0, 0]), ("encoder.image_mean", [1, 2])] + [
    ("pixel_decoder.base_channels", v) for v in (16.0, 0, -1, 4096, 2048, True, 10 ** 6)] + [
    ("pixel_decoder.channel_mult", v) for v in ([], [0], [1.5], "abc", [1] * 100, [64, 64])] + [
    ("pixel_decoder.num_res_blocks", v) for v in (0, 10 ** 6, 60)] + [
    ("pixel_decoder.kind", v) for v in ("x", "vit")] + [
    ("semantic.depth", v) for v in (99, -1, 3, 1.0)] + [
    ("semantic.block_init", "x"), ("semantic.proj_hidden", 0), ("semantic.proj_hidden", 10 ** 6)] + [
    ("latent_channels", v) for v in (0, -4, 10 ** 6, 5, "4")] + [
    ("mode", v) for v in ("x", "rae")] + [("unknown_key", 1)]

GENERATOR_CONFIGS = [
    ("head_heads", 0), ("head_heads", -4), ("head_width", 7), ("head_width", 0), ("head_depth", 10 ** 6),
    ("head_mlp_ratio", float("nan")), ("head_mlp_ratio", 0), ("latent_size", [0, 4]), ("latent_size", [4]),
    ("latent_channels", 0), ("latent_channels", 7), ("lm.hidden_size", 0), ("lm.hidden_size", 65),
    ("lm.num_attention_heads", 0), ("lm.num_key_value_heads", 3), ("lm.vocab_size", 0),
    ("lm.num_hidden_layers", 10 ** 6), ("lm.num_hidden_layers", 3), ("lm.model_type", "gpt2"), ("lm", {}),
]

BAD_TOKENIZERS = [
    {"tokenizer_json": "{garbage"}, {"tokenizer_json": ""}, {"tokenizer_json": "[]"}, {"tokenizer_json": "null"},
    {"tokenizer_config": "{garbage"}, {"tokenizer_config": "[]"}, {"tokenizer_config": '{"pad_token": 3}'},
    {"tokenizer_config": "[" * DEEP}, {"tokenizer_config": None}, {"tokenizer_json": None},
]


def _file_cases(folder: Path) -> list[Case]:
    out: list[Case] = []
    vae = lambda p: (lambda: PSVAE.from_file(p))  # noqa: E731
    gen = lambda p: (lambda: FusionDiffuser.from_file(p))  # noqa: E731
    entry_points = {"vae": vae, "generator": gen, "metadata": lambda p: (lambda: read_metadata(p)),
                    "fingerprint": lambda p: (lambda: fingerprint(p))}

    def add(name, path, loaders=("vae",)):
        for loader in loaders:
            out.append(Case(f"{name} [{loader}]", entry_points[loader](path), CheckpointError, path))

    good = BASE_VAE.read_bytes()
    for i, cut in enumerate(np.linspace(0, len(good) - 1, 40).astype(int)):
        path = folder / f"cut{i}.safetensors"
        path.write_bytes(good[:cut])
        add(f"truncated at {cut} of {len(good)} bytes", path)
    path = folder / "long.safetensors"
    path.write_bytes(good + b"\0")
    add("one byte of trailing garbage", path, ("vae", "fingerprint"))

    header = json.loads(good[8:8 + int.from_bytes(good[:8], "little")])
    deep = (b"[" * DEEP) + (b"]" * DEEP)
    add("deeply nested JSON in the header", _raw_header_file(folder / "deep.safetensors", b'{"x": ' + deep + b"}"),
        ("vae", "generator", "metadata", "fingerprint"))
    for key in ("config", "latent_stats", "provenance"):
        add(f"deeply nested JSON in {key}", _rewrite(BASE_VAE, folder / f"deep_{key}.safetensors", **{key: deep.decode()}))
    add("header is a JSON list", _raw_header_file(folder / "list.safetensors", b"[]"), ("vae", "metadata"))
    add("header has non-str metadata", _raw_header_file(folder / "meta.safetensors", b'{"__metadata__": {"a": 1}}'),
        ("vae", "metadata"))
    name = next(k for k in header if k != "__metadata__")
    for label, entry in [("negative offsets", {**header[name], "data_offsets": [-4, 0]}),
                         ("offsets past the end", {**header[name], "data_offsets": [0, 10 ** 12]}),
                         ("a string entry", "x"), ("a wrong dtype", {**header[name], "dtype": "F64"})]:
        blob = json.dumps({**header, name: entry}).encode()
        add(f"tensor entry with {label}", _raw_header_file(folder / f"entry_{len(out)}.safetensors", blob,
                                                             good[8 + int.from_bytes(good[:8], "little"):]))

    config = json.loads(read_metadata(BASE_VAE)["config"])
    for i, (dotted, value) in enumerate(VAE_CONFIGS):
        changed = _set(config, dotted, value) if "." in dotted or dotted in config or dotted == "unknown_key" else config
        add(f"VAE config {dotted}={value!r}"[:120], _rewrite(BASE_VAE, folder / f"cfg{i}.safetensors",
                                                             config=json.dumps(changed)))
    for i, text in enumerate(["{}", "[]", '"x"', "null", "{", ""]):
        add(f"VAE config text {text!r}", _rewrite(BASE_VAE, folder / f"cfgtext{i}.safetensors", config=text))
    for version in ("0", "-1", "", "1.5", "999", None):
        add(f"format_version {version!r}", _rewrite(BASE_VAE, folder / f"ver{version}.safetensors", format_version=version))
    add("no format key", _rewrite(BASE_VAE, folder / "noformat.safetensors", format=None))
    add("kind generator in the VAE loader", _rewrite(BASE_VAE, folder / "kind.safetensors", kind="generator"))
    add("no config key", _rewrite(BASE_VAE, folder / "noconfig.safetensors", config=None))

    tensors = load_file(BASE_VAE)
    weight = next(k for k, t in tensors.items() if t.ndim == 2)
    for label, key, value in [("a NaN weight", weight, float("nan")), ("an Inf weight", weight, float("inf")),
                              ("latents_std NaN", "latents_std", float("nan")), ("latents_std 0", "latents_std", 0.0),
                              ("latents_std negative", "latents_std", -1.0)]:
        changed = dict(tensors)
        changed[key] = tensors[key].clone()
        changed[key].view(-1)[0] = value
        add(label, _rewrite(BASE_VAE, folder / f"val_{key}_{value}.safetensors", tensors=changed))
    dropped = {k: v for k, v in tensors.items() if k != weight}
    add("a tensor missing", _rewrite(BASE_VAE, folder / "dropped.safetensors", tensors=dropped))
    add("an extra tensor", _rewrite(BASE_VAE, folder / "extra.safetensors", tensors={**tensors, "x": torch.ones(1)}))
    add("a tensor of another shape", _rewrite(BASE_VAE, folder / "shape.safetensors",
                                              tensors={**tensors, weight: torch.ones(3, 3)}))

    torch.manual_seed(0)
    generator = folder / "generator.safetensors"
    FusionDiffuser(PRESETS["tiny"]).save(generator, dtype=torch.float16)
    gen_config = json.loads(read_metadata(generator)["config"])
    for i, (dotted, value) in enumerate(GENERATOR_CONFIGS):
        add(f"generator config {dotted}={value!r}", _rewrite(generator, folder / f"gcfg{i}.safetensors",
                                                             config=json.dumps(_set(gen_config, dotted, value))),
            ("generator",))
    good_tokenizer = {"tokenizer_json": '{"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0}, '
                                        '"unk_token": "a"}}', "tokenizer_config": "{}"}
    for i, bad in enumerate(BAD_TOKENIZERS):
        state = {**good_tokenizer, **bad}
        meta = {f"psvae.tokenizer.{k}": v for k, v in state.items()}
        missing = [k for k, v in meta.items() if v is None]
        path = _rewrite(generator, folder / f"tok{i}.safetensors", **meta)
        add(f"tokenizer {bad!r}"[:100] + (f" ({missing} absent)" if missing else ""), path, ("generator",))

    fifo = folder / "fifo.safetensors"
    os.mkfifo(fifo)
    loop = folder / "loop.safetensors"
    loop.symlink_to(loop)
    dangling = folder / "dangling.safetensors"
    dangling.symlink_to(folder / "gone.safetensors")
    for label, path in [("a FIFO", fifo), ("a device", Path(os.devnull)), ("a symlink loop", loop),
                        ("a dangling symlink", dangling), ("a folder", folder), ("a missing file", folder / "no.safetensors")]:
        add(label, path, ("vae", "metadata", "fingerprint"))
    return out


def _image_cases() -> list[Case]:
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    bad = {
        "empty 0x0 tensor": torch.zeros(1, 3, 0, 0), "empty batch": torch.zeros(0, 3, 16, 16),
        "zero channels": torch.zeros(1, 0, 16, 16), "empty numpy": np.zeros((0, 0, 3), np.uint8),
        "meta tensor": torch.zeros(1, 3, 16, 16, device="meta"), "sparse COO": torch.zeros(1, 3, 16, 16).to_sparse(),
        "sparse CSR": torch.zeros(3, 16).to_sparse_csr(), "object array": np.full((16, 16, 3), None, dtype=object),
        "string array": np.full((16, 16, 3), "x"), "complex tensor": torch.zeros(1, 3, 16, 16, dtype=torch.complex64),
        "int32 tensor": torch.zeros(1, 3, 16, 16, dtype=torch.int32), "int64 array": np.zeros((16, 16, 3), np.int64),
        "bool tensor": torch.zeros(1, 3, 16, 16, dtype=torch.bool), "int8 array": np.zeros((16, 16, 3), np.int8),
        "NaN float": torch.full((1, 3, 16, 16), float("nan")), "Inf float": torch.full((1, 3, 16, 16), float("inf")),
        "float 0..255": torch.full((1, 3, 16, 16), 200.0), "float -1..1": torch.full((1, 3, 16, 16), -1.0),
        "5 channels": torch.zeros(1, 5, 16, 16), "ComfyUI layout": torch.zeros(1, 16, 16, 3),
        "1-D tensor": torch.zeros(16), "5-D tensor": torch.zeros(1, 1, 3, 16, 16), "0-D array": np.array(0.5),
        "too small": torch.zeros(1, 3, 4, 4), "too wide": torch.zeros(1, 3, 8, 9000),
        "PIL F with NaN": Image.fromarray(np.full((16, 16), np.nan, np.float32)),
        "PIL F above 1": Image.fromarray(np.full((16, 16), 3.0, np.float32)),
        "PIL I negative": Image.fromarray(np.full((16, 16), -5, np.int32)),
        "PIL I above 16 bits": Image.fromarray(np.full((16, 16), 70000, np.int32)),
        "PIL tiny": Image.fromarray(np.zeros((4, 4, 3), np.uint8)),
        "empty list": [], "list of different sizes": [rgb, np.zeros((20, 16, 3), np.uint8)],
        "list with a NaN image": [rgb, np.full((16, 16, 3), np.nan, np.float32)],
        "list with a None": [rgb, None], "nested empty list": [[]], "None": None, "a string": "image.png",
        "a dict": {"image": rgb}, "bytes": b"\x89PNG", "a number": 3.0,
        "float16 NaN": torch.full((1, 3, 16, 16), float("nan"), dtype=torch.float16),
        "float64 out of range": np.full((16, 16, 3), 2.0), "uint8 4-D numpy of 7 channels": np.zeros((1, 16, 16, 7), np.uint8),
    }
    out = [Case(f"image: {name}", (lambda x=x: to_model_images(x)), ImageInputError) for name, x in bad.items()]
    vae = PSVAE.from_file(BASE_VAE)
    for name in ("empty batch", "meta tensor", "object array", "NaN float", "list with a None", "PIL I negative"):
        out.append(Case(f"PSVAE.encode: {name}", (lambda x=bad[name]: vae.encode(x)), ImageInputError))
    return out


def cases(folder: Path) -> list[Case]:
    return _file_cases(Path(folder)) + _image_cases()


def main(folder: str) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    for case in cases(Path(folder)):
        try:
            case.run()
            outcome, message = "no error", ""
        except BaseException as e:  # noqa: BLE001 - the point is to see what escapes
            outcome, message = type(e).__name__, str(e)
        print(json.dumps({"name": case.name, "outcome": outcome, "expected": case.expected.__name__,
                          "ok": outcome == case.expected.__name__, "message": message[:2000],
                          "path": None if case.path is None else str(case.path)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
