"""Prompts in GenEval's six categories, their structured specs, and scenes that satisfy them exactly.

A spec is a JSON-able dict the scorer checks (docs/SCENES.md):
  {"category": one of CATEGORIES,
   "objects": [{"shape": str, "color": str or None, "count": int}, ...],   # groups of objects
   "relation": None or "left" | "right" | "above" | "below"}               # objects[0] REL objects[1]
A scene made by `scene_for` holds exactly the spec's objects and nothing else.
"""
from __future__ import annotations

import numpy as np

from .world import HELD_OUT, SHAPES, SIZES, Scene, SceneObject, pairs_for, place, sample_background

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left", "right", "above", "below")
# A relation holds when the offset along its axis is at least RELATION_MIN (fraction of the image)
# and larger than the offset across it; scene_for draws with a safety factor (docs/SCENES.md).
RELATION_MIN = 0.1

_NUMBERS = ("zero", "one", "two", "three", "four")
_PLURAL = {s: s + "s" for s in SHAPES}
_REL_WORDS = {
    "left": ("to the left of", "left of", "on the left of"),
    "right": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
_TEMPLATES = {
    "single_object": ("a photo of {a}", "{a}", "an image of {a}", "{a} on its own", "a picture showing {a}"),
    "two_object": ("a photo of {a} and {b}", "{a} and {b}", "an image of {a} and {b}",
                   "{a} together with {b}", "a picture with {a} and {b}"),
    "counting": ("a photo of {n} {things}", "{n} {things}", "an image of {n} {things}",
                 "exactly {n} {things}", "a picture with {n} {things}"),
    "colors": ("a photo of {a}", "{a}", "an image of {a}", "a picture showing {a}",
               "a photo of a {shape} that is {color}"),
    "position": ("a photo of {a} {rel} {b}", "{a} {rel} {b}", "an image of {a} {rel} {b}",
                 "a picture with {a} {rel} {b}"),
    "color_attr": ("a photo of {a} and {b}", "{a} and {b}", "an image of {a} and {b}",
                   "{a} together with {b}", "a picture with {a} and {b}"),
}


def _with_article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


def _noun(group: dict) -> str:
    return _with_article(f"{group['color']} {group['shape']}" if group.get("color") else group["shape"])


def describe(spec: dict, rng: np.random.Generator) -> str:
    """One of the category's wordings for `spec`."""
    category, groups = spec["category"], spec["objects"]
    templates = _TEMPLATES[category]
    template = templates[rng.integers(len(templates))]
    if category == "counting":
        g = groups[0]
        things = g["shape"] if g["count"] == 1 else _PLURAL[g["shape"]]
        return template.format(n=_NUMBERS[g["count"]], things=things)
    words = {"a": _noun(groups[0]), "shape": groups[0]["shape"], "color": groups[0].get("color")}
    if len(groups) > 1:
        words["b"] = _noun(groups[1])
    if spec.get("relation"):
        options = _REL_WORDS[spec["relation"]]
        words["rel"] = options[rng.integers(len(options))]
    return template.format(**words)


def sample_spec(rng: np.random.Generator, split: str = "train", category: str | None = None) -> dict:
    """A random spec of `category` (uniform over CATEGORIES when None).

    In the test split, the named colour-shape pairs of "colors" and "color_attr" include a held-out
    pair; the other categories name no colour and `scene_for` gives the scene a held-out pair.
    """
    if category is None:
        category = CATEGORIES[rng.integers(len(CATEGORIES))]
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}: expected one of {', '.join(CATEGORIES)}")
    pairs = pairs_for(split)

    def shapes(k):
        return [SHAPES[i] for i in rng.choice(len(SHAPES), size=k, replace=False)]

    relation = None
    if category == "single_object":
        groups = [{"shape": shapes(1)[0], "color": None, "count": 1}]
    elif category in ("two_object", "position"):
        groups = [{"shape": s, "color": None, "count": 1} for s in shapes(2)]
        if category == "position":
            relation = RELATIONS[rng.integers(len(RELATIONS))]
    elif category == "counting":
        groups = [{"shape": shapes(1)[0], "color": None, "count": int(rng.integers(1, 5))}]
    elif category == "colors":
        shape, color = HELD_OUT[rng.integers(len(HELD_OUT))] if split == "test" else pairs[rng.integers(len(pairs))]
        groups = [{"shape": shape, "color": color, "count": 1}]
    else:  # color_attr: two different shapes in two different colours
        while True:
            (s1, c1), (s2, c2) = (pairs[i] for i in rng.choice(len(pairs), size=2, replace=False))
            if split == "test":
                s1, c1 = HELD_OUT[rng.integers(len(HELD_OUT))]
            if s1 != s2 and c1 != c2:
                break
        groups = [{"shape": s1, "color": c1, "count": 1}, {"shape": s2, "color": c2, "count": 1}]
        if rng.integers(2):
            groups.reverse()
    return {"category": category, "objects": groups, "relation": relation}


def prompt(rng: np.random.Generator, split: str = "train", category: str | None = None) -> tuple[str, dict]:
    """(text, spec): a random prompt of `split` and the structured spec the scorer checks."""
    spec = sample_spec(rng, split, category)
    return describe(spec, rng), spec


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, minimum: float = RELATION_MIN) -> bool:
    """Whether centre `a` is `relation` of centre `b` (x right, y down; fractions of the image)."""
    dx, dy = a[0] - b[0], a[1] - b[1]
    along, across = {"left": (-dx, dy), "right": (dx, dy), "above": (-dy, dx), "below": (dy, dx)}[relation]
    return along >= minimum and along > abs(across)


def scene_for(spec: dict, rng: np.random.Generator, split: str = "train") -> Scene:
    """A random scene holding exactly the objects of `spec` (and satisfying its relation).

    Colours the spec leaves open come from the split's pairs; a test scene always holds a held-out pair.
    """
    pairs = pairs_for(split)
    while True:
        objects = []
        for g in spec["objects"]:
            for _ in range(g["count"]):
                color = g.get("color")
                if color is None:
                    allowed = [c for s, c in pairs if s == g["shape"]]
                    color = allowed[rng.integers(len(allowed))]
                objects.append([g["shape"], color, SIZES[rng.integers(len(SIZES))]])
        if split == "test" and not any((s, c) in HELD_OUT for s, c, _ in objects):
            free = [o for o, g in zip(objects, _group_of(spec)) if g.get("color") is None]
            if not free:
                raise ValueError(f"a test-split spec must name or leave open a held-out pair: {spec}")
            o = free[rng.integers(len(free))]
            o[1] = dict(HELD_OUT)[o[0]]
        relation = spec.get("relation")
        accept = None
        if relation:  # twice the scorer's minimum offset, and clearly dominant
            def accept(centres):
                return relation_holds(centres[0], centres[1], relation, 2 * RELATION_MIN) and \
                    _dominance(centres[0], centres[1], relation) >= 2.0
        centres = place(rng, [o[2] for o in objects], accept=accept)
        if centres is not None:
            break
    objs = tuple(SceneObject(s, c, z, x, y) for (s, c, z), (x, y) in zip(objects, centres))
    return Scene(objs, sample_background(rng))


def _group_of(spec: dict) -> list[dict]:
    """The spec group of each object, in scene_for's order."""
    return [g for g in spec["objects"] for _ in range(g["count"])]


def _dominance(a, b, relation: str) -> float:
    dx, dy = abs(a[0] - b[0]), abs(a[1] - b[1])
    along, across = (dx, dy) if relation in ("left", "right") else (dy, dx)
    return along / max(across, 1e-9)
