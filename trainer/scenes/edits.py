"""Edit triplets: a scene, an instruction, and the exact render of the edited scene (docs/SCENES.md).

`make_edit` changes one thing: an object's shape (replace), its colour, its size, its place (move),
removes one, adds one, or changes the background style. Everything else renders to the same pixels,
so the pixels that may change are known: `edit_region`. The edit spec (JSON-able) carries the
source and target scenes, so the scorer can check an edited image from the spec alone.
"""
from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .world import (
    BACKGROUND_STYLES, COLORS, EDGE_MARGIN, GAP, HELD_OUT, RADIUS, SHAPES, SIZES, Scene, SceneObject,
    object_masks, pairs_for, sample_background,
)

KINDS = ("replace", "remove", "add", "recolor", "resize", "move", "background")
CELLS = {  # 3 x 3 places named in instructions: (column, row)
    (0, 0): "the top left corner", (1, 0): "the top", (2, 0): "the top right corner",
    (0, 1): "the left side", (1, 1): "the centre", (2, 1): "the right side",
    (0, 2): "the bottom left corner", (1, 2): "the bottom", (2, 2): "the bottom right corner",
}
CELL_INSET = 0.04  # an added or moved object's centre keeps this far inside its named cell
REGION_MARGIN = 2 / 256  # the region around a changed object's bounding circle (anti-aliasing)
_STYLE_WORDS = {"flat": "plain", "gradient": "gradient", "radial": "vignette", "stripes": "striped",
                "checker": "checkerboard", "blotches": "mottled"}
_TEMPLATES = {
    "replace": ("replace the {a} with {b}", "turn the {a} into {b}", "swap the {a} for {b}"),
    "remove": ("remove the {a}", "delete the {a}", "take away the {a}"),
    "add": ("add {b} to {cell}", "put {b} at {cell}", "place {b} at {cell}"),
    "recolor": ("make the {a} {color}", "paint the {a} {color}", "change the colour of the {a} to {color}"),
    "resize": ("make the {a} {bigger}", "change the {a} to a {size} one", "resize the {a} to be {size}"),
    "move": ("move the {a} to {cell}", "put the {a} at {cell}", "shift the {a} to {cell}"),
    "background": ("change the background to a {style} one", "give it a {style} background",
                   "make the background {style}"),
}


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _name(o: SceneObject) -> str:
    return f"{o.color} {o.shape}"


def cell_of(x: float, y: float) -> tuple[int, int]:
    return min(int(x * 3), 2), min(int(y * 3), 2)


def _fits(obj: SceneObject, others) -> bool:
    r = obj.radius
    inside = all(EDGE_MARGIN + r <= v <= 1 - EDGE_MARGIN - r for v in (obj.x, obj.y))
    return inside and all(math.dist((obj.x, obj.y), (o.x, o.y)) >= r + o.radius + GAP for o in others)


def _spot_in_cell(rng, size: str, cell, others) -> tuple[float, float] | None:
    """A free centre for an object of `size` inside `cell`, or None."""
    r = RADIUS[size]
    bounds = []
    for i in cell:
        lo = max(i / 3 + CELL_INSET, EDGE_MARGIN + r)
        hi = min((i + 1) / 3 - CELL_INSET, 1 - EDGE_MARGIN - r)
        if lo > hi:
            return None
        bounds.append((lo, hi))
    for _ in range(50):
        x, y = (float(rng.uniform(lo, hi)) for lo, hi in bounds)
        if _fits(SceneObject(SHAPES[0], "red", size, x, y), others):
            return x, y
    return None


def make_edit(scene: Scene, rng: np.random.Generator, split: str = "train", kind: str | None = None):
    """(instruction, target_scene, edit_spec) for one random edit of `scene` (of `kind` if given).

    New colour-shape pairs come from the split's pairs. The edited object is always the only one of
    its colour and shape, so the instruction names it unambiguously. Raises ValueError when `kind`
    cannot apply to this scene (e.g. "add" to a full one); with kind None a feasible kind is drawn.
    """
    kinds = [kind] if kind else list(KINDS)
    if kind and kind not in KINDS:
        raise ValueError(f"unknown edit kind {kind!r}: expected one of {', '.join(KINDS)}")
    while kinds:
        k = kinds.pop(int(rng.integers(len(kinds))))
        made = _EDITS[k](scene, rng, pairs_for(split))
        if made is not None:
            target, words, before, after = made
            templates = _TEMPLATES[k]
            instruction = templates[rng.integers(len(templates))].format(**words)
            spec = {"kind": k, "instruction": instruction, "source": scene.to_dict(), "target": target.to_dict(),
                    "before": before, "after": after, "cell": words.get("where")}
            return instruction, target, spec
    raise ValueError(f"edit {kind!r} does not apply to this scene")


def _unique(scene: Scene) -> list[int]:
    names = [_name(o) for o in scene.objects]
    return [i for i, n in enumerate(names) if names.count(n) == 1]


def _pick(scene: Scene, rng) -> int | None:
    unique = _unique(scene)
    return unique[rng.integers(len(unique))] if unique else None


def _new_pair(rng, pairs, scene: Scene, keep_shape=None, keep_color=None):
    """A pair from `pairs` not in the scene, optionally with a fixed shape or colour."""
    present = {(o.shape, o.color) for o in scene.objects}
    options = [p for p in pairs if p not in present and (keep_shape in (None, p[0])) and (keep_color in (None, p[1]))]
    return options[rng.integers(len(options))] if options else None


def _swap(scene: Scene, i: int, new: SceneObject) -> Scene:
    objects = list(scene.objects)
    objects[i] = new
    return scene.with_objects(objects)


def _replace(scene, rng, pairs):
    i = _pick(scene, rng)
    if i is None:
        return None
    old = scene.objects[i]
    pair = _new_pair(rng, [p for p in pairs if p[0] != old.shape], scene)
    if pair is None:
        return None
    new = replace(old, shape=pair[0], color=pair[1])
    return _swap(scene, i, new), {"a": _name(old), "b": _article(_name(new))}, [i], [i]


def _remove(scene, rng, pairs):
    i = _pick(scene, rng)
    if i is None or len(scene.objects) < 2:  # keep at least one object
        return None
    old = scene.objects[i]
    target = scene.with_objects(o for j, o in enumerate(scene.objects) if j != i)
    return target, {"a": _name(old)}, [i], []


def _add(scene, rng, pairs):
    pair = _new_pair(rng, pairs, scene)
    if len(scene.objects) >= 4 or pair is None:
        return None
    size = SIZES[rng.integers(len(SIZES))]
    cells = list(CELLS)
    rng.shuffle(cells)
    for cell in cells:
        spot = _spot_in_cell(rng, size, cell, scene.objects)
        if spot is not None:
            new = SceneObject(pair[0], pair[1], size, *spot)
            words = {"b": _article(f"{size} {_name(new)}"), "cell": CELLS[cell]}
            words["where"] = list(cell)
            return scene.with_objects(scene.objects + (new,)), words, [], [len(scene.objects)]
    return None


def _recolor(scene, rng, pairs):
    i = _pick(scene, rng)
    if i is None:
        return None
    old = scene.objects[i]
    pair = _new_pair(rng, pairs, scene, keep_shape=old.shape)
    if pair is None:
        return None
    return _swap(scene, i, replace(old, color=pair[1])), {"a": _name(old), "color": pair[1]}, [i], [i]


def _resize(scene, rng, pairs):
    order = _unique(scene)
    rng.shuffle(order)
    for i in order:
        old = scene.objects[i]
        new = replace(old, size="small" if old.size == "large" else "large")
        if _fits(new, [o for j, o in enumerate(scene.objects) if j != i]):
            words = {"a": _name(old), "size": new.size, "bigger": "bigger" if new.size == "large" else "smaller"}
            return _swap(scene, i, new), words, [i], [i]
    return None


def _move(scene, rng, pairs):
    order = _unique(scene)
    rng.shuffle(order)
    for i in order:
        old = scene.objects[i]
        others = [o for j, o in enumerate(scene.objects) if j != i]
        cells = [c for c in CELLS if c != cell_of(old.x, old.y)]
        rng.shuffle(cells)
        for cell in cells:
            spot = _spot_in_cell(rng, old.size, cell, others)
            if spot is not None:
                new = replace(old, x=spot[0], y=spot[1])
                return _swap(scene, i, new), {"a": _name(old), "cell": CELLS[cell], "where": list(cell)}, [i], [i]
    return None


def _background(scene, rng, pairs):
    styles = [s for s in BACKGROUND_STYLES if s != scene.background.style]
    bg = replace(sample_background(rng), style=styles[rng.integers(len(styles))])
    # A new seed changes the object grain too; keep the source's so the objects render unchanged.
    bg = replace(bg, seed=scene.background.seed, light=scene.background.light)
    return replace(scene, background=bg), {"style": _STYLE_WORDS[bg.style]}, [], []


_EDITS = {"replace": _replace, "remove": _remove, "add": _add, "recolor": _recolor, "resize": _resize,
          "move": _move, "background": _background}


def edit_region(spec: dict, size: int = 256) -> np.ndarray:
    """Bool (size, size): the pixels the edit may change (all others render identically).

    Object edits: the bounding circles (plus REGION_MARGIN) of the objects changed, before and after.
    Background change: everything but the objects' fully covered pixels (their anti-aliased edges
    mix with the background).
    """
    source, target = Scene.from_dict(spec["source"]), Scene.from_dict(spec["target"])
    if spec["kind"] == "background":
        return ~(object_masks(source, size) >= 1).any(axis=0)
    c = (np.arange(size) + 0.5) / size
    xx, yy = np.meshgrid(c, c)
    changed = [source.objects[i] for i in spec["before"]] + [target.objects[i] for i in spec["after"]]
    region = np.zeros((size, size), bool)
    for o in changed:
        region |= np.hypot(xx - o.x, yy - o.y) <= o.radius + REGION_MARGIN
    return region
