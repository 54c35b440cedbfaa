"""Corpora for training and demos. `shapes` writes a synthetic captioned-image corpus in the Flickr8k layout."""

from .shapes import (
    BACKGROUNDS,
    COLORS,
    KINDS,
    SIZES,
    Scene,
    Shape,
    captions_for,
    generate_shapes_corpus,
    make_scene,
    position,
    relation,
    render,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "KINDS",
    "SIZES",
    "Scene",
    "Shape",
    "captions_for",
    "generate_shapes_corpus",
    "make_scene",
    "position",
    "relation",
    "render",
]
