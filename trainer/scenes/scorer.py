"""The scenes scorer, by code: find the objects in an image and check a prompt's spec (docs/SCENES.md).

Detection: light Gaussian smoothing (against noise), then each pixel is named by colour: chroma
(max - min channel) >= CHROMA_MIN names it by the nearest palette hue; otherwise a largest channel
>= WHITE_MIN is white, <= BLACK_MAX black, anything between is background (the world's backgrounds
are low-chroma mid-greys). Connected coloured regions of at least MIN_AREA pixels are objects, of
their pixels' majority colour. Each object's coverage is unmixed from its colour and the local
background (`_refine`); its shape is the world template (sharp or blurred) with the best soft IoU
after centring and scaling to the same area, its size the nearer of the two template areas.
A region counts as an object only if it is well formed (`_well_formed`): one colour, on background
all around, matching its template closely, of one of the two sizes. Untrained generators paint
smooth colour noise and blobs; without these tests their patches pass as shapes.

Checks (GenEval's rules): each object group of the spec must be found (>= count objects of that shape,
of that colour when it names one; exactly `count` of the shape for "counting"), and a relation must
hold between a found object of the first group and one of the second. `check` applies the same
rules to any object list, so `check(scene.objects, spec)` is the truth the scorer is validated on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from .captions import CATEGORIES, relation_holds
from .world import COLORS, SHAPES, SIZES, Scene, SceneObject, object_coverage, render

SIZE = 256  # images are scored at the world's resolution
CHROMA_MIN = 0.2
WHITE_MIN = 0.74
BLACK_MAX = 0.22
MIN_AREA = 150  # pixels at 256 px; the smallest object (a small star) covers about 660
SMOOTH_SIGMA = 1.0
# Blurs (Gaussian sigma, pixels) the shape templates are made at: generated and degraded images
# have soft edges, and a blurred small hexagon is closer to a sharp circle than to a sharp hexagon.
TEMPLATE_BLURS = (0.0, 1.0, 2.0, 3.0)
_CROP = 32  # side of the scale-normalised masks compared with the templates
# Well-formed objects (validated in docs/SCENES.md: clean and degraded renders against colour noise,
# palette blobs and ellipses, untrained generators' images). Renders under blur 2 / JPEG 30 (40 each)
# kept a soft IoU >= 0.92, their colour on >= 97 % of the region and background on >= 99 % of the ring
# around it, and an area within 10 % of the template's; garbage patches rarely exceed 0.85 IoU.
MATCH_MIN = 0.88  # soft IoU with the best template
HOMOGENEITY_MIN = 0.9  # share of the region's pixels named by its colour
SURROUND_MIN = 0.9  # share of the ring 3-6 px outside the object that is background
AREA_TOLERANCE = 1.25  # area / the template area of its size, within this factor


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    x: float  # centroid, 0..1 of the image
    y: float
    area: int  # pixels at SIZE
    match: float  # soft IoU with the best template


def _hue(rgb: np.ndarray) -> np.ndarray:
    """HSV hue in degrees of float RGB in 0..1 (..., 3)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.maximum(mx - mn, 1e-6)
    h = np.where(mx == r, (g - b) / c % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0


_CHROMATIC = [name for name, rgb in COLORS.items() if max(rgb) - min(rgb) >= CHROMA_MIN * 255]
_HUES = _hue(np.array([COLORS[n] for n in _CHROMATIC], np.float32) / 255)
_NAMES = list(COLORS)
_CHROMATIC_INDEX = np.array([_NAMES.index(n) for n in _CHROMATIC], np.int8)


def color_map(image, smoothed: bool = False) -> np.ndarray:
    """Per-pixel colour index (int8 (SIZE, SIZE)): index in COLORS, or -1 for background."""
    rgb = as_array(image)
    if not smoothed:
        rgb = ndimage.gaussian_filter(rgb, (SMOOTH_SIGMA, SMOOTH_SIGMA, 0))
    mx, mn = rgb.max(-1), rgb.min(-1)
    out = np.full(mx.shape, -1, np.int8)
    out[mx >= WHITE_MIN] = _NAMES.index("white")
    out[mx <= BLACK_MAX] = _NAMES.index("black")
    chromatic = (mx - mn) >= CHROMA_MIN
    dist = np.abs((_hue(rgb[chromatic])[:, None] - _HUES + 180) % 360 - 180)
    out[chromatic] = _CHROMATIC_INDEX[dist.argmin(-1)]
    return out


def as_array(image) -> np.ndarray:
    """Float RGB (SIZE, SIZE, 3) in 0..1 from a PIL image or a uint8 / float array."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
        if image.size != (SIZE, SIZE):
            image = image.resize((SIZE, SIZE), Image.BICUBIC)
        return np.asarray(image, np.float32) / 255.0
    arr = np.asarray(image)
    if arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    if arr.shape[:2] != (SIZE, SIZE):
        return as_array(Image.fromarray(np.clip(np.rint(arr * 255), 0, 255).astype(np.uint8)))
    return arr.astype(np.float32)


def _normalised(coverage: np.ndarray) -> np.ndarray:
    """Soft coverage (0..1) resampled on a _CROP grid centred on its centroid, spanning 2.1 x sqrt(area)
    (every shape fits): translation- and scale-free, so a template of each shape is enough."""
    coverage = np.pad(coverage.astype(np.float32), 2)  # room to interpolate at the edges
    area = float(coverage.sum())
    ys, xs = np.indices(coverage.shape)
    cy, cx = (ys * coverage).sum() / area, (xs * coverage).sum() / area
    half = 1.05 * math.sqrt(area)
    t = (np.arange(_CROP) + 0.5) / _CROP * 2 - 1
    gy, gx = np.meshgrid(cy + t * half, cx + t * half, indexing="ij")
    return ndimage.map_coordinates(coverage, [gy, gx], order=1, cval=0.0)


def _restrict(alpha: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Coverage as the scorer sees it: solid well inside `core`, the soft `alpha` along its edge, 0 beyond."""
    solid = ndimage.binary_erosion(core)
    edge = ndimage.binary_dilation(core, iterations=2) & ~solid
    return np.where(solid, 1.0, np.where(edge, np.clip(alpha, 0, 1), 0.0)).astype(np.float32)


@lru_cache(maxsize=None)
def _templates() -> tuple[list[tuple[str, str]], np.ndarray, dict]:
    """Scale-normalised coverage of every (shape, size) at each TEMPLATE_BLURS blur, as
    (keys, array (K, _CROP, _CROP)), and the area in pixels of each (shape, size) when sharp."""
    keys, maps, areas = [], [], {}
    for shape in SHAPES:
        for size in SIZES:
            patch, _ = object_coverage(SceneObject(shape, "red", size, 0.5, 0.5), SIZE)
            areas[shape, size] = float(patch.sum())
            patch = np.pad(patch, 12)
            for blur in TEMPLATE_BLURS:
                sigma = math.hypot(blur, SMOOTH_SIGMA)
                alpha = ndimage.gaussian_filter(patch, sigma)
                keys.append((shape, size))
                maps.append(_normalised(_restrict(alpha, alpha > 0.5)))
    return keys, np.stack(maps), areas


def classify_shape(coverage: np.ndarray) -> tuple[str, str, float]:
    """(shape, size, soft IoU with the best template) of an object's coverage map."""
    keys, maps, areas = _templates()
    norm = _normalised(coverage)
    iou = np.minimum(maps, norm).sum((1, 2)) / np.maximum(np.maximum(maps, norm).sum((1, 2)), 1e-6)
    best = int(iou.argmax())
    shape = keys[best][0]
    threshold = math.sqrt(areas[shape, "small"] * areas[shape, "large"])
    return shape, "large" if coverage.sum() >= threshold else "small", float(iou[best])


def _well_formed(shape: str, size: str, iou: float, coverage: np.ndarray, colours: np.ndarray,
                 member: np.ndarray, colour: int) -> bool:
    """Whether a candidate region is a clean, solid object of one colour rather than a patch of mush.

    `coverage`: its refined coverage; `colours`: the colour map of the same box; `member`: the
    coloured region it grew from; `colour`: its colour's index."""
    if iou < MATCH_MIN or (colours[member] == colour).mean() < HOMOGENEITY_MIN:
        return False
    ratio = float(coverage.sum()) / _templates()[2][shape, size]
    if not 1 / AREA_TOLERANCE <= ratio <= AREA_TOLERANCE:
        return False
    core = coverage > 0.5
    ring = ndimage.binary_dilation(core, iterations=6) & ~ndimage.binary_dilation(core, iterations=3)
    return bool(ring.any()) and (colours[ring] < 0).mean() >= SURROUND_MIN


def detect(image) -> list[Detection]:
    """The objects found in `image`, in no particular order."""
    rgb = ndimage.gaussian_filter(as_array(image), (SMOOTH_SIGMA, SMOOTH_SIGMA, 0))
    cmap = color_map(rgb, smoothed=True)
    # Objects never touch, so one labelling of all coloured pixels finds them; each takes the colour
    # most of its pixels have (edges and noise may name a few pixels otherwise).
    labels, n = ndimage.label(cmap >= 0)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    boxes = ndimage.find_objects(labels)
    found = []
    for k in np.nonzero(areas[1:] >= MIN_AREA)[0]:
        box = tuple(slice(max(b.start - _PAD, 0), b.stop + _PAD) for b in boxes[k])
        member = labels[box] == k + 1
        colour = int(np.bincount(cmap[box][member], minlength=len(_NAMES)).argmax())
        coverage = _refine(rgb[box], member)
        area = float(coverage.sum())
        if area < MIN_AREA:
            continue
        shape, size, iou = classify_shape(coverage)
        if not _well_formed(shape, size, iou, coverage, cmap[box], member, colour):
            continue
        ys, xs = np.indices(coverage.shape)
        x = ((xs * coverage).sum() / area + box[1].start + 0.5) / SIZE
        y = ((ys * coverage).sum() / area + box[0].start + 0.5) / SIZE
        found.append(Detection(shape, _NAMES[colour], size, float(x), float(y), int(round(area)), iou))
    return found


_PAD = 8


def _refine(rgb: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """The object's estimated coverage (0..1) around a coarse mask of it.

    Pixels are modelled as a mix of the object's colour (median inside the coarse mask) and the local
    background (median of a ring just outside it), as the renderer composites them; unmixing along
    that line gives the coverage, whatever the colour, its shading or a blur of the edges.
    """
    coarse = ndimage.binary_fill_holes(coarse)
    ring = ndimage.binary_dilation(coarse, iterations=6) & ~ndimage.binary_dilation(coarse, iterations=2)
    inner = ndimage.binary_erosion(coarse, iterations=2)
    if not ring.any() or not inner.any():
        return coarse.astype(np.float32)
    bg, fg = np.median(rgb[ring], axis=0), np.median(rgb[inner], axis=0)
    axis = fg - bg
    alpha = (rgb - bg) @ axis / max(float(axis @ axis), 1e-6)
    labels, n = ndimage.label(alpha > 0.5)
    if n == 0:
        return coarse.astype(np.float32)
    overlap = ndimage.sum_labels(coarse, labels, index=np.arange(1, n + 1))
    # Well inside, the object is solid (its shading does not matter); along its edge the coverage is
    # the unmixed value, kept only next to the core so that neighbours and background do not leak in.
    return _restrict(alpha, ndimage.binary_fill_holes(labels == 1 + int(overlap.argmax())))


# ---- checks ------------------------------------------------------------------------------------

def _noun(group: dict) -> str:
    return f"{group['color']} {group['shape']}" if group.get("color") else group["shape"]


def check(objects, spec: dict) -> dict[str, bool]:
    """Per-check pass/fail of `spec` against objects (Detections or SceneObjects): {check name: passed}."""
    groups = spec["objects"]
    results = {}
    matches = []
    for g in groups:
        same_shape = [o for o in objects if o.shape == g["shape"]]
        hits = [o for o in same_shape if g.get("color") in (None, o.color)]
        matches.append(hits)
        if spec["category"] == "counting":
            results[f"count {g['count']} {g['shape']}"] = len(same_shape) == g["count"]
        else:
            results[f"present {_noun(g)}"] = len(hits) >= g["count"]
    if spec.get("relation"):
        a, b = matches[0], matches[1]
        results[f"{_noun(groups[0])} {spec['relation']} {_noun(groups[1])}"] = any(
            relation_holds((p.x, p.y), (q.x, q.y), spec["relation"]) for p in a for q in b if p is not q)
    return results


def score(image, spec: dict) -> dict:
    """{"checks": {name: passed}, "passed": all checks passed, "category": ...} for one image."""
    checks = check(detect(image), spec)
    return {"category": spec["category"], "checks": checks, "passed": all(checks.values())}


def summarise(results: list[dict]) -> dict:
    """GenEval-style accuracy per category (fraction of prompts passing all checks) and overall (their mean)."""
    per = {}
    for c in CATEGORIES:
        rows = [r["passed"] for r in results if r["category"] == c]
        if rows:
            per[c] = sum(rows) / len(rows)
    return {"categories": per, "overall": sum(per.values()) / len(per) if per else float("nan"), "n": len(results)}


# ---- edits -------------------------------------------------------------------------------------

NEAR = 0.06  # an object "is still there" within this distance (objects are >= 0.2 apart)
# Preservation: PSNR vs the source over the 4 x 4-pixel cells wholly outside the edit region, on the
# cells' means. Pooling first ignores what no model can keep (the per-pixel grain) and what mild
# degradations change (noise 0.05: ~38 dB, blur 1: >= 39 dB) but keeps the background's tint and
# pattern: another background over the same objects scores ~28 dB (median). docs/SCENES.md.
PRESERVE_POOL = 4
PRESERVE_PSNR = 30.0


def _found(detections, obj: SceneObject, near: bool = True) -> list[Detection]:
    return [d for d in detections if (d.shape, d.color, d.size) == (obj.shape, obj.color, obj.size)
            and (not near or math.dist((d.x, d.y), (obj.x, obj.y)) < NEAR)]


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """PSNR (dB, peak 1) of float images over the pixels of `mask`."""
    mse = float(((a[mask] - b[mask]) ** 2).mean()) if mask.any() else 0.0
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def pooled_psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, pool: int = PRESERVE_POOL) -> float:
    """PSNR of the pool x pool means of float (S, S, 3) images, over the cells wholly inside `mask`."""
    n = a.shape[0] // pool
    def means(x):
        return x.reshape(n, pool, n, pool, -1).mean(axis=(1, 3))
    return psnr(means(a), means(b), means(mask.astype(np.float32)[..., None])[..., 0] == 1)


def score_edit(image, spec: dict, renders: tuple | None = None) -> dict:
    """Checks of an edited image against an edit spec (edits.make_edit): the instruction was carried
    out ("edited"), untouched objects are still there ("kept ..."), and the pixels outside the edit
    region are preserved (`pooled_psnr` vs the source >= PRESERVE_PSNR; "psnr" is the plain one).

    `renders`: the (source, target) renders as arrays, when the caller has them already.
    """
    from .edits import cell_of, edit_region

    source, target = Scene.from_dict(spec["source"]), Scene.from_dict(spec["target"])
    if renders is None:
        renders = tuple(as_array(render(s, SIZE)) for s in (source, target))
    src, tgt = renders
    arr = as_array(image)
    found = detect(arr)
    region = edit_region(spec, SIZE)
    kind = spec["kind"]
    if kind == "background":
        edited = ((arr - tgt)[region] ** 2).mean() < ((arr - src)[region] ** 2).mean()
    elif kind == "remove":
        old = source.objects[spec["before"][0]]
        edited = not [d for d in found if (d.shape, d.color) == (old.shape, old.color)
                      and math.dist((d.x, d.y), (old.x, old.y)) < NEAR]
    else:
        new = target.objects[spec["after"][0]]
        if kind in ("add", "move"):
            edited = any(list(cell_of(d.x, d.y)) == spec["cell"] for d in _found(found, new, near=False))
            if kind == "move":
                edited = edited and not _found(found, source.objects[spec["before"][0]])
        else:
            edited = bool(_found(found, new))
    checks = {f"edited ({kind})": bool(edited)}
    for i, o in enumerate(source.objects):
        if i not in spec["before"]:
            checks[f"kept {o.color} {o.shape}"] = bool(_found(found, o))
    pooled = pooled_psnr(arr, src, ~region)
    checks["preserved"] = pooled >= PRESERVE_PSNR
    return {"category": kind, "checks": checks, "passed": all(checks.values()),
            "psnr": psnr(arr, src, ~region), "pooled_psnr": pooled}
