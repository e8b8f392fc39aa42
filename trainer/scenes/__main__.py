"""`python -m trainer.scenes write ...` and `python -m trainer.scenes validate-scorer ...` (docs/SCENES.md)."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .datasets import KINDS, default_workers, write
from .world import SPLITS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.scenes", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a dataset in the trainer's input formats")
    w.add_argument("--split", choices=SPLITS, default="train")
    w.add_argument("--kind", choices=KINDS, required=True)
    w.add_argument("--count", type=int, required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--out", required=True)
    w.add_argument("--workers", type=int, default=default_workers())
    v = sub.add_parser("validate-scorer", help="the scorer's accuracy on clean and degraded renders")
    v.add_argument("--per-category", type=int, default=500, help="prompts per GenEval category")
    v.add_argument("--degraded-per-category", type=int, default=100,
                   help="of those, how many are also scored blurred, noisy and as JPEG")
    v.add_argument("--per-kind", type=int, default=50, help="edits per edit kind (clean and degraded)")
    v.add_argument("--garbage-per-kind", type=int, default=50,
                   help="garbage images (colour noise, blobs, ellipses) per kind, each scored against every category")
    v.add_argument("--garbage-vae", help="also score decodes of random latents through this PS-VAE file")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--workers", type=int, default=default_workers())
    v.add_argument("--out", help="also write the table as JSON here")
    args = parser.parse_args(argv)

    if args.command == "write":
        start = time.perf_counter()
        manifest = write(args.out, args.kind, args.split, args.count, args.seed, args.workers)
        print(f"wrote {args.count} {args.kind} items of {args.split} (seed {args.seed}) to {args.out} "
              f"in {time.perf_counter() - start:.1f} s; manifest {manifest}")
        return 0
    from .validate import format_table, validate_scorer
    table = validate_scorer(args.per_category, args.seed, args.workers, args.per_kind, args.degraded_per_category,
                            args.garbage_per_kind, args.garbage_vae)
    print(format_table(table))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
