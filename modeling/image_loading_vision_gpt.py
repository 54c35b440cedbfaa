"""Reading images for the processor: PIL images, file paths, URLs, numpy arrays and tensors, as upright RGB, or an
`ImageLoadError` that names the input and the reason. Part of the published model: exported repos load paths and URLs
with it."""

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError


class ImageLoadError(ValueError):
    """An input that is not a readable image. The message names the input and the reason."""


def _describe(image) -> str:
    if isinstance(image, (str, os.PathLike)):
        return f"'{os.fspath(image)}'"
    return f"{type(image).__name__} input"


def _open_image_file(path) -> Image.Image:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ImageLoadError(f"Image file '{path}' does not exist.")
    if os.path.isdir(path):
        raise ImageLoadError(f"'{path}' is a directory, not an image file.")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(f"Image file '{path}' is empty (0 bytes).")
    try:
        image = Image.open(path)
        # Decode now, inside the guard, so truncated files fail here rather than later in resizing.
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageLoadError(
            f"Image file '{path}' is too large to decode safely ({error}). PIL's decompression-bomb guard "
            "(PIL.Image.MAX_IMAGE_PIXELS) refused it; downscale the image first."
        ) from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"'{path}' is not an image PIL can read (unknown or corrupt format).") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"Image file '{path}' could not be decoded: {error}.") from None
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # With the global flag on, PIL pads truncated files with grey instead of failing: never caption half an image.
        raise ImageLoadError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set, so truncated files cannot be detected; unset it to load "
            f"'{path}'."
        )
    return image


def _array_to_image(array: np.ndarray, description: str) -> Image.Image:
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)) or 0 in array.shape:
        raise ImageLoadError(
            f"{description} has shape {tuple(array.shape)}; expected (H, W), (H, W, C) or (C, H, W) with 1, 3 or 4 "
            "channels."
        )
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageLoadError(f"{description} contains NaN or infinite values.")
        if array.min() < 0 or array.max() > 1:
            raise ImageLoadError(
                f"{description} is a float array with values in [{array.min():.3g}, {array.max():.3g}]; float "
                "images must be in [0, 1] (use uint8 for 0-255)."
            )
        array = np.round(array * 255).astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    else:
        raise ImageLoadError(f"{description} has dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")
    return Image.fromarray(array)


def to_rgb(image: Image.Image) -> Image.Image:
    """
    Convert any PIL image to upright RGB: EXIF orientation applied, transparency composited on white, 16-bit and
    32-bit greyscale scaled (not clipped) to 8 bits, CMYK and palette images converted.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.float64)
        high = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / high * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(array).convert("RGB")
    if image.mode == "F":
        array = np.asarray(image)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / max(high - low, 1e-12) * 255.0
        return Image.fromarray(array.round().astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(image) -> Image.Image:
    """
    Load one image as an RGB PIL image from a PIL image, a file path, a numpy array or a torch tensor
    (`(H, W[, C])` or `(C, H, W)`, uint8, uint16 or float in [0, 1]). Raises `ImageLoadError` (a `ValueError`) naming
    the input when it is missing, empty, truncated, not an image, or too large for PIL's decompression-bomb guard.
    """
    description = _describe(image)
    if isinstance(image, (str, Path)) and str(image).startswith(("http://", "https://")):
        from transformers.image_utils import load_image as load_url

        try:
            image = load_url(str(image))
        except Exception as error:  # network errors come in many types; the URL and reason are what matter
            raise ImageLoadError(f"Could not fetch image {description}: {error}") from None
    elif isinstance(image, (str, os.PathLike)):
        image = _open_image_file(image)
    elif type(image).__module__.startswith("torch"):
        image = _array_to_image(image.detach().cpu().numpy(), description)
    elif isinstance(image, np.ndarray):
        image = _array_to_image(image, description)
    elif not isinstance(image, Image.Image):
        raise ImageLoadError(
            f"Cannot read an image from {description}; pass a PIL image, a file path, a numpy array or a tensor."
        )
    try:
        return to_rgb(image)
    except (OSError, ValueError) as error:
        raise ImageLoadError(f"Image {description} could not be converted to RGB: {error}.") from None


__all__ = ["ImageLoadError", "load_image", "to_rgb"]
