"""A benchmark image folder from the bundled photos: random crops and flips at 256 px.

    python bench/photo_set.py DIR --count 400
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.samples import sample_photos  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--count", type=int, default=400)
    p.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    photos = list(sample_photos(size=2 * args.size).values())
    for i in range(args.count):
        im = photos[i % len(photos)]
        s = rng.randint(args.size, 2 * args.size)
        x, y = rng.randint(0, im.width - s), rng.randint(0, im.height - s)
        crop = im.crop((x, y, x + s, y + s)).resize((args.size, args.size), Image.BICUBIC)
        (ImageOps.mirror(crop) if rng.random() < 0.5 else crop).save(out / f"{i:05d}.png")


if __name__ == "__main__":
    main()
