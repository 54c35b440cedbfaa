"""Shapes: a synthetic captioned-image corpus written in the original Flickr8k layout.

Each image holds one to three flat shapes (circle, square, triangle, star) in six colours and two sizes on a white,
black or gray background with a faint texture. Every image gets five human-style captions at different levels of
detail, and every fact a caption states (kind, colour, size, count, position, relation, background) is true of the
drawn image. The vocabulary is small and the captions follow from the pixels, so a tiny captioner trained for a few
minutes on a CPU clearly beats the most-frequent-caption baseline.

The corpus is written exactly as the Flickr8k archives unpack, so it goes through the same loader as the real data:

    <root>/Flicker8k_Dataset/shapes_000000.jpg ...      ("Flicker" is the real archive's spelling)
    <root>/Flickr8k.token.txt                           shapes_000000.jpg#0<TAB>a red circle on a white background
    <root>/Flickr_8k.trainImages.txt                    one image file name per line
    <root>/Flickr_8k.devImages.txt
    <root>/Flickr_8k.testImages.txt
    <root>/instances_shapes.json                        every image's shapes as COCO instance annotations
    <root>/shapes_manifest.json                         parameters and a completion flag, written last

`instances_shapes.json` is in COCO's instances format: one category per kind (colour and size are attributes of each
annotation, not categories), a tight `bbox` and outline `segmentation` per shape, and each image's background colour
in its `images` entry. `vision-gpt evaluate` finds it there and reports CHAIR, how often captions name shapes that are
not in the image.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (150, 60, 190),
}
BACKGROUNDS = {"white": (240, 240, 240), "black": (25, 25, 25), "gray": (128, 128, 128)}
SIZES = ("small", "large")

# Half-width of a shape's bounding box as a fraction of the image side. Large is ~1.8x small, so the two sizes stay
# apart at 96 px (small: 15-19 px across, large: 29-35 px).
RADIUS_RANGES = {"small": (0.08, 0.10), "large": (0.15, 0.18)}
# Minimum empty band between two shapes' bounding boxes, and between a box and the image border (fractions of the
# side; the border band is at least 1.5 px). Boxes never touch, so every shape is whole, the corners always show the
# background, and every stated relation has a clear gap behind it.
GAP = 0.06
MARGIN = 0.02
# A lone shape sits near one of nine cell centres, so its position word ("top left", "center") is never borderline.
CELL_CENTERS = (0.25, 0.5, 0.75)
CELL_JITTER = 0.04
TEXTURE_AMPLITUDE = 4
JPEG_QUALITY = 90
# Bump when the drawing, the captions or the files written change, so an existing corpus is regenerated instead of
# reused. 2: the instance annotations (images and captions byte-identical to 1's).
GENERATOR_VERSION = 2

IMAGES_DIR = "Flicker8k_Dataset"
TOKEN_FILE = "Flickr8k.token.txt"
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt", "test": "Flickr_8k.testImages.txt"}
INSTANCES_FILE = "instances_shapes.json"
MANIFEST_FILE = "shapes_manifest.json"
MANIFEST_FORMAT = "vision-gpt-shapes"


@dataclass(frozen=True)
class Shape:
    """One drawn shape. `center` is (x, y) in pixels from the top-left corner; `radius` is the half-width of its
    bounding box, which the shape touches (the square is inset to 0.85 of it so its area matches the circle's)."""

    kind: str
    color: str
    size: str
    center: tuple[float, float]
    radius: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the bounding box, in pixels."""
        x, y = self.center
        return (x - self.radius, y - self.radius, x + self.radius, y + self.radius)


@dataclass(frozen=True)
class Scene:
    """What one image shows: a background colour name, its texture seed and one to three non-overlapping shapes."""

    image_size: int
    background: str
    shapes: tuple[Shape, ...]
    texture_seed: int


# ----- scenes ----------------------------------------------------------------------------------------------------


def make_scene(rng: np.random.Generator, image_size: int = 96) -> Scene:
    """Draw a random scene: one to three shapes with distinct (colour, kind) pairs, boxes at least `GAP` apart.

    Distinct pairs keep every "a red circle" in a caption a unique reference, so relations name one shape each.

    Example:
        >>> scene = make_scene(np.random.default_rng(0), image_size=96)
        >>> 1 <= len(scene.shapes) <= 3 and scene.background in BACKGROUNDS
        True
    """
    _check_image_size(image_size)
    background = _choice(rng, tuple(BACKGROUNDS))
    count = int(rng.integers(1, 4))
    pairs = [(color, kind) for color in COLORS for kind in KINDS]
    picked = rng.choice(len(pairs), size=count, replace=False)
    looks = [(pairs[i][0], pairs[i][1], _choice(rng, SIZES)) for i in picked]
    if count == 1:
        color, kind, size = looks[0]
        shapes = (_place_alone(rng, kind, color, size, image_size),)
    else:
        shapes = _place_apart(rng, looks, image_size)
    return Scene(image_size, background, shapes, texture_seed=int(rng.integers(2**31)))


def _place_alone(rng, kind, color, size, image_size) -> Shape:
    radius = _radius(rng, size, image_size)
    low, high = radius + _margin(image_size), image_size - radius - _margin(image_size)
    center = []
    for _ in range(2):
        cell = _choice(rng, CELL_CENTERS) + rng.uniform(-CELL_JITTER, CELL_JITTER)
        center.append(float(np.clip(cell * image_size, low, high)))
    return Shape(kind, color, size, (center[0], center[1]), radius)


def _place_apart(rng, looks, image_size) -> tuple[Shape, ...]:
    # Rejection sampling; three large shapes fill a 96 px image tightly, so after a run of misses the radii are
    # redrawn too. Each try is cheap and the loop is deterministic under the generator.
    while True:
        shapes = []
        for color, kind, size in looks:
            radius = _radius(rng, size, image_size)
            low, high = radius + _margin(image_size), image_size - radius - _margin(image_size)
            for _ in range(100):
                candidate = Shape(kind, color, size, (float(rng.uniform(low, high)), float(rng.uniform(low, high))),
                                  radius)
                if all(max(_separations(candidate, other)) >= GAP * image_size for other in shapes):
                    shapes.append(candidate)
                    break
            else:
                break
        if len(shapes) == len(looks):
            return tuple(shapes)


def _radius(rng, size, image_size) -> float:
    low, high = RADIUS_RANGES[size]
    return float(rng.uniform(low, high) * image_size)


def _margin(image_size) -> float:
    return max(1.5, MARGIN * image_size)


def _separations(a: Shape, b: Shape) -> tuple[float, float]:
    """Empty gap between the two bounding boxes along x and along y (negative where they overlap on that axis)."""
    reach = a.radius + b.radius
    return abs(a.center[0] - b.center[0]) - reach, abs(a.center[1] - b.center[1]) - reach


def relation(a: Shape, b: Shape) -> str:
    """Where `a` is relative to `b`, along the axis with the wider gap: "to the left of", "to the right of",
    "above" or "below". `make_scene` keeps that gap at least `GAP` of the image side.

    Example:
        >>> relation(Shape("circle", "red", "small", (10, 50), 8), Shape("star", "blue", "small", (80, 50), 8))
        'to the left of'
    """
    gap_x, gap_y = _separations(a, b)
    if gap_x >= gap_y:
        return "to the left of" if a.center[0] < b.center[0] else "to the right of"
    return "above" if a.center[1] < b.center[1] else "below"


def position(shape: Shape, image_size: int) -> str:
    """Where a lone shape sits: "in the center", "on the left", "at the top", "in the top left corner", ...

    Example:
        >>> position(Shape("circle", "red", "small", (24, 72), 8), 96)
        'in the bottom left corner'
    """
    def third(value):
        return int(np.clip(value / image_size * 3, 0, 2))

    column = ("left", "center", "right")[third(shape.center[0])]
    row = ("top", "middle", "bottom")[third(shape.center[1])]
    if row == "middle" and column == "center":
        return "in the center"
    if row == "middle":
        return f"on the {column}"
    if column == "center":
        return f"at the {row}"
    return f"in the {row} {column} corner"


# ----- pixels ----------------------------------------------------------------------------------------------------


def render(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image of `scene.image_size` pixels square.

    Shapes are drawn at twice the size and box-filtered down, so edges are anti-aliased like a photo's while
    interiors keep their exact colour. The background carries a faint grey texture (+-4 levels) seeded by the scene.

    Example:
        >>> image = render(make_scene(np.random.default_rng(0), image_size=96))
        >>> image.size, image.mode
        ((96, 96), 'RGB')
    """
    size = scene.image_size
    noise = np.random.default_rng(scene.texture_seed).integers(
        -TEXTURE_AMPLITUDE, TEXTURE_AMPLITUDE + 1, size=(size, size, 1))
    background = np.clip(np.array(BACKGROUNDS[scene.background]) + noise, 0, 255).astype(np.uint8)  # (S, S, 3)
    # Each background pixel becomes a 2x2 block, so the texture survives the box filter unchanged.
    background = background.repeat(2, axis=0).repeat(2, axis=1)  # (2S, 2S, 3)
    canvas = Image.fromarray(background)
    draw = ImageDraw.Draw(canvas)
    for shape in scene.shapes:
        _draw_shape(draw, shape, scale=2)
    return canvas.reduce(2)


def _draw_shape(draw, shape: Shape, scale: int):
    # Squares stay rectangles and circles ellipses (not their `outline` polygons): PIL rasterises those differently,
    # and the corpus's pixels must not change.
    x, y = (scale * value for value in shape.center)
    r = scale * shape.radius
    fill = COLORS[shape.color]
    if shape.kind == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape.kind == "square":
        half = 0.85 * r
        draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
    else:
        draw.polygon(outline(shape, scale), fill=fill)


def outline(shape: Shape, scale: float = 1.0, circle_points: int = 32) -> list[tuple[float, float]]:
    """The shape's outline as polygon vertices `(x, y)` in pixels (times `scale`); a circle as `circle_points` points
    on it.

    Example:
        >>> outline(Shape("triangle", "red", "small", (50, 50), 10))
        [(50.0, 40.0), (60.0, 60.0), (40.0, 60.0)]
    """
    x, y = (scale * float(value) for value in shape.center)
    r = scale * shape.radius
    if shape.kind == "circle":
        angles = np.linspace(0, 2 * np.pi, circle_points, endpoint=False)
        return [(x + r * float(np.cos(a)), y + r * float(np.sin(a))) for a in angles]
    if shape.kind == "square":
        half = 0.85 * r  # inset so that its area is close to the circle's
        return [(x - half, y - half), (x + half, y - half), (x + half, y + half), (x - half, y + half)]
    if shape.kind == "triangle":
        return [(x, y - r), (x + r, y + r), (x - r, y + r)]
    if shape.kind == "star":
        # Five points, apex up; an inner radius of half the outer keeps the arms thick enough to read at 15 px.
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
        return [(x + float(d * np.cos(a)), y + float(d * np.sin(a))) for d, a in zip(radii, angles)]
    raise ValueError(f"Shape kind {shape.kind!r} is not one of {KINDS}.")


# ----- instance annotations --------------------------------------------------------------------------------------


def instance_annotations(scenes: list[tuple[str, "Scene"]]) -> dict:
    """COCO instances (`images`, `annotations`, `categories`) for `(file_name, scene)` pairs; image ids count from 0
    in order. The category is the kind; colour and size are `attributes`. `bbox` is the tight `[x, y, width, height]`
    of the drawn outline and `area` its exact area, in pixels.

    Example:
        >>> data = instance_annotations([("a.jpg", Scene(96, "white", (Shape("star", "red", "small", (50, 50), 8),), 0))])
        >>> [c["name"] for c in data["categories"]], data["annotations"][0]["attributes"]
        (['circle', 'square', 'triangle', 'star'], {'color': 'red', 'size': 'small'})
    """
    images, annotations = [], []
    for image_id, (file_name, scene) in enumerate(scenes):
        images.append({"id": image_id, "file_name": file_name, "width": scene.image_size,
                       "height": scene.image_size, "background": scene.background})
        for shape in scene.shapes:
            points = outline(shape)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            area = np.pi * shape.radius**2 if shape.kind == "circle" else _polygon_area(points)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": KINDS.index(shape.kind) + 1,
                "bbox": [round(min(xs), 3), round(min(ys), 3), round(max(xs) - min(xs), 3),
                         round(max(ys) - min(ys), 3)],
                "area": round(float(area), 3), "iscrowd": 0,
                "segmentation": [[round(value, 3) for point in points for value in point]],
                "attributes": {"color": shape.color, "size": shape.size},
            })
    categories = [{"id": index + 1, "name": kind, "supercategory": "shape"} for index, kind in enumerate(KINDS)]
    return {"info": {"description": "vision-gpt shapes corpus", "version": str(GENERATOR_VERSION)},
            "images": images, "annotations": annotations, "categories": categories}


def shape_from_annotation(annotation: dict, categories: dict[int, str]) -> Shape:
    """The `Shape` an instance annotation describes (its outline's vertices give the centre and radius back)."""
    kind = categories[annotation["category_id"]]
    points = np.asarray(annotation["segmentation"][0], dtype=float).reshape(-1, 2)
    if kind == "square":
        center, radius = points.mean(0), (points[:, 0].max() - points[:, 0].min()) / 1.7
    elif kind == "circle":
        center, radius = points.mean(0), (points[:, 0].max() - points[:, 0].min()) / 2
    else:  # a triangle's or star's first vertex is its apex, straight above the centre at one radius
        radius = (points[:, 0].max() - points[:, 0].min()) / (2 if kind == "triangle" else 2 * np.cos(np.pi / 10))
        center = (points[0, 0], points[0, 1] + radius)
    attributes = annotation["attributes"]
    return Shape(kind, attributes["color"], attributes["size"], (float(center[0]), float(center[1])), float(radius))


def _polygon_area(points) -> float:
    xs, ys = np.array(points).T
    return 0.5 * abs(float(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1))))


# ----- captions --------------------------------------------------------------------------------------------------


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five reference captions for a scene, one per slot, each slot picking one of its phrasings with `rng`.

    The slots vary the detail: colours and kinds; a relation (or a lone shape's position); the count and the
    background; sizes; a freer "there is ..." or "a ... background with ..." sentence. Shapes in lists are named
    left to right, so the word order follows the image.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> len(captions_for(make_scene(rng, 96), rng))
        5
    """
    shapes = sorted(scene.shapes, key=lambda shape: (shape.center[0], shape.center[1]))
    background = scene.background
    if len(shapes) == 1:
        return _captions_one(shapes[0], background, position(shapes[0], scene.image_size), rng)
    return _captions_many(shapes, background, rng)


def _captions_one(shape, background, where, rng) -> list[str]:
    plain, sized = _noun(shape), _noun(shape, with_size=True)
    return [
        f"{_a(plain)} on a {background} background",
        f"{_a(sized)} {where}",
        _choice(rng, (f"there is {_a(plain)} {where}", f"{_a(sized)} on a {background} background")),
        _choice(rng, (f"a single {shape.color} shape on a {background} background",
                      f"one {shape.size} {shape.kind} on a {background} background")),
        _choice(rng, (f"a {background} background with {_a(sized)}", f"{_a(plain)} {where} of the picture")),
    ]


def _captions_many(shapes, background, rng) -> list[str]:
    count = ("two", "three")[len(shapes) - 2]
    listed = _listing([_a(_noun(shape)) for shape in shapes])
    listed_sized = _listing([_a(_noun(shape, with_size=True)) for shape in shapes])
    kinds = {shape.kind for shape in shapes}
    group = f"{shapes[0].kind}s" if len(kinds) == 1 and rng.random() < 0.5 else "shapes"
    # Two relations: with two shapes, the one pair read both ways round; with three, two different pairs, each
    # read in a random order.
    pairs = [(i, j) for i in range(len(shapes)) for j in range(i + 1, len(shapes))]
    first, second = rng.permutation(len(pairs))[:2] if len(pairs) > 1 else (0, 0)
    order = [rng.random() < 0.5, rng.random() < 0.5]
    if len(pairs) == 1:
        order[1] = not order[0]
    related = []
    for pair, forward in zip((pairs[first], pairs[second]), order):
        a, b = (shapes[pair[0]], shapes[pair[1]]) if forward else (shapes[pair[1]], shapes[pair[0]])
        related.append(f"{_a(_noun(a))} {relation(a, b)} {_a(_noun(b))}")
    return [
        listed,
        related[0],
        f"{count} {group} on a {background} background",
        listed_sized,
        _choice(rng, (f"there is {related[1]}", f"a {background} background with {listed}")),
    ]


def _noun(shape: Shape, with_size: bool = False) -> str:
    words = (shape.size, shape.color, shape.kind) if with_size else (shape.color, shape.kind)
    return " ".join(words)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _choice(rng, options):
    return options[int(rng.integers(len(options)))]


# ----- corpus ----------------------------------------------------------------------------------------------------


def generate_shapes_corpus(
    root,
    num_train: int = 2000,
    num_val: int = 200,
    num_test: int = 200,
    seed: int = 0,
    image_size: int = 96,
    overwrite: bool = False,
) -> dict:
    """Write a shapes corpus to `root` in the original Flickr8k layout and return a summary of what is there.

    Image `i` (numbered across train, then val, then test) is drawn from `np.random.default_rng([seed, i])`, so the
    same arguments give byte-identical files. If `root` already holds a complete corpus made with the same arguments
    it is reused; `overwrite=True` regenerates it. A non-empty folder that is not a shapes corpus is never written to.

    Example:
        >>> summary = generate_shapes_corpus("data/shapes", num_train=2000, num_val=200, num_test=200, seed=0)
        >>> summary["num_images"]
        {'train': 2000, 'val': 200, 'test': 200}
        >>> summary["token_file"]
        'data/shapes/Flickr8k.token.txt'
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    counts = {"train": num_train, "val": num_val, "test": num_test}
    for split, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"num_{split} must be a non-negative integer, got {count!r}.")
    if num_train == 0:
        raise ValueError("num_train must be at least 1: the demo needs training images.")
    _check_image_size(image_size)
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "num_test": num_test, "seed": int(seed),
              "image_size": image_size, "generator_version": GENERATOR_VERSION}
    summary = _summary(root, counts, params)
    if _is_reusable(root, params) and not overwrite:
        return {**summary, "reused": True}
    _clear_corpus(root)

    _write_json(root / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "params": params, "complete": False})
    images = root / IMAGES_DIR
    images.mkdir(parents=True, exist_ok=True)
    names, lines, scenes, index = {}, [], [], 0
    for split, count in counts.items():
        names[split] = []
        for _ in range(count):
            name = f"shapes_{index:06d}.jpg"
            rng = np.random.default_rng([int(seed), index])
            scene = make_scene(rng, image_size)
            # 4:4:4 chroma keeps the colour of a 15 px shape intact; the default 4:2:0 halves its colour resolution.
            render(scene).save(images / name, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
            lines.extend(f"{name}#{k}\t{caption}\n" for k, caption in enumerate(captions_for(scene, rng)))
            names[split].append(name)
            scenes.append((name, scene))
            index += 1
    _write_text(root / TOKEN_FILE, "".join(lines))
    for split, file_name in SPLIT_FILES.items():
        _write_text(root / file_name, "".join(f"{name}\n" for name in names[split]))
    _write_text(root / INSTANCES_FILE, json.dumps(instance_annotations(scenes)) + "\n")
    # Written last: a run that dies part-way leaves complete=False, and the next call regenerates.
    _write_json(root / MANIFEST_FILE, {"format": MANIFEST_FORMAT, "params": params, "complete": True})
    return {**summary, "reused": False}


def _summary(root: Path, counts: dict, params: dict) -> dict:
    return {
        "root": str(root),
        "images_dir": str(root / IMAGES_DIR),
        "token_file": str(root / TOKEN_FILE),
        "split_files": {split: str(root / name) for split, name in SPLIT_FILES.items()},
        "instances_file": str(root / INSTANCES_FILE),
        "manifest": str(root / MANIFEST_FILE),
        "num_images": dict(counts),
        "num_captions": 5 * sum(counts.values()),
        "seed": params["seed"],
        "image_size": params["image_size"],
    }


def _read_manifest(root: Path):
    """The manifest as a dict; None where `root` is missing or empty. Raises if `root` holds something else."""
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root} is a file; pass a folder (new or empty) for the shapes corpus.")
    if not root.exists() or not any(root.iterdir()):
        return None
    path = root / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"{root} is not empty and is not a shapes corpus (no valid {MANIFEST_FILE}); refusing to write there so "
            "nothing in it is lost. Pass a new or empty folder."
        )
    return manifest


def _is_reusable(root: Path, params: dict) -> bool:
    manifest = _read_manifest(root)
    if manifest is None or manifest.get("complete") is not True or manifest.get("params") != params:
        return False
    needed = [root / TOKEN_FILE, root / INSTANCES_FILE, *(root / name for name in SPLIT_FILES.values())]
    return all(path.is_file() for path in needed) and (root / IMAGES_DIR).is_dir()


def _clear_corpus(root: Path):
    # Only the files this generator writes are removed; anything else a user put in the folder stays.
    if _read_manifest(root) is None:
        return
    for name in (MANIFEST_FILE, TOKEN_FILE, INSTANCES_FILE, *SPLIT_FILES.values()):
        (root / name).unlink(missing_ok=True)
    images = root / IMAGES_DIR
    if images.is_dir():
        for path in images.glob("shapes_*.jpg"):
            path.unlink()


def _write_text(path: Path, text: str):
    # Write-then-rename, so a reader never sees half a file.
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text, encoding="utf-8", newline="\n")
    os.replace(temporary, path)


def _write_json(path: Path, data: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _check_image_size(image_size):
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer of at least 32 pixels, got {image_size!r}.")


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "KINDS",
    "SIZES",
    "Scene",
    "Shape",
    "captions_for",
    "generate_shapes_corpus",
    "instance_annotations",
    "make_scene",
    "outline",
    "position",
    "relation",
    "render",
    "shape_from_annotation",
]
