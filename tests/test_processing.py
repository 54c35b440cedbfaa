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
    batch = processor(images=[Image.new("RGB", (8, 8))] * 2, text=["A dog runs!", "hi"])
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
    batch = processor(text=["word " * 100], max_length=10)
    assert batch["input_ids"].shape == (1, 10)
    assert batch["input_ids"][0, -1].item() == START and batch["labels"][0, -1].item() == START


def test_text_kwargs_pad_captions_to_max_length(processor):
    assert processor.max_length == 64
    batch = processor(text=["a dog", "hi"], text_kwargs={"padding": "max_length", "max_length": 12})
    assert batch["input_ids"].shape == (2, 12)
    dog = processor.tokenizer("a dog")["input_ids"]
    assert batch["labels"][0].tolist() == [-100] + dog + [START] + [-100] * (12 - len(dog) - 2)


def test_flat_text_options_equal_nested_ones(processor):
    options = {"max_length": 8, "padding": "max_length", "pad_to_multiple_of": 5}
    flat = processor(text=["word " * 30], **options)
    nested = processor(text=["word " * 30], text_kwargs=options)
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
    assert processor(text="hi", return_tensors=None)["input_ids"] == [[START] + hi + [START]]


def test_images_kwargs_reach_the_image_processor(processor):
    white = Image.new("RGB", (50, 70), (255, 255, 255))
    unnormalised = processor(images=[white], images_kwargs={"do_normalize": False})["pixel_values"]
    assert torch.all(unnormalised == 1.0)
    assert processor(images=[white], size={"height": 16, "width": 16})["pixel_values"].shape == (1, 3, 16, 16)


def test_an_option_given_flat_and_nested_is_refused(processor):
    with pytest.raises(ValueError, match="max_length was passed two times"):
        processor(text="a", max_length=8, text_kwargs={"max_length": 9})


def test_unknown_and_unsupported_options_are_refused(processor):
    with pytest.raises(TypeError, match="unexpected keyword argument `max_lenght`"):
        processor(text="a", max_lenght=8)
    with pytest.raises(ValueError, match="does not take the tokenizer options \\['return_offsets_mapping'\\]"):
        processor(text="a", return_offsets_mapping=True)
    with pytest.raises(TypeError, match="when called, not when built"):
        VisionGPTProcessor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, max_length=32)


def test_tokenizer_init_kwargs_set_the_caption_default_but_not_the_padding_side(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    # from_pretrained hands these to the tokenizer, as transformers' processors do.
    loaded = VisionGPTProcessor.from_pretrained(tmp_path, max_length=12, padding_side="left")
    assert loaded.max_length == 12
    batch = loaded(text=["word " * 30, "hi"])
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
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        processor(images=[Image.new("RGB", (8, 8))] * 2, text=["one"])
    with pytest.raises(ValueError, match="either `text`.*or `prompt`"):
        processor(text="a", prompt="b")
    with pytest.raises(ValueError, match="Captions must be strings"):
        processor(text=[None])
    with pytest.raises(ValueError, match="empty list"):
        processor(images=[])


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = VisionGPTProcessor.from_pretrained(tmp_path)
    image = Image.new("RGB", (9, 7), (10, 200, 30))
    a, b = processor(images=image, text="a cat"), loaded(images=image, text="a cat")
    for key in a:
        assert torch.equal(a[key], b[key]), key
