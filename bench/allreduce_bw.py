"""NCCL all-reduce bandwidth between the GPUs of this host (what DDP pays per optimiser step).

    torchrun --nproc_per_node=2 bench/allreduce_bw.py --out allreduce.json

Bus bandwidth as nccl-tests defines it: bytes x 2 (n - 1) / n / time.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import environment, write_result  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="allreduce.json")
    args = p.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    rows = []
    # 657M float32 gradients (the 653M generator) = 2.6 GB; 25 MB = one DDP bucket.
    for mib in (25, 256, 2506):
        x = torch.ones(mib * 2**20 // 4, device="cuda")
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start, repeats = time.perf_counter(), 10
        for _ in range(repeats):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / repeats
        bus = x.numel() * 4 * 2 * (world - 1) / world / seconds
        rows.append({"mib": mib, "ms": round(seconds * 1e3, 2), "bus_gb_per_s": round(bus / 1e9, 1)})
    if rank == 0:
        write_result(args.out, {"command": "torchrun --nproc_per_node=%d bench/allreduce_bw.py" % world,
                                **environment(), "processes": world, "all_reduce": rows})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
