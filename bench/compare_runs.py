"""Compare two benchmark results (bench/*.json with a "log" of trainer metrics rows): loss curves
at the same steps and the throughput ratio.

    python bench/compare_runs.py one_gpu.json two_gpu.json
"""
import json
import sys


def main(a_path, b_path):
    a, b = json.load(open(a_path)), json.load(open(b_path))
    rows_a = {r["step"]: r for r in a["log"]}
    rows_b = {r["step"]: r for r in b["log"]}
    keys = sorted(k for k in next(iter(rows_a.values())) if "/" in k and not k.startswith("grad_norm"))
    worst = {}
    for step in sorted(set(rows_a) & set(rows_b)):
        for k in keys:
            if k in rows_b[step]:
                x, y = rows_a[step][k], rows_b[step][k]
                worst[k] = max(worst.get(k, 0.0), abs(x - y) / max(abs(x), 1e-8))
    out = {"a": a_path, "b": b_path, "throughput_ratio": round(b["images_per_s"] / a["images_per_s"], 3),
           "max_relative_loss_difference": {k: round(v, 5) for k, v in worst.items()}}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main(*sys.argv[1:3])
