"""Hard-link installed packages (with everything they require) from this interpreter's environment
into another environment's site-packages, so that two venvs holding the same PyTorch build share its
5 GB on disk instead of storing it twice. Called by tools/build_comfyui.sh with the project's .venv
python; the other venv's pip then finds the packages installed, exactly as if it had unpacked the
same wheels itself (the files are the wheels' files, RECORD included). Falls back to copying where
the two folders are on different filesystems. Console scripts (outside site-packages) are skipped.

Usage: python tools/link_packages.py DEST_SITE_PACKAGES NAME [NAME ...]
"""

import os
import shutil
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name


def closure(names):
    """Distributions of `names` and of everything they require, extras followed, markers evaluated."""
    found, todo = {}, [(name, frozenset()) for name in names]
    done = set()
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), extras)
        if key in done:
            continue
        done.add(key)
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue  # an optional requirement nobody installed: the other pip resolves it itself
        found[canonicalize_name(name)] = dist
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            todo.append((req.name, frozenset(req.extras)))
    return found


def link_into(dest, dists):
    linked = copied = 0
    for dist in dists.values():
        for rel in dist.files or []:
            if str(rel).startswith(".."):
                continue
            src, dst = dist.locate_file(rel), os.path.join(dest, str(rel))
            if not os.path.isfile(src) or os.path.exists(dst):
                continue
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            try:
                os.link(src, dst)
                linked += 1
            except OSError:
                shutil.copy2(src, dst)
                copied += 1
    return linked, copied


if __name__ == "__main__":
    dest, names = sys.argv[1], sys.argv[2:]
    dists = closure(names)
    linked, copied = link_into(dest, dists)
    print(f"link_packages: {len(dists)} distributions into {dest}: {linked} files linked, {copied} copied")
