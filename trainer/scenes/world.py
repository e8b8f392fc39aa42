"""The scenes world: seeded 2-D scenes of coloured shapes whose truth is known exactly (docs/SCENES.md).

A scene is 1-4 non-overlapping objects (shape, colour, size, centre) on a textured, lit background.
`render` is exact and deterministic (same scene -> same bytes); objects are anti-aliased by drawing
their masks at 4x and box-filtering down. Backgrounds are low-chroma mid-grey tints, so they never
collide with an object colour: white stays far lighter, black far darker, the rest far more saturated.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "heart", "hexagon")
COLORS = {
    "red": (215, 35, 35),
    "green": (40, 165, 60),
    "blue": (40, 85, 215),
    "yellow": (240, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 125, 25),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
# Bounding radius (fraction of the image side) of each size: every shape fits in this circle.
RADIUS = {"small": 0.08, "large": 0.14}
NUM_CLASSES = 1 + len(SHAPES) * len(COLORS)

SPLITS = ("train", "val", "test")
# Colour-shape pairs that never appear in train/val; every test scene holds at least one of them.
# One per shape and six different colours, so the test split probes each shape and colour name.
HELD_OUT = (
    ("circle", "purple"),
    ("square", "orange"),
    ("triangle", "white"),
    ("star", "blue"),
    ("heart", "green"),
    ("hexagon", "yellow"),
)
ALL_PAIRS = tuple((s, c) for s in SHAPES for c in COLORS)
TRAIN_PAIRS = tuple(p for p in ALL_PAIRS if p not in HELD_OUT)

BACKGROUND_STYLES = ("flat", "gradient", "radial", "stripes", "checker", "blotches")
EDGE_MARGIN = 0.03  # free space between an object's bounding circle and the image border
GAP = 0.04  # free space between two objects' bounding circles
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    x: float  # centre, 0..1 of the image width (left to right)
    y: float  # centre, 0..1 of the image height (top to bottom)

    @property
    def radius(self) -> float:
        return RADIUS[self.size]

    @property
    def label(self) -> int:
        """Class id in `label_grid` (0 is background)."""
        return 1 + SHAPES.index(self.shape) * len(COLORS) + COLOR_NAMES.index(self.color)


@dataclass(frozen=True)
class Background:
    style: str  # one of BACKGROUND_STYLES
    tint: tuple[int, int, int]  # main tint (low chroma, mid lightness)
    tint2: tuple[int, int, int]  # second tint for gradients and patterns
    light: float  # direction the light comes from, radians (lights the background and the objects)
    seed: int  # seeds the grain and pattern noise


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    background: Background

    def with_objects(self, objects) -> "Scene":
        return replace(self, objects=tuple(objects))

    def to_dict(self) -> dict:
        """JSON-able form, lists for tuples (manifests, edit specs); `Scene.from_dict` inverts it exactly."""
        bg = asdict(self.background)
        bg["tint"], bg["tint2"] = list(bg["tint"]), list(bg["tint2"])
        return {"objects": [asdict(o) for o in self.objects], "background": bg}

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        bg = dict(d["background"])
        bg["tint"], bg["tint2"] = tuple(bg["tint"]), tuple(bg["tint2"])
        return Scene(tuple(SceneObject(**o) for o in d["objects"]), Background(**bg))


def class_name(label: int) -> str:
    """'background' or 'red circle' for a `label_grid` class id."""
    if label == 0:
        return "background"
    shape, color = divmod(label - 1, len(COLORS))
    return f"{COLOR_NAMES[color]} {SHAPES[shape]}"


def rng_for(split: str, seed: int, index: int = 0) -> np.random.Generator:
    """The generator for item `index` of the set `seed` of `split`: the splits draw from disjoint streams.

    Always three words of entropy: numpy pads shorter seed lists with zeros, so [split, seed] would
    collide with [split, seed, 0].
    """
    _check_split(split)
    return np.random.default_rng([SPLITS.index(split), seed, index])


def pairs_for(split: str) -> tuple[tuple[str, str], ...]:
    """Colour-shape pairs a split may use (test may use any, and each test scene uses a held-out one)."""
    _check_split(split)
    return ALL_PAIRS if split == "test" else TRAIN_PAIRS


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


# ---- sampling ----------------------------------------------------------------------------------

def sample_background(rng: np.random.Generator) -> Background:
    return Background(
        style=BACKGROUND_STYLES[rng.integers(len(BACKGROUND_STYLES))],
        tint=_sample_tint(rng),
        tint2=_sample_tint(rng),
        light=float(rng.uniform(0, 2 * math.pi)),
        seed=int(rng.integers(2**31)),
    )


def _sample_tint(rng: np.random.Generator) -> tuple[int, int, int]:
    # Lightness 0.38-0.56 and chroma <= 0.1: with lighting, pattern and grain every background pixel
    # keeps its largest channel in 0.28..0.7, while lit white objects stay above 0.78 and black ones
    # below 0.15, and the colours' chroma (>= 0.4) is four times the backgrounds'.
    value = rng.uniform(0.38, 0.56)
    chroma = rng.uniform(0.0, 0.1)
    hue = rng.uniform(0, 2 * math.pi)
    offsets = np.cos(hue - np.array([0.0, 2.0944, 4.1888]))  # r, g, b around the grey axis
    rgb = np.clip(value + chroma * value * offsets, 0, 1)
    return tuple(int(round(v * 255)) for v in rgb)


def place(rng: np.random.Generator, sizes, tries: int = 200, accept=None) -> list[tuple[float, float]] | None:
    """Free, non-overlapping centres for objects of `sizes`; None if none found in `tries` attempts.

    `accept(centres)` may add constraints (e.g. a relative position) checked on each full draw.
    """
    radii = [RADIUS[s] for s in sizes]
    for _ in range(tries):
        centres: list[tuple[float, float]] = []
        for r in radii:
            lo, hi = r + EDGE_MARGIN, 1 - r - EDGE_MARGIN
            for _ in range(50):
                c = (float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)))
                if all(math.dist(c, o) >= r + ro + GAP for o, ro in zip(centres, radii)):
                    centres.append(c)
                    break
            else:
                break
        if len(centres) == len(radii) and (accept is None or accept(centres)):
            return centres
    return None


def sample_scene(rng: np.random.Generator, split: str = "train", n_objects: int | None = None) -> Scene:
    """A random scene of `split`: 1-4 objects (or `n_objects`); test scenes hold >= 1 held-out pair."""
    pairs = pairs_for(split)
    n = int(rng.integers(1, 5)) if n_objects is None else n_objects
    if not 1 <= n <= 4:
        raise ValueError(f"n_objects must be 1..4, got {n}")
    while True:
        chosen = [pairs[i] for i in rng.integers(len(pairs), size=n)]
        if split == "test":
            chosen[int(rng.integers(n))] = HELD_OUT[rng.integers(len(HELD_OUT))]
        sizes = [SIZES[i] for i in rng.integers(len(SIZES), size=n)]
        centres = place(rng, sizes)
        if centres is not None:
            break
    objects = tuple(SceneObject(s, c, z, x, y) for (s, c), z, (x, y) in zip(chosen, sizes, centres))
    return Scene(objects, sample_background(rng))


# ---- geometry ----------------------------------------------------------------------------------

def _outline(shape: str) -> list[tuple[float, float]] | None:
    """Polygon of `shape` in units of the bounding radius, centred on 0 (y down); None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.68
        return [(-h, -h), (h, -h), (h, h), (-h, h)]
    if shape == "triangle":  # pointing up, centroid at 0
        return [(math.cos(a), math.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "hexagon":
        return [(0.92 * math.cos(a), 0.92 * math.sin(a)) for a in np.radians(np.arange(0, 360, 60))]
    if shape == "star":
        pts = []
        for k in range(10):
            a = math.radians(-90 + 36 * k)
            r = 1.0 if k % 2 == 0 else 0.45
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        y = y + 2.5  # centre the bounding box (-14.5 .. 19.5 -> about -17 .. 17)
        return list(zip(x / 17.5, y / 17.5))
    raise ValueError(f"unknown shape {shape!r}: expected one of {', '.join(SHAPES)}")


def object_coverage(obj: SceneObject, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Anti-aliased coverage (0..1) of `obj` on a `size` image, as (patch, (top, left))."""
    r = obj.radius * size
    cx, cy = obj.x * size, obj.y * size
    left, top = max(int(math.floor(cx - r)) - 1, 0), max(int(math.floor(cy - r)) - 1, 0)
    right, bottom = min(int(math.ceil(cx + r)) + 1, size), min(int(math.ceil(cy + r)) + 1, size)
    ss = _SUPERSAMPLE
    canvas = Image.new("L", ((right - left) * ss, (bottom - top) * ss), 0)
    draw = ImageDraw.Draw(canvas)
    ox, oy = (cx - left) * ss, (cy - top) * ss
    outline = _outline(obj.shape)
    if outline is None:
        rr = 0.9 * r * ss
        draw.ellipse([ox - rr, oy - rr, ox + rr, oy + rr], fill=255)
    else:
        draw.polygon([(ox + px * r * ss, oy + py * r * ss) for px, py in outline], fill=255)
    hi = np.asarray(canvas, dtype=np.float32) / 255.0
    h, w = bottom - top, right - left
    return hi.reshape(h, ss, w, ss).mean(axis=(1, 3)), (top, left)


def object_masks(scene: Scene, size: int = 256) -> np.ndarray:
    """Coverage of each object on a `size` image: float32 (n_objects, size, size) in 0..1."""
    masks = np.zeros((len(scene.objects), size, size), np.float32)
    for i, obj in enumerate(scene.objects):
        patch, (top, left) = object_coverage(obj, size)
        masks[i, top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    return masks


def label_grid(scene: Scene, grid: int = 16) -> np.ndarray:
    """Per-cell class (int64 (grid, grid)): the object covering most of the cell, or 0 if background does."""
    cell = max(1, 256 // grid)
    size = grid * cell
    masks = object_masks(scene, size)
    covers = masks.reshape(len(scene.objects), grid, cell, grid, cell).mean(axis=(2, 4))
    background = 1.0 - covers.sum(axis=0, keepdims=True)
    winner = np.concatenate([background, covers]).argmax(axis=0)
    labels = np.array([0] + [o.label for o in scene.objects], dtype=np.int64)
    return labels[winner]


# ---- rendering ---------------------------------------------------------------------------------

def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c)  # xx, yy in 0..1


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth value noise in -1..1 (bicubic upsampling of a cells x cells random grid)."""
    coarse = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = Image.fromarray(coarse, "L").resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 127.5 - 1.0


def _background(bg: Background, size: int, rng: np.random.Generator) -> np.ndarray:
    xx, yy = _grid(size)
    t1, t2 = (np.array(t, np.float32) / 255 for t in (bg.tint, bg.tint2))
    pattern_angle = bg.light + 1.0
    u = (xx - 0.5) * math.cos(pattern_angle) + (yy - 0.5) * math.sin(pattern_angle)
    if bg.style == "flat":
        mix = np.zeros_like(xx)
    elif bg.style == "gradient":
        mix = np.clip(u + 0.5, 0, 1)
    elif bg.style == "radial":
        mix = np.clip(np.hypot(xx - 0.5, yy - 0.5) * 1.6, 0, 1)
    elif bg.style == "stripes":
        mix = 0.5 + 0.5 * np.sin(u * 2 * math.pi * 9)
    elif bg.style == "checker":
        mix = ((np.floor(xx * 8) + np.floor(yy * 8)) % 2).astype(np.float32)
    elif bg.style == "blotches":
        mix = 0.5 + 0.5 * _smooth_noise(rng, size, 6)
    else:
        raise ValueError(f"unknown background style {bg.style!r}")
    img = t1 + (t2 - t1) * mix[..., None] * 0.6
    return img * _lighting(bg.light, xx, yy, 0.5, 0.5, 0.5, 0.08)[..., None]


def _lighting(light: float, xx, yy, cx, cy, extent, strength) -> np.ndarray:
    """Multiplicative light falloff: 1 + strength at the lit side of a disc of `extent`, 1 - strength opposite."""
    d = ((xx - cx) * math.cos(light) + (yy - cy) * math.sin(light)) / extent
    return 1.0 + strength * np.clip(d, -1, 1)


def _texture(obj: SceneObject, bg_seed: int, xx, yy, grain) -> np.ndarray:
    """Low-contrast surface pattern of an object (-1..1), fixed by the object and the scene's seed."""
    key = zlib.crc32(f"{obj.shape}/{obj.color}/{obj.size}/{bg_seed}".encode())
    kind = key % 4
    angle = (key >> 2) % 180 * math.pi / 180
    period = 0.018 + ((key >> 10) % 8) * 0.003
    u = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:  # grain only
        return grain
    if kind == 1:  # stripes
        return 0.6 * np.sin(u * 2 * math.pi / period) + 0.4 * grain
    if kind == 2:  # dots
        v = -xx * math.sin(angle) + yy * math.cos(angle)
        return 0.6 * np.sin(u * 2 * math.pi / period) * np.sin(v * 2 * math.pi / period) + 0.4 * grain
    return 1.6 * grain  # speckle


def render(scene: Scene, size: int = 256) -> Image.Image:
    """The scene as an RGB image of `size` pixels (exact: the same scene always gives the same bytes)."""
    bg = scene.background
    rng = np.random.default_rng(bg.seed)
    # Grains first: they must not depend on the style, so a background edit leaves objects unchanged.
    bg_grain = rng.normal(0, 1, (size, size)).astype(np.float32)
    obj_grain = np.clip(rng.normal(0, 0.5, (size, size)).astype(np.float32), -1, 1)
    img = _background(bg, size, rng) + 0.012 * bg_grain[..., None]
    xx, yy = _grid(size)
    for obj in scene.objects:
        patch, (top, left) = object_coverage(obj, size)
        h, w = patch.shape
        sl = (slice(top, top + h), slice(left, left + w))
        base = np.array(COLORS[obj.color], np.float32) / 255
        shade = _lighting(bg.light, xx[sl], yy[sl], obj.x, obj.y, obj.radius, 0.12) - 1.0
        tex = _texture(obj, bg.seed, xx[sl], yy[sl], obj_grain[sl])
        # Multiplicative shading for colours, plus a small additive part so black objects show it too.
        colour = base * (1 + shade[..., None]) + 0.1 * shade[..., None] + 0.03 * tex[..., None]
        a = patch[..., None]
        img[sl] = img[sl] * (1 - a) + colour * a
    return Image.fromarray(np.clip(np.rint(img * 255), 0, 255).astype(np.uint8), "RGB")
