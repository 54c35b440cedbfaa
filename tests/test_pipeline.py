import pytest
from transformers import pipeline

from vision_gpt import VisionGPTImageToTextPipeline

from .conftest import random_images, tiny_model


@pytest.fixture(scope="module")
def captioner(tmp_path_factory, processor):
    folder = tmp_path_factory.mktemp("pipeline-repo")
    tiny_model(fusion="cross_attention", visual_tokens="patches").save_pretrained(folder)
    processor.save_pretrained(folder)
    return pipeline("image-to-text", model=str(folder), pipeline_class=VisionGPTImageToTextPipeline)


def test_single_image_gives_one_caption_and_a_list_gives_one_list_per_image(captioner, tmp_path):
    images = random_images(3, seed=11)
    path = tmp_path / "photo.jpg"
    images[0].save(path)
    single = captioner(images[0], max_new_tokens=5)
    assert isinstance(single, list) and set(single[0]) == {"generated_text"} and single[0]["generated_text"]
    assert captioner(str(path), max_new_tokens=5)[0]["generated_text"]
    many = captioner(images, max_new_tokens=5, num_beams=1)
    assert len(many) == 3 and all(len(item) == 1 for item in many)


def test_batching_and_return_sequences_keep_captions_with_their_images(captioner):
    images = random_images(3, seed=12)
    kwargs = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2)
    alone = [captioner(image, **kwargs) for image in images]
    batched = captioner(images, batch_size=2, **kwargs)
    assert batched == alone
    assert all(len(item) == 2 for item in batched)


def test_prompt_and_generate_kwargs(captioner):
    image = random_images(1, seed=13)[0]
    out = captioner(image, prompt="a photo of", generate_kwargs={"max_new_tokens": 3, "num_beams": 1})
    assert out[0]["generated_text"].startswith("a photo of")
    with pytest.raises(ValueError, match="max_new_tokens"):
        captioner(image, max_new_tokens=3, generate_kwargs={"max_new_tokens": 4})


def test_bad_image_file_is_a_clear_error(captioner, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="broken.jpg"):
        captioner(str(bad))


def test_bfloat16_pipeline_captions(captioner):
    import torch

    bf16 = pipeline("image-to-text", model=captioner.model.name_or_path, dtype=torch.bfloat16,
                    pipeline_class=VisionGPTImageToTextPipeline)
    assert bf16.model.dtype == torch.bfloat16
    assert bf16(random_images(1, seed=14)[0], max_new_tokens=4, num_beams=1)[0]["generated_text"]
