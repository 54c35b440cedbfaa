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
    instance_annotations,
    make_scene,
    outline,
    position,
    relation,
    render,
    shape_from_annotation,
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
    "instance_annotations",
    "make_scene",
    "outline",
    "position",
    "relation",
    "render",
    "shape_from_annotation",
]
