import io
import json
import pickle

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image, Value

from vision_gpt import VisionGPTCaptioner, VisionGPTForConditionalGeneration, VisionGPTProcessor

from .conftest import random_images

SETTINGS = dict(num_beams=1, max_new_tokens=6, min_new_tokens=6)


@pytest.fixture(scope="module")
def captioner(tiny_model_dir):
    return VisionGPTCaptioner(str(tiny_model_dir), **SETTINGS)


@pytest.fixture(scope="module")
def images():
    return random_images(4, seed=11)


def expected_captions(folder, images, **settings):
    """What `generate` writes for the images, one batch, as a user would call it."""
    model = VisionGPTForConditionalGeneration.from_pretrained(folder).eval()
    processor = VisionGPTProcessor.from_pretrained(folder)
    return processor.batch_decode(model.generate(**processor(images=images), **settings))


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_kind_of_cell_is_captioned_as_generate_does_and_bad_ones_become_error_rows(
        captioner, tiny_model_dir, images, tmp_path):
    path = tmp_path / "photo.png"
    images[2].save(path)
    batch = {
        "image": [png_bytes(images[0]), images[1], str(path), np.asarray(images[3]), b"not an image",
                  str(tmp_path / "missing.jpg")],
        "id": [10, 11, 12, 13, 14, 15],
    }
    out = captioner(batch)
    expected = expected_captions(tiny_model_dir, images, **SETTINGS)
    assert out["caption"][:4] == expected
    assert len(set(expected)) > 1  # the images matter, so equality means something
    assert out["caption"][4:] == ["", ""]
    assert out["error"][:4] == [""] * 4
    assert "not an image" in out["error"][4] and "missing.jpg" in out["error"][5]
    assert out["id"] == batch["id"] and out["image"] is batch["image"]  # the batch's own columns come back as given
    assert out["model"] == [str(tiny_model_dir)] * 6 and out["model_revision"] == [""] * 6
    decoding = json.loads(out["decoding"][0])
    assert decoding["num_beams"] == 1 and decoding["max_new_tokens"] == 6 and decoding["dtype"] == "float32"
    assert decoding["temperature"] is None  # greedy never reads it
    assert "captions" not in out


def test_several_captions_per_image_come_with_their_scores(tiny_model_dir, images):
    captioner = VisionGPTCaptioner(str(tiny_model_dir), num_beams=3, num_return_sequences=2, max_new_tokens=6)
    out = captioner({"image": images[:2]})
    expected = expected_captions(tiny_model_dir, images[:2], num_beams=3, num_return_sequences=2, max_new_tokens=6)
    assert out["captions"] == [expected[:2], expected[2:]]
    assert out["caption"] == [expected[0], expected[2]]
    assert all(len(scores) == 2 and scores[0] >= scores[1] for scores in out["scores"])


def test_datasets_map_adds_the_columns_and_fingerprints_without_the_weights(captioner, tiny_model_dir, images,
                                                                           tmp_path):
    stored = Dataset.from_dict(
        {"image": [{"bytes": png_bytes(image), "path": None} for image in images[:3]] + [{"bytes": b"x", "path": None}],
         "reference": ["a", "b", "c", "d"]},
        features=Features({"image": Image(decode=False), "reference": Value("string")}),
    )
    out = stored.map(captioner, batched=True, batch_size=3)
    assert out["caption"][:3] == expected_captions(tiny_model_dir, images[:3], **SETTINGS)
    assert out["caption"][3] == "" and "row 0 of the batch" in out["error"][3]  # the second batch's only row
    assert out["reference"] == ["a", "b", "c", "d"]
    # Pickling carries the constructor's arguments, not the model, and rebuilds an equal captioner.
    assert len(pickle.dumps(captioner)) < 2000
    assert pickle.loads(pickle.dumps(captioner))({"image": images[:1]})["caption"] == out["caption"][:1]


def test_a_first_batch_of_unreadable_images_fixes_no_column_type(tiny_model_dir, images):
    # Arrow writers take a column's type from the first batch: an all-error batch must be typed like the others.
    captioner = VisionGPTCaptioner(str(tiny_model_dir), num_beams=2, num_return_sequences=2, max_new_tokens=4)
    rows = Dataset.from_dict({"image": [b"bad", b"bad", png_bytes(images[0]), png_bytes(images[1])]})
    out = rows.map(captioner, batched=True, batch_size=2)
    assert out["caption"][:2] == ["", ""] and all(out["caption"][2:]) and not any(out["error"][2:])
    assert out["captions"][0] == ["", ""] and len(out["captions"][2]) == 2


def test_pandas_batches_come_back_as_data_frames(captioner, images):
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"image": [png_bytes(image) for image in images[:2]]})
    out = captioner(frame)
    assert isinstance(out, pandas.DataFrame) and list(out.columns)[:3] == ["image", "caption", "error"]


def test_numpy_batches_get_numpy_columns(captioner, images):
    batch = {"bytes": np.array([png_bytes(image) for image in images[:2]], dtype=object)}
    out = VisionGPTCaptioner.__call__(captioner, {"image": batch["bytes"]})
    assert isinstance(out["caption"], np.ndarray) and out["caption"].dtype == object


def test_bad_arguments_and_batches_are_refused_with_what_to_do(captioner, tiny_model_dir, images):
    with pytest.raises(ValueError, match="dtype int8 is a quantized ONNX export's"):
        VisionGPTCaptioner(str(tiny_model_dir), dtype="int8")
    with pytest.raises(ValueError, match="dtype fp64 is not one of float32|fp32, bfloat16|bf16"):
        VisionGPTCaptioner(str(tiny_model_dir), dtype="fp64")
    # The same messages as the command line's: the one decoding check names the flag and the keyword.
    with pytest.raises(ValueError, match=r"--temperature \(temperature\) only matters with --do-sample \(do_sample\)"):
        VisionGPTCaptioner(str(tiny_model_dir), temperature=0.7)
    with pytest.raises(ValueError, match=r"--num-captions \(num_return_sequences\) 3 needs at least as many beams"):
        VisionGPTCaptioner(str(tiny_model_dir), num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="one by one .* not a generation_config"):
        VisionGPTCaptioner(str(tiny_model_dir), generation_config=None)
    with pytest.raises(KeyError, match="no column 'image'.*image_column="):
        captioner({"img": images[:1]})
    with pytest.raises(ValueError, match=r"already has the column\(s\) \['caption'\]"):
        captioner({"image": images[:1], "caption": ["a reference"]})


def test_sampling_is_seeded_per_batch(tiny_model_dir, images):
    sampled = dict(do_sample=True, temperature=1.5, max_new_tokens=6, seed=7)
    first = VisionGPTCaptioner(str(tiny_model_dir), **sampled)
    torch.manual_seed(123)  # whatever the process's generator holds, a batch's captions are the seed's
    assert first({"image": images})["caption"] == first({"image": images})["caption"]
    assert json.loads(first({"image": images[:1]})["decoding"][0])["seed"] == 7
    several = VisionGPTCaptioner(str(tiny_model_dir), num_return_sequences=3, **sampled)({"image": images[:2]})
    assert all(scores == sorted(scores, reverse=True) for scores in several["scores"])  # best first, sampled too


def test_ray_data_map_batches_with_two_actors_captions_each_image_once(tiny_model_dir, images, tmp_path):
    ray = pytest.importorskip("ray", reason="Ray Data is in the test extras; `pip install 'ray[data]'`")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        cells = [png_bytes(image) for image in images] + [b"not an image"]
        rows = ray.data.from_items([{"id": i, "image": cell} for i, cell in enumerate(cells)])
        captioned = rows.map_batches(
            VisionGPTCaptioner, fn_constructor_kwargs={"model": str(tiny_model_dir), **SETTINGS},
            compute=ray.data.ActorPoolStrategy(size=2), batch_size=2,
        )
        out = sorted(captioned.take_all(), key=lambda row: row["id"])
    finally:
        ray.shutdown()
    assert [row["id"] for row in out] == list(range(5))  # every image exactly once
    assert [row["caption"] for row in out[:4]] == expected_captions(tiny_model_dir, images, **SETTINGS)
    assert out[4]["caption"] == "" and "not an image" in out[4]["error"]
    assert {row["model"] for row in out} == {str(tiny_model_dir)}
