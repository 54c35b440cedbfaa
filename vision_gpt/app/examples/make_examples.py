"""Draw the example images that `vision-gpt app` shows on first open, and write them next to this script.

    python vision_gpt/app/examples/make_examples.py

Two are scenes from the synthetic `shapes` corpus (what a model trained on it has seen), two are simple drawn
outdoor scenes (closer to Flickr8k's photos). Everything is drawn with PIL from fixed seeds, so running the script
again rewrites the same pictures; each file stays well under 50 KB so it can be committed.
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vision_gpt.datasets import make_scene, render

HERE = Path(__file__).resolve().parent
SIZE = 224  # ViT-B/16's input size: what a real model sees, and big enough to read in the page
MAX_BYTES = 50_000


def shapes_example(seed: int) -> Image.Image:
    """A scene of the `shapes` corpus, drawn at 224 px instead of the corpus's 96 px (shapes scale with the image)."""
    return render(make_scene(np.random.default_rng(seed), image_size=SIZE))


def beach() -> Image.Image:
    """A sailboat on the sea under a sun, with a sandy shore in front."""
    image = _sky_gradient((120, 180, 240), (200, 230, 255))
    draw = ImageDraw.Draw(image)
    draw.ellipse((150, 25, 195, 70), fill=(255, 215, 60))  # sun
    draw.rectangle((0, 120, SIZE, 175), fill=(30, 100, 170))  # sea
    for y in range(128, 172, 9):  # wave lines
        draw.line([(x, y + (3 if (x // 16) % 2 else 0)) for x in range(0, SIZE + 16, 16)], fill=(80, 150, 210), width=2)
    draw.polygon([(0, 175), (SIZE, 160), (SIZE, SIZE), (0, SIZE)], fill=(225, 200, 140))  # sand
    draw.polygon([(60, 135), (130, 135), (118, 150), (72, 150)], fill=(120, 60, 30))  # hull
    draw.line([(95, 135), (95, 70)], fill=(60, 40, 20), width=3)  # mast
    draw.polygon([(97, 72), (97, 130), (135, 130)], fill=(250, 250, 250))  # sail
    return _soften(image)


def house() -> Image.Image:
    """A house with a red roof and a tree beside it, on a lawn."""
    image = _sky_gradient((110, 170, 235), (190, 225, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 150, SIZE, SIZE), fill=(70, 160, 70))  # lawn
    draw.rectangle((40, 95, 140, 170), fill=(235, 225, 200))  # walls
    draw.polygon([(30, 98), (90, 50), (150, 98)], fill=(190, 40, 35))  # roof
    draw.rectangle((78, 130, 102, 170), fill=(110, 70, 40))  # door
    for left in (50, 112):  # windows
        draw.rectangle((left, 108, left + 20, 126), fill=(170, 210, 240), outline=(90, 90, 90))
    draw.rectangle((176, 115, 188, 168), fill=(100, 65, 35))  # trunk
    draw.ellipse((150, 60, 214, 128), fill=(35, 120, 45))  # crown
    return _soften(image)


def _sky_gradient(top, bottom) -> Image.Image:
    t = np.linspace(0.0, 1.0, SIZE)[:, None, None]  # (H, 1, 1)
    rows = (1 - t) * np.array(top) + t * np.array(bottom)  # (H, 1, 3)
    return Image.fromarray(np.repeat(rows, SIZE, axis=1).round().astype(np.uint8))


def _soften(image: Image.Image) -> Image.Image:
    # A slight blur takes the hard vector edges off, so the drawings look less unlike photos.
    return image.filter(ImageFilter.GaussianBlur(0.6))


EXAMPLES = {
    "shapes_1.jpg": lambda: shapes_example(1),
    "shapes_7.jpg": lambda: shapes_example(7),
    "beach.jpg": beach,
    "house.jpg": house,
}


def main() -> None:
    for name, draw in EXAMPLES.items():
        path = HERE / name
        image = draw()
        # JPEG at the shapes corpus's quality: what the training images were saved as.
        image.save(path, quality=90, optimize=True)
        size = path.stat().st_size
        if size > MAX_BYTES:
            raise SystemExit(f"{path} is {size:,} bytes, over the {MAX_BYTES:,}-byte budget for committed examples.")
        print(f"{path}  ({size / 1000:.1f} KB)")


if __name__ == "__main__":
    main()
