import colorsys
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vision_gpt.datasets import (BACKGROUNDS, COLORS, KINDS, Scene, Shape, captions_for, generate_shapes_corpus,
                                 make_scene, outline, render)

COLOR_WORDS = "red|orange|yellow|green|blue|purple"
KIND_WORDS = "circle|square|triangle|star"
NOUN = rf"(?:(small|large) )?({COLOR_WORDS}) ({KIND_WORDS})"
RELATIONS = "to the left of|to the right of|above|below"
VOCABULARY = set(
    "a an and above at background below black blue bottom center circle circles corner gray green in is large left "
    "of on one orange picture purple red right shape shapes single small square squares star stars the there three "
    "to top triangle triangles two white with yellow".split()
)
SMALL_CORPUS = dict(num_train=8, num_val=3, num_test=3, image_size=64)


def random_scenes(count, image_size=96, seed=0):
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        scene = make_scene(rng, image_size)
        yield scene, captions_for(scene, rng)


def gaps(a: Shape, b: Shape):
    """Empty space between the two bounding boxes along x and y (b's box minus a's, signed by direction)."""
    (ax, ay), (bx, by), reach = a.center, b.center, a.radius + b.radius
    return bx - ax, by - ay, abs(bx - ax) - reach, abs(by - ay) - reach


def check_caption(scene: Scene, caption: str):
    """Assert that every fact the caption states is true of the scene's shapes."""
    size, shapes = scene.image_size, scene.shapes
    assert caption == caption.strip() and caption.islower() and not caption.endswith("."), caption
    assert set(caption.replace(",", "").split()) <= VOCABULARY, caption

    def find(size_word, color, kind):
        # An absent size is "" from re.findall: any size matches.
        matches = [s for s in shapes if (s.color, s.kind) == (color, kind) and size_word in ("", s.size)]
        assert matches, f"{caption!r} names a {size_word or ''} {color} {kind} that is not drawn: {shapes}"
        return matches[0]

    named = [find(*match) for match in re.findall(NOUN, caption)]
    for background in re.findall(r"(\w+) background", caption):
        assert background == scene.background, caption
    for plural in re.findall(rf"\b({KIND_WORDS})s\b", caption):
        assert all(s.kind == plural for s in shapes), caption
    counts = {"two": 2, "three": 3, "single": 1, "one": 1}
    for word in re.findall(r"\b(two|three|single|one)\b", caption):
        assert len(shapes) == counts[word], caption
    match = re.fullmatch(rf"a single ({COLOR_WORDS}) shape .*", caption)
    if match:
        assert shapes[0].color == match.group(1), caption
    match = re.fullmatch(rf"one (small|large) ({KIND_WORDS}) .*", caption)
    if match:
        assert (shapes[0].size, shapes[0].kind) == match.groups(), caption
    assert len(named) <= len(shapes), caption

    for a_size, a_color, a_kind, relation, b_size, b_color, b_kind in re.findall(rf"{NOUN} ({RELATIONS}) an? {NOUN}",
                                                                                   caption):
        a, b = find(a_size, a_color, a_kind), find(b_size, b_color, b_kind)
        dx, dy, gap_x, gap_y = gaps(a, b)
        # A stated relation needs a clear empty band between the boxes on its axis, and that axis must be the one
        # with the wider band, so "left of" is never said of a pair that is mostly one above the other.
        axis_gap, other_gap, direction = {
            "to the left of": (gap_x, gap_y, dx > 0), "to the right of": (gap_x, gap_y, dx < 0),
            "above": (gap_y, gap_x, dy > 0), "below": (gap_y, gap_x, dy < 0),
        }[relation]
        assert direction and axis_gap >= 0.05 * size and axis_gap >= other_gap, (caption, a, b)

    for where in re.findall(r"(in the center|on the left|on the right|at the top|at the bottom|in the \w+ \w+ corner)",
                            caption):
        assert len(shapes) == 1, caption
        x, y = shapes[0].center[0] / size, shapes[0].center[1] / size
        words = where.split()
        column = "left" if "left" in words else "right" if "right" in words else "center"
        row = "top" if "top" in words else "bottom" if "bottom" in words else "middle"
        # Lone shapes sit near the 1/4, 1/2 and 3/4 lines; 0.35 and 0.65 leave a wide margin either side.
        assert {"left": x < 0.35, "right": x > 0.65, "center": 0.4 < x < 0.6}[column], (caption, x)
        assert {"top": y < 0.35, "bottom": y > 0.65, "middle": 0.4 < y < 0.6}[row], (caption, y)


def nearest_name(rgb):
    palette = {**COLORS, **{f"background:{name}": value for name, value in BACKGROUNDS.items()}}
    return min(palette, key=lambda name: sum((int(c) - v) ** 2 for c, v in zip(rgb, palette[name])))


# ----- captions --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [96, 64, 160])
def test_every_caption_states_only_true_facts(image_size):
    for scene, captions in random_scenes(400, image_size=image_size):
        assert len(captions) == 5 and len(set(captions)) == 5, captions
        for caption in captions:
            check_caption(scene, caption)


def test_the_caption_checker_catches_false_captions():
    # Guards the check above: a recoloured, resized, moved or recounted scene must fail it.
    checked = 0
    for scene, captions in random_scenes(60):
        first = scene.shapes[0]
        other_color = next(color for color in COLORS if color not in {s.color for s in scene.shapes})
        recoloured = Scene(scene.image_size, scene.background, (Shape(first.kind, other_color, first.size,
                                                                      first.center, first.radius),
                                                                *scene.shapes[1:]), scene.texture_seed)
        other_background = next(name for name in BACKGROUNDS if name != scene.background)
        rebackgrounded = Scene(scene.image_size, other_background, scene.shapes, scene.texture_seed)
        for wrong in (recoloured, rebackgrounded):
            with pytest.raises(AssertionError):
                for caption in captions:
                    check_caption(wrong, caption)
        if len(scene.shapes) == 2:
            a, b = scene.shapes
            swapped = Scene(scene.image_size, scene.background, (Shape(a.kind, a.color, a.size, b.center, a.radius),
                                                                 Shape(b.kind, b.color, b.size, a.center, b.radius)),
                            scene.texture_seed)
            with pytest.raises(AssertionError):
                for caption in captions:
                    check_caption(swapped, caption)
            checked += 1
    assert checked > 5
    with pytest.raises(AssertionError):
        check_caption(next(random_scenes(1))[0], "a red circle on a white background.")


def test_every_shape_is_named_by_some_caption():
    for scene, captions in random_scenes(200):
        for shape in scene.shapes:
            assert any(f"{shape.color} {shape.kind}" in caption for caption in captions), (scene, captions)


def test_scenes_cover_counts_kinds_colours_sizes_and_backgrounds():
    scenes = [scene for scene, _ in random_scenes(300)]
    assert {len(scene.shapes) for scene in scenes} == {1, 2, 3}
    assert {shape.kind for scene in scenes for shape in scene.shapes} == {"circle", "square", "triangle", "star"}
    assert {shape.color for scene in scenes for shape in scene.shapes} == set(COLORS)
    assert {shape.size for scene in scenes for shape in scene.shapes} == {"small", "large"}
    assert {scene.background for scene in scenes} == set(BACKGROUNDS)


# ----- geometry and pixels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("image_size", [96, 48])
def test_shapes_stay_inside_the_image_and_apart(image_size):
    for scene, _ in random_scenes(400, image_size=image_size):
        for shape in scene.shapes:
            left, top, right, bottom = shape.box
            assert left >= 1 and top >= 1 and right <= image_size - 1 and bottom <= image_size - 1, shape
        for i, a in enumerate(scene.shapes):
            for b in scene.shapes[i + 1:]:
                _, _, gap_x, gap_y = gaps(a, b)
                assert max(gap_x, gap_y) >= 0.05 * image_size, (a, b)


def test_large_shapes_are_clearly_larger_than_small_ones():
    radii = {"small": [], "large": []}
    for scene, _ in random_scenes(300):
        for shape in scene.shapes:
            radii[shape.size].append(shape.radius)
    assert min(radii["large"]) > 1.4 * max(radii["small"])


def test_rendered_centres_have_the_shape_colour_and_corners_the_background():
    for scene, _ in random_scenes(200):
        image = render(scene)
        assert image.size == (scene.image_size, scene.image_size) and image.mode == "RGB"
        for shape in scene.shapes:
            x, y = (int(round(value)) for value in shape.center)
            assert image.getpixel((x, y)) == COLORS[shape.color], shape
        background = np.array(BACKGROUNDS[scene.background])
        for corner in [(0, 0), (scene.image_size - 1, 0), (0, scene.image_size - 1), (scene.image_size - 1,) * 2]:
            assert np.abs(np.array(image.getpixel(corner)) - background).max() <= 4, (scene.background, corner)


def test_each_kind_has_its_own_silhouette():
    # Probe points as fractions of the radius, far from every outline: (right, up), (centre, down), (left, down).
    probes = [(0.75, -0.75), (0.0, 0.92), (-0.75, 0.75)]
    expected = {"circle": (False, True, False), "square": (True, False, True),
                "triangle": (False, True, True), "star": (False, False, False)}
    for kind, inside in expected.items():
        shape = Shape(kind, "red", "large", (64.0, 64.0), 48.0)
        image = render(Scene(128, "white", (shape,), texture_seed=0))
        found = tuple(image.getpixel((round(64 + 48 * px), round(64 + 48 * py))) == COLORS["red"] for px, py in probes)
        assert found == inside, kind


def test_colour_names_match_their_hues():
    expected_hue = {"red": 0, "orange": 30, "yellow": 55, "green": 130, "blue": 225, "purple": 285}
    for name, rgb in COLORS.items():
        hue = colorsys.rgb_to_hsv(*(value / 255 for value in rgb))[0] * 360
        assert min(abs(hue - expected_hue[name]), 360 - abs(hue - expected_hue[name])) < 20, name


# ----- corpus files ----------------------------------------------------------------------------------------------


def read_flickr8k(root):
    """Parse a folder the way a Flickr8k loader does: captions by image, and the three split lists."""
    captions = {}
    for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, caption = line.split("\t")
        name, k = key.split("#")
        captions.setdefault(name, []).append((int(k), caption))
    splits = {split: (root / f"Flickr_8k.{split}Images.txt").read_text(encoding="utf-8").split("\n")
              for split in ("train", "dev", "test")}
    return captions, splits


def test_corpus_is_in_the_flickr8k_layout(tmp_path):
    summary = generate_shapes_corpus(tmp_path / "shapes", seed=3, **SMALL_CORPUS)
    root = tmp_path / "shapes"
    assert summary["num_images"] == {"train": 8, "val": 3, "test": 3} and summary["num_captions"] == 70
    assert summary["token_file"] == str(root / "Flickr8k.token.txt") and not summary["reused"]
    captions, splits = read_flickr8k(root)
    for split, lines in splits.items():
        assert lines[-1] == "" and all(re.fullmatch(r"shapes_\d{6}\.jpg", name) for name in lines[:-1]), split
    listed = [set(lines[:-1]) for lines in splits.values()]
    assert [len(names) for names in listed] == [8, 3, 3]
    assert not (listed[0] & listed[1] or listed[0] & listed[2] or listed[1] & listed[2])
    on_disk = {path.name for path in (root / "Flicker8k_Dataset").iterdir()}
    assert set.union(*listed) == set(captions) == on_disk
    for name, numbered in captions.items():
        assert [k for k, _ in numbered] == [0, 1, 2, 3, 4], name
        assert all(re.fullmatch(r"[a-z][a-z ,]*[a-z]", caption) for _, caption in numbered), numbered
        with Image.open(root / "Flicker8k_Dataset" / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_saved_jpegs_show_the_captioned_colours(tmp_path):
    # Rebuilds each image's scene from its documented seed and checks the decoded file, not just the renderer.
    generate_shapes_corpus(tmp_path, seed=5, **SMALL_CORPUS)
    captions, _ = read_flickr8k(tmp_path)
    for index, name in enumerate(sorted(captions)):
        rng = np.random.default_rng([5, index])
        scene = make_scene(rng, 64)
        assert [caption for _, caption in captions[name]] == captions_for(scene, rng)
        with Image.open(tmp_path / "Flicker8k_Dataset" / name) as image:
            image = image.convert("RGB")
            for shape in scene.shapes:
                assert nearest_name(image.getpixel(tuple(round(v) for v in shape.center))) == shape.color, name
            assert nearest_name(image.getpixel((0, 0))) == f"background:{scene.background}", name


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path):
    for folder, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_shapes_corpus(tmp_path / folder, seed=seed, **SMALL_CORPUS)

    def files(folder):
        root = tmp_path / folder
        return {path.relative_to(root).as_posix(): path.read_bytes() for path in root.rglob("*") if path.is_file()}

    a, b, c = files("a"), files("b"), files("c")
    assert a == b
    assert a["Flickr8k.token.txt"] != c["Flickr8k.token.txt"]
    images = [name for name in a if name.endswith(".jpg")]
    assert len(images) == 14 and all(a[name] != c[name] for name in images)


def test_a_complete_corpus_with_the_same_parameters_is_reused(tmp_path):
    generate_shapes_corpus(tmp_path, seed=0, **SMALL_CORPUS)
    token_file = tmp_path / "Flickr8k.token.txt"
    original = token_file.read_bytes()
    token_file.write_text("marker\n")
    summary = generate_shapes_corpus(tmp_path, seed=0, **SMALL_CORPUS)
    assert summary["reused"] and token_file.read_text() == "marker\n"
    summary = generate_shapes_corpus(tmp_path, seed=0, overwrite=True, **SMALL_CORPUS)
    assert not summary["reused"] and token_file.read_bytes() == original


def test_changed_parameters_or_an_unfinished_run_regenerate(tmp_path):
    generate_shapes_corpus(tmp_path, seed=0, **SMALL_CORPUS)
    (tmp_path / "notes.txt").write_text("mine")
    summary = generate_shapes_corpus(tmp_path, seed=0, **{**SMALL_CORPUS, "num_train": 2})
    assert not summary["reused"]
    assert len(list((tmp_path / "Flicker8k_Dataset").iterdir())) == 8  # stale images from the larger run are gone
    assert (tmp_path / "notes.txt").read_text() == "mine"

    manifest_path = tmp_path / "shapes_manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["complete"] is True
    manifest_path.write_text(json.dumps({**manifest, "complete": False}))
    assert not generate_shapes_corpus(tmp_path, seed=0, **{**SMALL_CORPUS, "num_train": 2})["reused"]
    assert json.loads(manifest_path.read_text())["complete"] is True


@pytest.mark.parametrize("overwrite", [False, True])
def test_refuses_a_non_empty_folder_that_is_not_a_shapes_corpus(tmp_path, overwrite):
    (tmp_path / "thesis.txt").write_text("precious")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path))):
        generate_shapes_corpus(tmp_path, overwrite=overwrite, **SMALL_CORPUS)
    assert [path.name for path in tmp_path.iterdir()] == ["thesis.txt"]


def test_an_existing_empty_folder_is_used(tmp_path):
    assert generate_shapes_corpus(tmp_path, **SMALL_CORPUS)["num_captions"] == 70


@pytest.mark.parametrize("arguments, field", [
    (dict(num_train=0), "num_train"), (dict(num_val=-1), "num_val"), (dict(image_size=16), "image_size"),
    (dict(seed=-1), "seed"), (dict(num_test=2.5), "num_test"),
])
def test_invalid_arguments_name_the_field(tmp_path, arguments, field):
    with pytest.raises(ValueError, match=field):
        generate_shapes_corpus(tmp_path / "corpus", **{**SMALL_CORPUS, **arguments})
    assert not (tmp_path / "corpus").exists()


# ----- instance annotations ---------------------------------------------------------------------------------------

# sha256 of the first 60 scenes' pixels and captions (seed 0, 96 px) as generator version 1 drew them: version 2 adds
# the instance annotations and must not change a pixel or a word.
VERSION_1_DIGEST = "e8582a590fcd4a2cefdfa17cbfc02da95266c9e97af5615c46caae6094ae154b"


def test_pixels_and_captions_are_those_of_generator_version_1():
    import hashlib

    digest = hashlib.sha256()
    for index in range(60):
        rng = np.random.default_rng([0, index])
        scene = make_scene(rng, 96)
        digest.update(render(scene).tobytes())
        digest.update("|".join(captions_for(scene, rng)).encode())
    assert digest.hexdigest() == VERSION_1_DIGEST


def test_instance_annotations_list_every_shape_of_every_image_in_coco_format(tmp_path):
    summary = generate_shapes_corpus(tmp_path, seed=2, **SMALL_CORPUS)
    data = json.loads(Path(summary["instances_file"]).read_text())
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle", "star"]
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert [image["file_name"] for image in data["images"]] == [f"shapes_{i:06d}.jpg" for i in range(14)]
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for image in data["images"]:
        scene = make_scene(np.random.default_rng([2, image["id"]]), 64)
        annotations = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert image["background"] == scene.background and (image["width"], image["height"]) == (64, 64)
        assert sorted((names[a["category_id"]], a["attributes"]["color"], a["attributes"]["size"])
                      for a in annotations) == sorted((s.kind, s.color, s.size) for s in scene.shapes)
        for annotation in annotations:
            x, y, w, h = annotation["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 64 and y + h <= 64 and 0 < annotation["area"] <= 1.001 * w * h
            assert annotation["iscrowd"] == 0


def test_instance_annotations_agree_with_the_pixels(tmp_path):
    # Re-render each scene from its annotations alone (the texture seed is the only thing they do not hold) and
    # compare with the saved JPEG: the shapes must land on the same pixels in the same colours.
    from PIL import ImageDraw

    from vision_gpt.datasets import shape_from_annotation

    summary = generate_shapes_corpus(tmp_path, seed=4, **{**SMALL_CORPUS, "image_size": 96})
    data = json.loads(Path(summary["instances_file"]).read_text())
    names = {c["id"]: c["name"] for c in data["categories"]}
    for image in data["images"]:
        shapes = tuple(shape_from_annotation(a, names) for a in data["annotations"] if a["image_id"] == image["id"])
        redrawn = np.asarray(render(Scene(96, image["background"], shapes, texture_seed=0)), dtype=float)
        with Image.open(Path(summary["images_dir"]) / image["file_name"]) as saved:
            saved = np.asarray(saved.convert("RGB"), dtype=float)
        # Texture (+-4 levels, another seed here) and JPEG noise stay small; a misplaced edge does not.
        assert off_pixels(redrawn, saved) < 0.01, image["file_name"]
        for shape in shapes:
            # The outline's box is tight: the shape's colour reaches into every side's first pixel row.
            mask = Image.new("L", (96, 96))
            ImageDraw.Draw(mask).polygon(outline(shape), fill=255)
            inside = np.asarray(mask) > 0
            assert np.abs(saved[inside] - COLORS[shape.color]).mean() < 40, (image["file_name"], shape)
        # A wrong kind is told apart: the same shapes re-rendered as another kind differ clearly.
        wrong = tuple(Shape(KINDS[(KINDS.index(s.kind) + 1) % 4], s.color, s.size, s.center, s.radius) for s in shapes)
        moved = np.asarray(render(Scene(96, image["background"], wrong, texture_seed=0)), dtype=float)
        assert off_pixels(moved, saved) > 0.005 + off_pixels(redrawn, saved), image["file_name"]


def off_pixels(a, b) -> float:
    """The fraction of pixels where two RGB arrays differ by more than 30 levels in some channel."""
    return float((np.abs(a - b).max(-1) > 30).mean())
