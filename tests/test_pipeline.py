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


# ----- transformers' own image-text-to-text pipeline -------------------------------------------------------------

def greedy():
    # A new dict each call: transformers 5.12's pipeline writes max_new_tokens into the generate_kwargs it is given.
    return {"max_new_tokens": 5, "generate_kwargs": {"num_beams": 1}}


@pytest.fixture(scope="module")
def answerer(tmp_path_factory, processor):
    """transformers' `image-text-to-text` pipeline on a prefix repo whose processor knows its 4 image tokens."""
    import copy

    folder = tmp_path_factory.mktemp("image-text-to-text-repo")
    model = tiny_model(fusion="prefix", visual_tokens="queries", num_visual_tokens=4)
    processor = copy.copy(processor)
    processor.use_image_tokens_of(model.config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)


def test_image_text_to_text_continues_a_prompt_as_generate_does(answerer):
    model, processor = answerer.model, answerer.processor
    images = random_images(2, seed=21)
    expected = processor.batch_decode(model.generate(**processor(images=images, text=["a photo of", "two"]),
                                                     max_new_tokens=5, num_beams=1))
    out = answerer(images=images[0], text="a photo of", **greedy())
    assert out[0]["input_text"] == "a photo of" and out[0]["generated_text"].startswith("a photo of")
    assert out[0]["generated_text"].strip() == expected[0]
    batch = answerer(images=images, text=["a photo of", "two"], **greedy())
    assert [item["generated_text"].strip() for item in batch] == expected
    new = answerer(images=images[0], text="a photo of", return_full_text=False, **greedy())[0]["generated_text"]
    assert ("a photo of" + new).strip() == expected[0]
    # The image's place written out in the text is the layout the model gives a prompt without one.
    placed = answerer(images=images[0], text="<image>a photo of", return_full_text=False, **greedy())
    assert placed[0]["generated_text"] == new


def test_image_text_to_text_returns_the_scores_generate_gives_when_asked(answerer):
    # The repo's own pipeline (custom_pipelines), loaded through its remote code.
    assert type(answerer).__name__ == "VisionGPTImageTextToTextPipeline"
    model, processor = answerer.model, answerer.processor
    images, prompts = random_images(2, seed=23), ["a photo of", "two"]
    plain = answerer(images=images, text=prompts, **greedy())
    assert set(plain[0]) == {"input_text", "generated_text"}
    scored = answerer(images=images, text=prompts, return_caption_scores=True, batch_size=2, **greedy())
    assert [row["generated_text"] for row in scored] == [row["generated_text"] for row in plain]
    output = model.generate(**processor(images=images, text=prompts), max_new_tokens=5, num_beams=1,
                            output_caption_scores=True)
    for row, confidence, grounding in zip(scored, output.caption_scores.confidence, output.caption_scores.grounding):
        assert row["confidence"] == pytest.approx(float(confidence), abs=1e-5)
        assert row["grounding"] == pytest.approx(float(grounding), abs=1e-5)
    # Several returns per image: one record each, each with the scores of its own sequence.
    beams = dict(max_new_tokens=5, generate_kwargs={"num_beams": 3, "num_return_sequences": 2})
    returned = answerer(images=images[0], text=prompts[0], return_caption_scores=True, **beams)
    output = model.generate(**processor(images=images[:1], text=prompts[:1]), max_new_tokens=5, num_beams=3,
                            num_return_sequences=2, output_caption_scores=True)
    # Older transformers (5.12) return only the first of several sequences per prompt; each keeps its own score.
    assert 1 <= len(returned) <= 2
    expected = output.caption_scores.confidence.tolist()[:len(returned)]
    assert [row["confidence"] for row in returned] == pytest.approx(expected, abs=1e-5)


def test_image_text_to_text_scores_with_the_package_installed_and_no_remote_code(answerer, tmp_path):
    from vision_gpt import VisionGPTImageTextToTextPipeline

    answerer.model.save_pretrained(tmp_path)
    answerer.processor.save_pretrained(tmp_path)
    # The repo declares its own pipeline, so transformers asks for trust_remote_code unless the class is given.
    with pytest.raises(ValueError, match="trust_remote_code"):
        pipeline("image-text-to-text", model=str(tmp_path))
    installed = pipeline("image-text-to-text", model=str(tmp_path), pipeline_class=VisionGPTImageTextToTextPipeline)
    image = random_images(1, seed=24)[0]
    expected = answerer(images=image, text="a photo of", return_caption_scores=True, **greedy())
    assert installed(images=image, text="a photo of", return_caption_scores=True, **greedy()) == expected


def test_image_text_to_text_takes_chat_messages_with_an_image(answerer):
    import copy

    from .test_processing import CHATML

    chat = copy.copy(answerer)
    chat.processor = copy.copy(answerer.processor)
    chat.processor.tokenizer = copy.deepcopy(answerer.processor.tokenizer)
    chat.processor.tokenizer.chat_template = CHATML
    image = random_images(1, seed=22)[0]
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is in the picture?"}]}]
    out = chat(text=messages, **greedy())[0]["generated_text"]
    assert out[:-1] == messages and out[-1]["role"] == "assistant"
    inputs = chat.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
    ids = chat.model.generate(**inputs, max_new_tokens=5, num_beams=1)
    assert out[-1]["content"] == chat.processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1]:],
                                                                 skip_special_tokens=True)
    # An assistant message at the end is continued, not answered.
    prefill = messages + [{"role": "assistant", "content": [{"type": "text", "text": "It is"}]}]
    continued = chat(text=prefill, **greedy())[0]["generated_text"]
    assert len(continued) == 2 and continued[-1]["content"][0]["text"].startswith("It is")
    # GPT-2's tokenizer has no chat template: the error says what to do instead.
    with pytest.raises(ValueError, match="no chat template|not a chat model"):
        answerer(text=messages, **greedy())
