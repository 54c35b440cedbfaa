import json

import pytest
import torch

from vision_gpt.data.records import MAX_CAPTION_CHARS, normalize_caption
from vision_gpt.data.torch_datasets import CaptionCollator, CaptionPairDataset
from vision_gpt.data.layouts import detect_layout
from vision_gpt.data.factory import load_captioning_dataset
from vision_gpt.training.feature_cache import FeatureCache

from .conftest import tiny_model
from .data_fixtures import (write_coco, write_datasets, write_flickr8k, write_imagefolder, write_kaggle_flickr8k,
                            write_karpathy)


def counts(splits):
    return {name: (len(images), sum(len(i.captions) for i in images)) for name, images in splits.items()}


def test_flickr8k_original_layout(tmp_path):
    root = write_flickr8k(tmp_path / "f8k", train=4, val=2, test=2)
    assert detect_layout(root) == "flickr8k"
    splits, report = load_captioning_dataset("flickr8k", str(root))
    assert counts(splits) == {"train": (4, 20), "validation": (2, 10), "test": (2, 10)}
    assert not report.counts
    assert splits["train"][0].captions[0] == "a red square"  # lowercased, trailing " ." dropped


def test_karpathy_json_layout(tmp_path):
    root = write_karpathy(tmp_path / "k")
    assert detect_layout(root) == "karpathy"
    splits, _ = load_captioning_dataset("auto", str(root))
    assert counts(splits) == {"train": (6, 30), "validation": (2, 10), "test": (2, 10)}


def test_coco_captions_layout(tmp_path):
    root = write_coco(tmp_path / "coco")
    splits, _ = load_captioning_dataset("coco", str(root))
    assert counts(splits) == {"train": (6, 30), "validation": (2, 10)}


@pytest.mark.parametrize("numbered", [False, True])
def test_datasets_folder_with_caption_list_or_numbered_columns(tmp_path, numbered):
    root = write_datasets(tmp_path / "ds", numbered_columns=numbered)
    splits, _ = load_captioning_dataset(str(root))
    assert counts(splits) == {"train": (6, 30), "validation": (2, 10)}
    assert splits["train"][1].captions == ["a green square", "a green picture", "something green",
                                           "the colour green", "an image that is green"]


def test_bad_data_is_skipped_counted_and_reported(tmp_path):
    root = write_flickr8k(tmp_path / "f8k", train=6, val=2, test=2)
    images = root / "Flicker8k_Dataset"
    (images / "img_000.jpg").unlink()  # missing file
    data = (images / "img_001.jpg").read_bytes()
    (images / "img_001.jpg").write_bytes(data[: len(data) // 3])  # truncated
    with open(root / "Flickr8k.token.txt", "a") as tokens:
        tokens.write("ghost.jpg.1#0\ta caption for an image that does not exist\n")
        tokens.write("img_002.jpg#5\t   \n")  # empty caption
        tokens.write("no tab on this line\n")
    splits, report = load_captioning_dataset("flickr8k", str(root))
    assert report.counts == {"missing image files": 1, "unreadable images": 1,
                             "captions naming images in no split": 1, "empty captions": 1,
                             "malformed caption lines": 1}
    assert counts(splits)["train"] == (4, 20)
    summary = report.summary(splits)
    assert "img_000.jpg" in summary and "img_001.jpg" in summary and "ghost.jpg.1" in summary


def corrupt(path, old: bytes, new: bytes):
    raw = path.read_bytes()
    assert old in raw
    path.write_bytes(raw.replace(old, new, 1))


def test_a_flickr8k_line_that_is_not_utf8_is_skipped_counted_and_named(tmp_path):
    root = write_flickr8k(tmp_path / "f8k", train=4, val=2, test=2)
    with open(root / "Flickr8k.token.txt", "ab") as tokens:
        tokens.write(b"img_000.jpg#5\tcaf\xe9 au lait\n")
    corrupt(root / "Flickr_8k.devImages.txt", b"img_005.jpg", b"img_\xff05.jpg")
    splits, report = load_captioning_dataset("flickr8k", str(root))
    # img_005.jpg's captions then name an image in no split.
    assert report.counts == {"lines that are not UTF-8": 2, "captions naming images in no split": 1}
    assert counts(splits) == {"train": (4, 20), "validation": (1, 5), "test": (2, 10)}
    summary = report.summary(splits)
    assert "Skipped 2 (lines that are not UTF-8)" in summary
    assert "Flickr8k.token.txt line 41 (byte 0xe9 at column 18)" in summary
    assert "Flickr_8k.devImages.txt line 2 (byte 0xff at column 5)" in summary


@pytest.mark.parametrize("layout", ["karpathy", "coco"])
def test_a_json_caption_that_is_not_utf8_skips_that_caption_only(tmp_path, layout):
    root = (write_karpathy if layout == "karpathy" else write_coco)(tmp_path / layout)
    path = next(root.glob("dataset_*.json")) if layout == "karpathy" else root / "annotations/captions_train2017.json"
    corrupt(path, b'"a red picture"', b'"a red caf\xe9"')
    splits, report = load_captioning_dataset("auto", str(root))
    assert report.counts == {"captions that are not UTF-8": 1}
    assert counts(splits)["train"] == (6, 29)
    where = f"{path.name} images[0] (img_000.jpg) sentences[1]" if layout == "karpathy" else \
        f"{path.name} annotations[1]"
    assert f"Skipped 1 (captions that are not UTF-8), e.g. {where}" in report.summary(splits)


@pytest.mark.parametrize("layout", ["karpathy", "coco"])
def test_a_json_file_that_is_not_json_stops_naming_the_file_and_position(tmp_path, layout):
    root = (write_karpathy if layout == "karpathy" else write_coco)(tmp_path / layout)
    path = next(root.glob("dataset_*.json")) if layout == "karpathy" else root / "annotations/captions_train2017.json"
    path.write_text('{"images": [\n  {"filename": "a.jpg",, }]}')
    with pytest.raises(ValueError) as error:
        load_captioning_dataset("auto", str(root))
    assert str(error.value) == f"'{path}' is not valid JSON: Expecting property name enclosed in double quotes at " \
        "line 2, column 24."
    path.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match=f"'{path}' has no 'images' list"):
        load_captioning_dataset("auto", str(root))


def test_malformed_json_entries_are_skipped_and_counted(tmp_path):
    root = write_karpathy(tmp_path / "k")
    path = root / "dataset_flickr8k.json"
    data = json.loads(path.read_text())
    data["images"] += [{"split": "train"}, "not an entry"]
    path.write_text(json.dumps(data))
    splits, report = load_captioning_dataset("auto", str(root))
    assert report.counts == {"malformed entries (no file name, or one that is not UTF-8)": 2}
    assert counts(splits)["train"] == (6, 30)
    assert "dataset_flickr8k.json images[10]; dataset_flickr8k.json images[11]" in report.summary(splits)


def test_a_caption_longer_than_the_limit_is_cut_at_a_word_and_reported(tmp_path):
    root = write_flickr8k(tmp_path / "f8k", train=4, val=2, test=2)
    with open(root / "Flickr8k.token.txt", "a") as tokens:
        tokens.write("img_001.jpg#5\ta dog " + "runs far " * 120_000 + "\n")  # about 1 MB on one line
    splits, report = load_captioning_dataset("flickr8k", str(root))
    assert report.counts == {f"captions longer than {MAX_CAPTION_CHARS} characters, cut at a word before that": 1}
    original = ("a dog " + "runs far " * 120_000).strip()
    long = splits["train"][1].captions[-1]
    assert len(long) <= MAX_CAPTION_CHARS and original.startswith(long) and original[len(long)] == " "
    assert f"img_001.jpg ({len(original)} characters)" in report.summary(splits)


def test_flickr8k_text_files_one_folder_below(tmp_path):
    root = write_flickr8k(tmp_path / "f8k", train=4, val=2, test=2)
    (root / "Flickr8k_text").mkdir()
    for path in root.glob("*.txt"):
        path.rename(root / "Flickr8k_text" / path.name)
    assert detect_layout(root) == "flickr8k"
    splits, report = load_captioning_dataset("flickr8k", str(root))
    assert counts(splits) == {"train": (4, 20), "validation": (2, 10), "test": (2, 10)} and not report.counts


def test_kaggle_flickr8k_with_a_hash_split_or_the_official_split_files(tmp_path):
    root = write_kaggle_flickr8k(tmp_path / "kaggle", count=20)
    assert detect_layout(root) == "kaggle"
    splits, report = load_captioning_dataset("flickr8k", str(root))
    assert sum(len(images) for images in splits.values()) == 20 and not report.counts
    assert "split 80/10/10 (train, validation, test) by a hash of their file name" in report.summary(splits)
    again, _ = load_captioning_dataset("auto", str(root))
    assert {k: [i.image_id for i in v] for k, v in again.items()} == {
        k: [i.image_id for i in v] for k, v in splits.items()}
    by_name = {image.image_id: image for images in splits.values() for image in images}
    assert by_name["img_000.jpg"].captions[-1] == "a red square, small"  # the quoted caption, comma kept

    for split, names in (("train", range(0, 14)), ("dev", range(14, 17)), ("test", range(17, 19))):
        (root / f"Flickr_8k.{split}Images.txt").write_text("".join(f"img_{i:03d}.jpg\n" for i in names))
    splits, report = load_captioning_dataset("flickr8k", str(root))
    assert counts(splits) == {"train": (14, 70), "validation": (3, 15), "test": (2, 10)}
    assert report.counts == {"captions naming images in no split": 1}


def test_kaggle_captions_without_their_header_stop_naming_the_file_and_the_fix(tmp_path):
    root = write_kaggle_flickr8k(tmp_path / "kaggle", count=2)
    path = root / "captions.txt"
    path.write_text("\n".join(path.read_text().splitlines()[1:]))
    with pytest.raises(ValueError) as error:
        load_captioning_dataset("auto", str(root))
    assert str(error.value) == (
        f"'{path}' line 1 is 'img_000.jpg,A red square .', not the header 'image,caption' that Kaggle's captions.txt "
        "starts with: add that line (or check that this is the right file).")


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder_with_split_folders(tmp_path, metadata):
    root = write_imagefolder(tmp_path / "if", metadata=metadata)
    assert detect_layout(root) == "imagefolder"
    splits, report = load_captioning_dataset("auto", str(root))
    assert counts(splits) == {"train": (6, 30), "validation": (2, 10), "test": (2, 10)} and not report.counts
    assert splits["validation"][0].image_id == "validation/img_006.jpg"
    assert splits["train"][1].captions == ["a green square", "a green picture", "something green",
                                           "the colour green", "an image that is green"]


def test_imagefolder_in_one_folder_is_a_training_split(tmp_path):
    root = write_imagefolder(tmp_path / "if", split_folders=False)
    splits, _ = load_captioning_dataset("auto", str(root))
    assert counts(splits) == {"train": (10, 50)}


@pytest.mark.parametrize("metadata, content, message", [
    ("jsonl", '{"file_name": "img_000.jpg", "captions": ["a"]}\n{"file_name": "img_001.jpg", "capt\n',
     "line 2 is not JSON (Unterminated string starting at, column 30): each line must be one object like"),
    ("jsonl", '{"file_name": "img_000.jpg", "captions": ["a"]}\n["img_001.jpg"]\n',
     'line 2 has no "file_name": each line must be one object like'),
    ("csv", "img_000.jpg,a red square\n", "line 1 is 'img_000.jpg,a red square', not a header with a file_name "
     "column: start the file with a header such as 'file_name,caption'."),
    ("csv", "file_name,colour\nimg_000.jpg,red\n", "No caption column found among ['colour']; pass --caption_column."),
])
def test_a_malformed_imagefolder_metadata_file_stops_naming_the_file_line_and_fix(tmp_path, metadata, content,
                                                                                  message):
    root = write_imagefolder(tmp_path / "if", metadata=metadata)
    path = root / "train" / f"metadata.{metadata}"
    path.write_text(content)
    with pytest.raises(ValueError) as error:
        load_captioning_dataset("auto", str(root))
    assert str(error.value).startswith(f"'{path}'") and message in str(error.value)


def test_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_captioning_dataset("flickr8k", str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*no layout"):
        load_captioning_dataset("auto", str(tmp_path / "empty"))


def test_normalize_caption():
    assert normalize_caption("  A dog  runs through the Grass .") == "a dog runs through the grass"
    assert normalize_caption("hi!") == "hi!"


def test_every_caption_is_a_training_pair_and_batches_pad_dynamically(tmp_path, processor):
    splits, _ = load_captioning_dataset("flickr8k", str(write_flickr8k(tmp_path / "f8k", train=2, val=1, test=1)))
    dataset = CaptionPairDataset(splits["train"], processor.image_processor)
    assert len(dataset) == 10
    collate = CaptionCollator(processor, max_length=64)
    batch = collate([dataset[0], dataset[4]])  # "a red square" and the longer "an image that is red"
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    width = batch["input_ids"].shape[1]
    assert width == len(processor.tokenizer("an image that is red")["input_ids"]) + 2
    assert batch["attention_mask"][0].sum() < width
    assert (batch["labels"][0][batch["attention_mask"][0] == 0] == -100).all()
    assert (batch["labels"][:, 0] == -100).all()


# ----- feature cache -------------------------------------------------------------------------------------------------


@pytest.fixture
def cache_setup(tmp_path, processor):
    splits, _ = load_captioning_dataset("flickr8k", str(write_flickr8k(tmp_path / "f8k", train=3, val=1, test=1)))
    return tmp_path / "cache", tiny_model(), processor, splits["train"]


def count_tower_calls(model):
    calls = []
    model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    return calls


def test_cache_computes_each_image_once_and_serves_its_features(cache_setup):
    root, model, processor, images = cache_setup
    calls = count_tower_calls(model)
    cache = FeatureCache(root, model, processor.image_processor)
    cache.build(images, batch_size=2)
    assert sum(calls) == 3  # three images, fifteen captions
    dataset = CaptionPairDataset(images, processor.image_processor, cache)
    item = dataset[7]  # a caption of the second image
    assert set(item) == {"vision_features", "caption"}
    with torch.no_grad():
        expected = model.get_vision_features(processor(images=[str(images[1].image)])["pixel_values"])[0]
    torch.testing.assert_close(item["vision_features"], expected, rtol=1e-3, atol=1e-3)  # stored as float16
    again = FeatureCache(root, model, processor.image_processor)
    again.build(images)
    assert sum(calls) == 3 + 1, "a complete cache must be reused (only the expected-value call above ran)"


def test_cache_is_not_reused_for_changed_weights_or_processor(cache_setup):
    root, model, processor, images = cache_setup
    first = FeatureCache(root, model, processor.image_processor)
    first.build(images)
    with torch.no_grad():
        model.vision_model.embeddings.patch_embeddings.projection.weight.add_(0.01)
    assert FeatureCache(root, model, processor.image_processor).folder != first.folder
    other = type(processor.image_processor)(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                                            image_std=[0.5] * 3)
    assert FeatureCache(root, model, other).folder != first.folder


def test_cache_refuses_a_folder_written_for_another_model(cache_setup):
    root, model, processor, images = cache_setup
    cache = FeatureCache(root, model, processor.image_processor)
    cache.build(images)
    manifest = json.loads(cache.manifest_path.read_text())
    manifest["key"] = "0" * 64
    cache.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another vision model"):
        FeatureCache(root, model, processor.image_processor).build(images)


def test_an_interrupted_cache_is_rebuilt(cache_setup):
    root, model, processor, images = cache_setup
    cache = FeatureCache(root, model, processor.image_processor)
    cache.build(images)
    cache.manifest_path.unlink()  # as if killed before the manifest was written
    calls = count_tower_calls(model)
    FeatureCache(root, model, processor.image_processor).build(images)
    assert sum(calls) == 3
