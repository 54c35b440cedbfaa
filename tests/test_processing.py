import json

import numpy as np
import pytest
import torch
from PIL import Image

from vision_gpt import ImageLoadError, VisionGPTProcessor, load_image

START = 50256


def pixel(image, xy=(0, 0)):
    return load_image(image).getpixel(xy)


# ----- images: modes ---------------------------------------------------------------------------------------------


def test_greyscale_and_cmyk_become_rgb():
    assert pixel(Image.new("L", (4, 4), 200)) == (200, 200, 200)
    assert pixel(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (255, 0, 0)


def test_transparency_is_composited_on_white():
    assert pixel(Image.new("RGBA", (4, 4), (255, 0, 0, 0))) == (255, 255, 255)
    assert pixel(Image.new("RGBA", (4, 4), (255, 0, 0, 255))) == (255, 0, 0)
    assert pixel(Image.new("LA", (4, 4), (0, 0))) == (255, 255, 255)
    assert pixel(Image.new("LA", (4, 4), (0, 255))) == (0, 0, 0)


def test_palette_with_transparent_index_is_white_where_transparent():
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255] + [255, 0, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    rgb = load_image(image)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (255, 0, 0)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    array = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(array).save(path)
    opened = Image.open(path)
    assert opened.mode in ("I;16", "I")
    rgb = load_image(path)
    assert [rgb.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top  # the red half is on top once rotated clockwise
    assert bottom[2] > 200 and bottom[0] < 60, bottom


def test_arrays_and_tensors_in_any_layout():
    hwc = np.zeros((5, 6, 3), dtype=np.uint8)
    hwc[..., 1] = 255
    assert load_image(hwc).size == (6, 5) and pixel(hwc) == (0, 255, 0)
    assert load_image(hwc.transpose(2, 0, 1)).size == (6, 5)
    assert pixel(torch.ones(3, 5, 6) * 0.5) == (128, 128, 128)
    assert pixel(np.full((5, 6), 1.0, dtype=np.float32)) == (255, 255, 255)
    assert pixel(np.full((5, 6, 4), [10, 20, 30, 255], dtype=np.uint8)) == (10, 20, 30)


# ----- images: errors --------------------------------------------------------------------------------------------


def test_missing_empty_and_non_image_files_name_the_file(tmp_path):
    with pytest.raises(ImageLoadError, match="nowhere.jpg.*does not exist"):
        load_image(tmp_path / "nowhere.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty.jpg.*empty"):
        load_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image at all")
    with pytest.raises(ImageLoadError, match="notes.jpg.*not an image"):
        load_image(text)
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)


def test_truncated_file_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cut.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg.*could not be decoded"):
        load_image(path)


def test_decompression_bomb_guard_stays_on(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("L", (200, 200)).save(path)
    # The guard refuses images over twice MAX_IMAGE_PIXELS; lower the limit instead of writing a 180-megapixel file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageLoadError, match="huge.png.*too large"):
        load_image(path)


def test_bad_arrays_and_types_are_refused():
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 3, 4, 5), dtype=np.uint8))
    with pytest.raises(ImageLoadError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 3.0))
    with pytest.raises(ImageLoadError, match="NaN"):
        load_image(np.full((4, 4, 3), np.nan))
    with pytest.raises(ImageLoadError, match="dtype"):
        load_image(np.zeros((4, 4, 3), dtype=np.int64))
    with pytest.raises(ImageLoadError, match="dict input"):
        load_image({"image": 1})


def test_processor_error_names_the_bad_file_in_a_batch(processor, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8)).save(good)
    with pytest.raises(ValueError, match="missing.png"):
        processor(images=[good, tmp_path / "missing.png"])


# ----- processor -------------------------------------------------------------------------------------------------


def test_images_are_resized_and_normalised_with_imagenet_statistics(processor):
    white = Image.new("RGB", (50, 70), (255, 255, 255))
    pixel_values = processor(images=[white])["pixel_values"]
    assert pixel_values.shape == (1, 3, 32, 32)
    expected = (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixel_values[0, :, 0, 0], expected)


def test_captions_become_right_padded_ids_mask_and_labels(processor):
    batch = processor(images=[Image.new("RGB", (8, 8))] * 2, suffix=["A dog runs!", "hi"])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    dog = processor.tokenizer("A dog runs!")["input_ids"]
    assert 0 in dog  # "!" is GPT-2's token 0
    assert ids[0].tolist() == [START] + dog + [START]
    assert mask[0].tolist() == [1] * (len(dog) + 2)
    assert labels[0].tolist() == [-100] + dog + [START]  # token 0 and the end token are targets
    short = processor.tokenizer("hi")["input_ids"]
    padding = len(dog) - len(short)
    assert mask[1].tolist() == [1] * (len(short) + 2) + [0] * padding
    assert labels[1].tolist() == [-100] + short + [START] + [-100] * padding


def test_long_captions_are_truncated_but_keep_their_end_token(processor):
    batch = processor(suffix=["word " * 100], max_length=10)
    assert batch["input_ids"].shape == (1, 10)
    assert batch["input_ids"][0, -1].item() == START and batch["labels"][0, -1].item() == START


def test_text_kwargs_pad_captions_to_max_length(processor):
    assert processor.max_length == 64
    batch = processor(suffix=["a dog", "hi"], text_kwargs={"padding": "max_length", "max_length": 12})
    assert batch["input_ids"].shape == (2, 12)
    dog = processor.tokenizer("a dog")["input_ids"]
    assert batch["labels"][0].tolist() == [-100] + dog + [START] + [-100] * (12 - len(dog) - 2)


def test_flat_text_options_equal_nested_ones(processor):
    options = {"max_length": 8, "padding": "max_length", "pad_to_multiple_of": 5}
    flat = processor(suffix=["word " * 30], **options)
    nested = processor(suffix=["word " * 30], text_kwargs=options)
    assert flat["input_ids"].shape == (1, 10)  # truncated to 8, padded to a multiple of 5
    assert flat["input_ids"][0, 7].item() == START and flat["attention_mask"][0].tolist() == [1] * 8 + [0] * 2
    for key in flat:
        assert torch.equal(flat[key], nested[key]), key


def test_prompts_take_padding_options_and_stay_left_padded(processor):
    photo = processor.tokenizer("a photo of")["input_ids"]
    batch = processor(prompt=["a", "a photo of"], padding="max_length", max_length=8)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [0] * (7 - len(photo)) + [1] * (1 + len(photo))


def test_return_tensors_none_gives_lists(processor):
    hi = processor.tokenizer("hi")["input_ids"]
    assert processor(suffix="hi", return_tensors=None)["input_ids"] == [[START] + hi + [START]]


def test_images_kwargs_reach_the_image_processor(processor):
    white = Image.new("RGB", (50, 70), (255, 255, 255))
    unnormalised = processor(images=[white], images_kwargs={"do_normalize": False})["pixel_values"]
    assert torch.all(unnormalised == 1.0)
    assert processor(images=[white], size={"height": 16, "width": 16})["pixel_values"].shape == (1, 3, 16, 16)


def test_an_option_given_flat_and_nested_is_refused(processor):
    with pytest.raises(ValueError, match="max_length was passed two times"):
        processor(suffix="a", max_length=8, text_kwargs={"max_length": 9})


def test_unknown_and_unsupported_options_are_refused(processor):
    with pytest.raises(TypeError, match="unexpected keyword argument `max_lenght`"):
        processor(suffix="a", max_lenght=8)
    with pytest.raises(ValueError, match="does not take the tokenizer options \\['return_overflowing_tokens'\\]"):
        processor(suffix="a", return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="`return_offsets_mapping` maps prompt .*; no `suffix`"):
        processor(suffix="a", return_offsets_mapping=True)
    with pytest.raises(TypeError, match="when called, not when built"):
        VisionGPTProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, max_length=32)


def test_tokenizer_init_kwargs_set_the_caption_default_but_not_the_padding_side(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    # from_pretrained hands these to the tokenizer, as transformers' processors do.
    loaded = VisionGPTProcessor.from_pretrained(tmp_path, max_length=12, padding_side="left")
    assert loaded.max_length == 12
    batch = loaded(suffix=["word " * 30, "hi"])
    assert batch["input_ids"].shape == (2, 12)
    assert batch["attention_mask"][1].tolist() == [1] * 3 + [0] * 9  # captions stay right-padded


def test_saved_processor_keeps_auto_map_and_reloads_equal(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["auto_map"] == {"AutoProcessor": "processing_vision_gpt.VisionGPTProcessor"}
    assert VisionGPTProcessor.from_pretrained(tmp_path).to_dict() == processor.to_dict()


def test_prompts_are_left_padded_without_end_token_or_labels(processor):
    batch = processor(prompt=["a", "a photo of"])
    assert "labels" not in batch
    assert batch["attention_mask"][0].tolist()[0] == 0 and batch["attention_mask"][0].tolist()[-1] == 1
    assert batch["input_ids"][1].tolist() == [START] + processor.tokenizer("a photo of")["input_ids"]


def test_batch_decode_returns_clean_captions(processor):
    ids = [[START] + processor.tokenizer(" a dog runs ")["input_ids"] + [START, START]]
    assert processor.batch_decode(ids) == ["a dog runs"]


def test_processor_input_errors(processor):
    with pytest.raises(ValueError, match="2 images but 1 texts; pass one per image"):
        processor(images=[Image.new("RGB", (8, 8))] * 2, text=["one"])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        processor(images=[Image.new("RGB", (8, 8))] * 2, suffix=["one"])
    with pytest.raises(ValueError, match="`prompt` is the former name of `text`"):
        processor(text="a", prompt="b")
    with pytest.raises(ValueError, match="`suffix` must hold strings, got NoneType"):
        processor(suffix=[None])
    with pytest.raises(ValueError, match="2 texts but 1 suffixes"):
        processor(text=["a", "b"], suffix=["c"])
    with pytest.raises(ValueError, match="`images\\[0\\]` holds 2 images"):
        processor(images=[[Image.new("RGB", (8, 8))] * 2], text=["<image>"])
    with pytest.raises(ValueError, match="empty list"):
        processor(images=[])


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = VisionGPTProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (9, 7), (10, 200, 30))
    a, b = processor(images=image, suffix="a cat"), loaded(images=image, suffix="a cat")
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----- image tokens, prompts and chat ----------------------------------------------------------------------------

IMAGE = 50257  # the tiny model's image token: one past GPT-2's vocabulary
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def image_processor(processor):
    """The session processor, expanding `<image>` into 3 image tokens."""
    return VisionGPTProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                              num_image_tokens=3, image_token_id=IMAGE)


def test_an_image_placeholder_becomes_image_tokens_with_the_start_token_after_them(image_processor):
    photo = image_processor.tokenizer("a photo of")["input_ids"]
    batch = image_processor(images=[Image.new("RGB", (8, 8))] * 2, text=["<image>a photo of", "look <image> a"],
                            return_tensors=None)
    a = image_processor.tokenizer("a")["input_ids"]
    look = image_processor.tokenizer("look")["input_ids"]
    assert batch["input_ids"][0] == [IMAGE] * 3 + [START] + photo
    row = look + [IMAGE] * 3 + [START] + a  # PaliGemma's rule: the start token follows the last image token
    assert batch["input_ids"][1] == [START] * (len(batch["input_ids"][0]) - len(row)) + row  # left padding
    assert "labels" not in batch
    # A padded prompt that starts with its image keeps it first, padding after it, as the model lays out a prompt
    # without a placeholder (so that generate encodes the prefix once per image).
    led = image_processor(images=[Image.new("RGB", (8, 8))] * 2, text=["<image>a photo of", " <image> a"])
    plain = image_processor(text=["a photo of", "a"])
    images = torch.full((2, 3), IMAGE)
    assert torch.equal(led["input_ids"], torch.cat([images, plain["input_ids"]], dim=1))
    assert torch.equal(led["attention_mask"], torch.cat([torch.ones(2, 3, dtype=torch.long), plain["attention_mask"]],
                                                        dim=1))
    # Offsets index the text as given: the image and start tokens cover no characters.
    text = "look <image> a photo"
    mapped = image_processor(images=Image.new("RGB", (8, 8)), text=text, return_offsets_mapping=True,
                             return_tensors=None)
    spans = [text[begin:end] for begin, end in mapped["offset_mapping"][0]]
    assert spans == ["look", "", "", "", "", "a", " photo"]
    # Without a placeholder the text has no image tokens: the model puts the image first.
    assert image_processor(images=Image.new("RGB", (8, 8)), text="a", return_tensors=None)["input_ids"] == [[START] + a]


def test_a_prompt_before_a_caption_is_not_a_target(image_processor):
    batch = image_processor(images=[Image.new("RGB", (8, 8))] * 2, text=["<image>a photo of", "<image>"],
                            suffix=["a dog", "two cats run"], return_tensors=None)
    tokens = image_processor.tokenizer
    prompt = [IMAGE] * 3 + [START] + tokens("a photo of")["input_ids"]
    dog = tokens("a dog")["input_ids"] + [START]
    assert batch["input_ids"][0] == prompt + dog
    assert batch["labels"][0] == [-100] * len(prompt) + dog  # only the caption and its end token are learnt
    cats = tokens("two cats run")["input_ids"] + [START]
    padding = len(batch["input_ids"][0]) - (4 + len(cats))
    assert batch["labels"][1] == [-100] * 4 + cats + [-100] * padding  # right padding
    # Truncation cuts the caption, never the prompt or the end token.
    cut = image_processor(text="<image>a photo of", images=Image.new("RGB", (8, 8)), suffix="word " * 50,
                          max_length=6, return_tensors=None)
    assert cut["input_ids"][0][: len(prompt)] == prompt and len(cut["input_ids"][0]) == len(prompt) + 5
    assert cut["input_ids"][0][-1] == START


def test_placeholders_must_match_the_images(image_processor, processor):
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="Text 1 holds 0 image placeholders .* but has 1 images"):
        image_processor(images=[image, image], text=["<image>a", "b"])
    with pytest.raises(ValueError, match="Text 0 holds 2 image placeholders"):
        image_processor(images=[image], text=["<image><image>a"])
    with pytest.raises(ValueError, match="Text 0 holds 1 image placeholders .* but has 0 images"):
        image_processor(text="<image>a")
    with pytest.raises(ValueError, match="Texts \\[0\\] have no image"):
        image_processor(images=[[], [image]], text=["a", "b"])
    with pytest.raises(ValueError, match="an empty list, which marks a text without an image"):
        image_processor(images=[[image], []])
    with pytest.raises(ValueError, match="Got 2 image lists \\(1 images\\) but 1 texts"):
        image_processor(images=[[image], []], text=["<image>"])
    with pytest.raises(ValueError, match="Text 1 is empty"):
        image_processor(text=["a", ""], add_special_tokens=False)
    with pytest.raises(ValueError, match="Text 0 is 7 tokens long .* max_length=6"):
        image_processor(images=[image], text=["<image>a photo of"], padding="max_length", max_length=6)
    # A processor that does not know the model's image tokens (saved before it did, or cross-attention) says so.
    with pytest.raises(ValueError, match="does not know how many image tokens.*use_image_tokens_of"):
        processor(images=[image], text="<image>a")
    with pytest.raises(ValueError, match="together"):
        VisionGPTProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                           num_image_tokens=3)


def test_texts_without_an_image_sit_next_to_texts_with_one(image_processor):
    image = Image.new("RGB", (8, 8))
    both = image_processor(images=[[image], [image]], text=["<image>a", "<image>two"])
    mixed = image_processor(images=[[], [image]], text=["lower newer", "<image>two"])
    assert mixed["pixel_values"].shape[0] == 1
    assert both["input_ids"][1].tolist() == mixed["input_ids"][1].tolist()
    assert IMAGE not in mixed["input_ids"][0].tolist()


def test_image_tokens_follow_the_model_config_and_are_saved(image_processor, tmp_path):
    from .conftest import tiny_config

    image_processor.use_image_tokens_of(tiny_config(fusion="prefix", visual_tokens="queries", num_visual_tokens=5))
    assert (image_processor.num_image_tokens, image_processor.image_token_id) == (5, IMAGE)
    image_processor.save_pretrained(tmp_path)
    loaded = VisionGPTProcessor.from_pretrained(tmp_path)
    assert (loaded.num_image_tokens, loaded.image_token_id) == (5, IMAGE)
    image_processor.use_image_tokens_of(tiny_config(fusion="cross_attention"))
    assert image_processor.num_image_tokens is None and image_processor.image_token_id is None


def test_decoding_drops_image_tokens(image_processor):
    ids = torch.tensor([[IMAGE] * 3 + [START] + image_processor.tokenizer("a dog")["input_ids"]])
    assert image_processor.batch_decode(ids) == ["a dog"]
    assert image_processor.decode(ids[0]) == "a dog"
    assert image_processor.decode(ids[0, -1]) == "dog"  # one id, as a 0-d tensor
    assert image_processor.post_process_image_text_to_text(ids) == ["a dog"]
    assert image_processor.post_process_image_text_to_text(ids[0]) == "a dog"  # one sequence, one text
    assert image_processor.batch_decode(list(ids)) == ["a dog"]  # a list of 1-D tensors
    assert image_processor.post_process_image_text_to_text(ids, skip_special_tokens=False) == ["<|endoftext|>a dog"]


def test_chat_messages_use_the_tokenizers_template_with_image_placeholders(image_processor, tmp_path):
    import copy

    image = Image.new("RGB", (8, 8), (200, 10, 10))
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "What is this?"}]}]
    with pytest.raises(ValueError, match="Neither this processor nor its tokenizer has a chat template"):
        image_processor.apply_chat_template(messages)
    chat = copy.copy(image_processor)
    chat.tokenizer = copy.deepcopy(image_processor.tokenizer)
    chat.tokenizer.chat_template = CHATML
    prompt = chat.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n"
    inputs = chat.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="pt")
    before, after = prompt.split("<image>")
    tokens = chat.tokenizer
    # The text as the template wrote it, no start token added; the image's tokens where its item was.
    expected = tokens(before)["input_ids"] + [IMAGE] * 3 + tokens(after)["input_ids"]
    assert inputs["input_ids"][0].tolist() == expected
    torch.testing.assert_close(inputs["pixel_values"], chat(images=image)["pixel_values"])
    batch = chat.apply_chat_template([messages, [{"role": "user", "content": "hi"}]], tokenize=True,
                                     return_dict=True, processor_kwargs={"padding": True})
    assert batch["pixel_values"].shape[0] == 1 and batch["input_ids"].shape[0] == 2
    # Processor options given flat reach the processor, not the template (as older pipelines pass them).
    flat = chat.apply_chat_template([messages, [{"role": "user", "content": "hi"}]], tokenize=True, return_dict=True,
                                    padding=True)
    assert torch.equal(flat["input_ids"], batch["input_ids"])
    with pytest.raises(ValueError, match="`return_assistant_tokens_mask` needs a chat template with"):
        chat.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    # Saved, the tokenizer's template comes back as the processor's too: it is still read as a text template.
    chat.save_pretrained(tmp_path)
    reloaded = VisionGPTProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == CHATML
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True) == prompt
    again = reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert again[0].tolist() == expected
    # Image items as OpenAI's image_url and as base64 (a data URL) read the same image.
    import base64
    import io

    png = io.BytesIO()
    image.save(png, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    path = tmp_path / "photo.png"
    image.save(path)
    for item in ({"type": "image", "base64": data_url}, {"type": "image_url", "image_url": {"url": str(path)}}):
        other = [{"role": "user", "content": [item, {"type": "text", "text": "What is this?"}]}]
        got = chat.apply_chat_template(other, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert torch.equal(got["input_ids"], inputs["input_ids"])
        torch.testing.assert_close(got["pixel_values"], inputs["pixel_values"])
    # Images in messages need the model's image tokens.
    unaware = copy.copy(chat)
    unaware.num_image_tokens = unaware.image_token_id = None
    with pytest.raises(ValueError, match="messages hold images, but this processor does not know"):
        unaware.apply_chat_template(messages, tokenize=True)
    with pytest.raises(ValueError, match="not 'video' items"):
        chat.apply_chat_template([{"role": "user", "content": [{"type": "video", "path": "a.mp4"}]}])
    # A processor chat template of its own goes through transformers' ProcessorMixin.apply_chat_template.
    chat.chat_template = "{% for m in messages %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endfor %}"
    assert chat.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hey"}]}]) == "hey"


# A multimodal ChatML whose assistant turns are marked for assistant masks.
MULTIMODAL_CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'][0]['text'] }}<|im_end|>{% endgeneration %}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_chat_template_of_the_processors_own_survives_saving_and_gives_assistant_masks(image_processor, tmp_path):
    import copy

    tokenizer = copy.deepcopy(image_processor.tokenizer)
    tokenizer.chat_template = CHATML  # the decoder's own, for text
    chat = VisionGPTProcessor(image_processor=image_processor.image_processor, tokenizer=tokenizer,
                              num_image_tokens=3, image_token_id=IMAGE, chat_template=MULTIMODAL_CHATML)
    assert chat.has_own_chat_template()
    chat.save_pretrained(tmp_path)
    reloaded = VisionGPTProcessor.from_pretrained(tmp_path)
    assert reloaded.has_own_chat_template() and reloaded.chat_template == MULTIMODAL_CHATML
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (8, 8))},
                                             {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "It is red."}]}]
    for processor in (chat, reloaded):
        inputs = processor.apply_chat_template(messages, tokenize=True, return_dict=True,
                                               return_assistant_tokens_mask=True, padding=True)  # padding given flat
        ids, mask = inputs["input_ids"][0], torch.as_tensor(inputs["assistant_masks"][0]).bool()
        assert ids[0].item() != START and (ids == IMAGE).sum() == 3  # no start token, the image's 3 tokens
        assert processor.tokenizer.decode(ids[mask]) == "It is red.<|im_end|>"
