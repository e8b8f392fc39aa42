"""The scenes world, its captions, edits, scorer and dataset writer (docs/SCENES.md)."""
import numpy as np
import pytest

from trainer.scenes import world
from trainer.scenes.world import (
    COLORS, HELD_OUT, NUM_CLASSES, SHAPES, Scene, SceneObject, label_grid, object_masks, render,
    rng_for, sample_scene,
)


def _scene(split, seed, **kw):
    return sample_scene(rng_for(split, seed), split, **kw)


def test_world_is_deterministic_and_seeds_differ():
    a, b = render(_scene("train", 3)), render(_scene("train", 3))
    assert a.size == (256, 256) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert _scene("train", 3) == _scene("train", 3)
    assert render(_scene("train", 4)).tobytes() != a.tobytes()
    assert _scene("val", 3) != _scene("train", 3)  # disjoint streams per split


def test_world_vocabulary():
    assert {"circle", "square", "triangle", "star", "heart", "hexagon"} <= set(SHAPES)
    assert {"red", "green", "blue", "yellow", "purple", "orange", "white", "black"} <= set(COLORS)
    assert NUM_CLASSES == 1 + len(SHAPES) * len(COLORS)
    with pytest.raises(ValueError, match="unknown split"):
        _scene("training", 0)


def test_held_out_pairs_never_in_train_or_val_and_in_every_test_scene():
    seen = {"train": set(), "val": set()}
    for split in seen:
        for seed in range(300):
            seen[split] |= {(o.shape, o.color) for o in _scene(split, seed).objects}
    for split, pairs in seen.items():
        assert not pairs & set(HELD_OUT), split
        assert len(pairs) == len(SHAPES) * len(COLORS) - len(HELD_OUT), split  # all the others occur
    for seed in range(100):
        assert any((o.shape, o.color) in HELD_OUT for o in _scene("test", seed).objects)


def test_objects_keep_free_space_and_the_margin():
    for seed in range(200):
        objs = _scene("train", seed).objects
        assert 1 <= len(objs) <= 4
        for i, o in enumerate(objs):
            assert world.EDGE_MARGIN <= o.x - o.radius and o.x + o.radius <= 1 - world.EDGE_MARGIN
            assert world.EDGE_MARGIN <= o.y - o.radius and o.y + o.radius <= 1 - world.EDGE_MARGIN
            for p in objs[i + 1:]:
                assert np.hypot(o.x - p.x, o.y - p.y) >= o.radius + p.radius + world.GAP


def test_render_paints_each_object_in_its_colour_and_masks_match():
    bg = world.Background("flat", (128, 128, 128), (128, 128, 128), 0.0, 1)
    objs = tuple(SceneObject(s, c, "large", x, y) for s, c, x, y in [
        ("circle", "red", 0.25, 0.25), ("square", "white", 0.75, 0.25),
        ("hexagon", "black", 0.25, 0.75), ("star", "yellow", 0.75, 0.75)])
    scene = Scene(objs, bg)
    img = np.asarray(render(scene), np.float32)
    masks = object_masks(scene)
    assert masks.shape == (4, 256, 256) and masks.max() == 1.0
    assert ((masks > 0.1) & (masks < 0.9)).any()  # anti-aliased edges
    for o, m in zip(objs, masks):
        inside = img[m == 1].mean(axis=0)
        assert np.abs(inside - COLORS[o.color]).max() < 25, (o, inside)
    outside = img[masks.sum(0) == 0].mean(axis=0)
    assert np.abs(outside - 128).max() < 5


def test_label_grid_names_the_object_covering_each_cell():
    bg = world.Background("flat", (128, 128, 128), (128, 128, 128), 0.0, 1)
    o = SceneObject("square", "blue", "large", 0.5, 0.5)
    grid = label_grid(Scene((o,), bg))
    assert grid.dtype == np.int64 and grid.shape == (16, 16)
    assert grid[8, 8] == o.label == 1 + SHAPES.index("square") * len(COLORS) + list(COLORS).index("blue")
    assert grid[0, 0] == 0
    # The square spans pixels 103.6..152.4: 4 x 4 cells, each edge cell 52 % covered, so the four
    # corner cells (27 %) stay background.
    rows, cols = np.nonzero(grid == o.label)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (6, 9, 6, 9)
    assert (grid == o.label).sum() == 12 and grid[6, 6] == grid[9, 9] == 0
    assert world.class_name(o.label) == "blue square"


# ---- captions ----------------------------------------------------------------------------------

from collections import Counter  # noqa: E402
import json  # noqa: E402

from trainer.scenes import captions  # noqa: E402
from trainer.scenes.captions import CATEGORIES, prompt, relation_holds, scene_for  # noqa: E402


def _matches(scene, spec):
    """The scene holds exactly the spec's objects (groups always have different shapes)."""
    groups = spec["objects"]
    shapes = Counter(o.shape for o in scene.objects)
    return shapes == Counter({g["shape"]: g["count"] for g in groups}) and all(
        o.color == g["color"] for g in groups if g["color"] for o in scene.objects if o.shape == g["shape"])


def test_captions_cover_the_six_categories_with_varied_wording():
    rng = np.random.default_rng(0)
    texts = {c: set() for c in CATEGORIES}
    for _ in range(600):
        text, spec = prompt(rng)
        assert json.loads(json.dumps(spec)) == spec
        texts[spec["category"]].add(text.split(" ")[0] + text.split(" ")[1])  # the wording's opening
    assert set(CATEGORIES) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    for category, openings in texts.items():
        assert len(openings) >= 3, category
    counts = {prompt(rng, category="counting")[1]["objects"][0]["count"] for _ in range(100)}
    assert counts == {1, 2, 3, 4}
    assert prompt(np.random.default_rng(1), category="counting")[0] == \
        prompt(np.random.default_rng(1), category="counting")[0]
    with pytest.raises(ValueError, match="unknown category"):
        prompt(rng, category="colour")


@pytest.mark.parametrize("split", ["train", "test"])
def test_scene_for_satisfies_the_spec_exactly(split):
    rng = np.random.default_rng(5)
    for category in CATEGORIES:
        for _ in range(40):
            text, spec = prompt(rng, split, category)
            scene = scene_for(spec, rng, split)
            assert _matches(scene, spec), (text, scene.objects)
            pairs = {(o.shape, o.color) for o in scene.objects}
            if split == "test":
                assert pairs & set(HELD_OUT), (text, pairs)
            else:
                assert not pairs & set(HELD_OUT), (text, pairs)
            if spec["relation"]:
                a, b = scene.objects
                assert relation_holds((a.x, a.y), (b.x, b.y), spec["relation"], 2 * captions.RELATION_MIN)
                assert not relation_holds((b.x, b.y), (a.x, a.y), spec["relation"])


def test_relation_words_follow_image_axes():
    assert relation_holds((0.2, 0.5), (0.6, 0.5), "left") and not relation_holds((0.2, 0.5), (0.6, 0.5), "right")
    assert relation_holds((0.5, 0.2), (0.5, 0.6), "above")  # y grows downwards
    assert not relation_holds((0.2, 0.1), (0.3, 0.9), "left")  # mostly above, not left


# ---- scorer ------------------------------------------------------------------------------------

from trainer.scenes import scorer, validate  # noqa: E402


def test_scorer_detects_every_object_of_clean_test_renders():
    for seed in range(30):
        scene = _scene("test", seed)
        found = scorer.detect(render(scene))
        assert sorted((d.shape, d.color, d.size) for d in found) == \
            sorted((o.shape, o.color, o.size) for o in scene.objects), seed
        for d in found:  # each detection sits on its object's centre
            assert min(np.hypot(d.x - o.x, d.y - o.y) for o in scene.objects) < 0.03


def test_scorer_passes_clean_test_prompts_and_fails_mismatched_ones():
    rng = np.random.default_rng(11)
    results, false_passes, wrong = [], 0, 0
    for category in CATEGORIES:
        for _ in range(10):
            _, spec = prompt(rng, "test", category)
            result = scorer.score(render(scene_for(spec, rng, "test")), spec)
            assert result["passed"], (spec, result)
            results.append(result)
            other = scene_for(prompt(rng, "test", category)[1], rng, "test")
            if not all(scorer.check(other.objects, spec).values()):  # truly wrong for this spec
                wrong += 1
                false_passes += scorer.score(render(other), spec)["passed"]
    summary = scorer.summarise(results)
    assert summary["overall"] == 1.0 and set(summary["categories"]) == set(CATEGORIES)
    assert wrong > 40 and false_passes == 0


@pytest.mark.parametrize("kind", ["noise4", "noise8", "blobs", "ellipses"])
def test_scorer_fails_garbage_images(kind):
    # Untrained generators paint smooth colour mush and blobs: no prompt may pass on them (the old
    # scorer passed single objects, counts and positions on 2-4-step generators' images).
    passed = []
    for seed in range(6):
        image = validate.garbage(kind, seed)
        for category in ("single_object", "counting", "position"):
            _, spec = prompt(np.random.default_rng([seed, len(category)]), "test", category)
            passed.append(scorer.score(image, spec)["passed"])
    assert not any(passed)


def test_check_follows_geneval_rules():
    objs = [SceneObject("circle", "red", "small", 0.2, 0.5), SceneObject("circle", "blue", "large", 0.8, 0.5),
            SceneObject("square", "red", "small", 0.5, 0.44)]
    spec = {"category": "counting", "objects": [{"shape": "circle", "color": None, "count": 2}], "relation": None}
    assert scorer.check(objs, spec) == {"count 2 circle": True}
    spec["objects"][0]["count"] = 3
    assert scorer.check(objs, spec) == {"count 3 circle": False}
    spec = {"category": "color_attr", "relation": None,
            "objects": [{"shape": "circle", "color": "blue", "count": 1}, {"shape": "square", "color": "blue", "count": 1}]}
    assert scorer.check(objs, spec) == {"present blue circle": True, "present blue square": False}
    spec = {"category": "position", "relation": "left",
            "objects": [{"shape": "circle", "color": None, "count": 1}, {"shape": "square", "color": None, "count": 1}]}
    assert scorer.check(objs, spec)["circle left square"]  # the red circle at x=0.2 is
    spec["relation"] = "below"
    assert scorer.check(objs, spec)["circle below square"] is False  # 0.06 lower: under RELATION_MIN
    objs[2] = SceneObject("square", "red", "small", 0.5, 0.2)
    assert scorer.check(objs, spec)["circle below square"] is False  # 0.3 lower, but 0.3 aside too


# ---- edits -------------------------------------------------------------------------------------

from trainer.scenes import edits  # noqa: E402
from trainer.scenes.edits import KINDS, edit_region, make_edit  # noqa: E402


@pytest.mark.parametrize("kind", KINDS)
def test_edit_targets_differ_from_sources_only_inside_the_edit_region(kind):
    rng = np.random.default_rng(KINDS.index(kind))
    made = 0
    for seed in range(25):
        scene = _scene("train", seed)
        try:
            instruction, target, spec = make_edit(scene, rng, kind=kind)
        except ValueError:
            continue  # e.g. "add" to a scene of four objects
        made += 1
        assert json.loads(json.dumps(spec)) == spec and spec["kind"] == kind
        assert Scene.from_dict(spec["target"]) == target and Scene.from_dict(spec["source"]) == scene
        changed = (np.asarray(render(scene)) != np.asarray(render(target))).any(-1)
        region = edit_region(spec)
        assert changed.any() and not (changed & ~region).any(), instruction
        assert region.mean() < (1 if kind == "background" else 0.3)
        pairs = {(o.shape, o.color) for o in target.objects}
        assert not pairs & set(HELD_OUT), instruction  # train edits never make a held-out pair
    assert made >= 12


def test_edit_instructions_name_the_change():
    bg = world.Background("flat", (128, 128, 128), (110, 110, 110), 0.0, 1)
    scene = Scene((SceneObject("circle", "red", "small", 0.2, 0.2), SceneObject("star", "blue", "large", 0.7, 0.7)), bg)
    rng = np.random.default_rng(0)
    text, target, spec = make_edit(scene, rng, kind="remove")
    assert target.objects in (scene.objects[:1], scene.objects[1:])
    assert (scene.objects[spec["before"][0]].color + " " + scene.objects[spec["before"][0]].shape) in text
    text, target, spec = make_edit(scene, rng, kind="move")
    moved = target.objects[spec["after"][0]]
    assert list(edits.cell_of(moved.x, moved.y)) == spec["cell"] and edits.CELLS[tuple(spec["cell"])] in text
    text, target, spec = make_edit(scene, rng, kind="recolor")
    assert target.objects[spec["after"][0]].color in text
    with pytest.raises(ValueError, match="unknown edit kind"):
        make_edit(scene, rng, kind="rotate")


def test_scorer_checks_edits_and_fails_undone_ones():
    rng = np.random.default_rng(3)
    for seed in range(14):
        scene = _scene("test", seed)
        try:
            _, target, spec = make_edit(scene, rng, "test", kind=KINDS[seed % len(KINDS)])
        except ValueError:  # e.g. "add" to a scene of four objects
            _, target, spec = make_edit(scene, rng, "test")
        result = scorer.score_edit(render(target), spec)
        assert result["passed"], (spec["instruction"], result)
        assert result["psnr"] == result["pooled_psnr"] == float("inf")
        undone = scorer.score_edit(render(scene), spec)  # the source itself: nothing was edited
        assert not undone["checks"][f"edited ({spec['kind']})"], spec["instruction"]
        other = scorer.score_edit(render(_scene("test", seed + 100)), spec)  # another picture
        assert not other["checks"]["preserved"], spec["instruction"]


# ---- datasets ----------------------------------------------------------------------------------

from trainer.data import build_image_dataset  # noqa: E402
from trainer.scenes import datasets  # noqa: E402
from trainer.scenes.__main__ import main as scenes_main  # noqa: E402
from trainer.data import open_edit, open_t2i  # noqa: E402


def test_writer_round_trips_through_the_trainers_data_readers(tmp_path):
    assert scenes_main(["write", "--kind", "images", "--count", "6", "--seed", "2", "--out",
                        str(tmp_path / "images"), "--workers", "1"]) == 0
    ds, report = build_image_dataset(str(tmp_path / "images"), 256)
    assert len(ds) == 6
    rows = [json.loads(line) for line in (tmp_path / "images" / "scenes.jsonl").read_text().splitlines()]
    first = ds[0]["image"]
    assert first.shape == (3, 256, 256)
    expected = np.asarray(render(Scene.from_dict(rows[0]["scene"])))
    assert np.array_equal(first.permute(1, 2, 0).numpy(), expected)  # exact, lossless
    manifest_ds, _ = build_image_dataset(str(tmp_path / "images" / "scenes.jsonl"), 256)
    assert len(manifest_ds) == 6

    datasets.write(tmp_path / "t2i", "t2i", "val", 5, seed=1, workers=1)
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "t2i" / "captions.jsonl").read_text().splitlines())}
    for source in (tmp_path / "t2i", tmp_path / "t2i" / "captions.jsonl"):
        t2i = open_t2i(source)
        assert len(t2i) == 5
        for i in range(5):
            item = t2i[i]
            row = rows[item["key"].removesuffix(".png")]  # the folder's key is the file name
            assert item["text"] == row["text"]
            assert np.array_equal((item["image"].permute(1, 2, 0).numpy() * 255).round(),
                                  np.asarray(render(Scene.from_dict(row["scene"]))))
    assert all(scorer.score(render(Scene.from_dict(r["scene"])), r["spec"])["passed"] for r in rows.values())

    datasets.write(tmp_path / "edit", "edit", "train", 4, seed=1, workers=1)
    edit = open_edit(tmp_path / "edit")
    assert len(edit) == 4
    rows = {r["name"]: r for r in map(json.loads, (tmp_path / "edit" / "instructions.jsonl").read_text().splitlines())}
    for i in range(4):
        item = edit[i]
        row = rows[item["key"]]
        assert item["text"] == row["instruction"] == row["spec"]["instruction"]
        for field, scene in (("source", row["spec"]["source"]), ("image", row["spec"]["target"])):
            assert np.array_equal((item[field].permute(1, 2, 0).numpy() * 255).round(),
                                  np.asarray(render(Scene.from_dict(scene)))), field


def test_writer_is_deterministic_for_any_worker_count(tmp_path):
    datasets.write(tmp_path / "a", "edit", "test", 6, seed=4, workers=1)
    datasets.write(tmp_path / "b", "edit", "test", 6, seed=4, workers=2)
    for rel in ["instructions.jsonl", "source/000005.png", "target/000003.png"]:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    datasets.write(tmp_path / "c", "edit", "test", 6, seed=5, workers=1)
    assert (tmp_path / "c" / "instructions.jsonl").read_bytes() != (tmp_path / "a" / "instructions.jsonl").read_bytes()


# ---- scorer validation -------------------------------------------------------------------------



def test_near_misses_are_truly_wrong():
    rng = np.random.default_rng(2)
    for category in CATEGORIES:
        for _ in range(30):
            _, spec = prompt(rng, "test", category)
            miss = validate.near_miss(spec, rng)
            assert miss != spec and miss["category"] == category
            assert not all(scorer.check(scene_for(miss, rng, "val").objects, spec).values()), (spec, miss)


def test_validate_scorer_table(capsys):
    assert scenes_main(["validate-scorer", "--per-category", "1", "--degraded-per-category", "0", "--per-kind", "1",
                        "--garbage-per-kind", "1", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "| clean | 6 | 100.0 |" in out and "| blur2 | 0 |" in out and "Near misses" in out and "pooled PSNR" in out
    assert out.count("| jpeg30 |") == 2  # the GenEval and the edit tables
    for kind in validate.GARBAGE:  # one image of each, failing every category
        assert f"| {kind} | 1 |" in out and out.split(f"| {kind} | 1 |")[1].split("\n")[0].endswith(" | 0.0 |")
