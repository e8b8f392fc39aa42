"""Shared helpers of the GPU benchmarks: timing, peak memory, FLOP counting, the device ceiling."""
from __future__ import annotations

import json
import platform
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak of an H200 SXM from NVIDIA's datasheet (989.5 TFLOP/s without sparsity).
H200_BF16_PEAK = 989.5e12


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__, "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextmanager
def timed(result: dict, key: str):
    synchronize()
    start = time.perf_counter()
    yield
    synchronize()
    result[key] = time.perf_counter() - start


def count_flops(fn) -> int:
    """FLOPs of one call (matmuls and convolutions, 2 per multiply-add), by torch's counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measured_matmul_peak(n: int = 8192, repeats: int = 20) -> float:
    """Achievable bf16 matmul rate on this device (FLOP/s): the practical MFU ceiling."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def write_result(path, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
