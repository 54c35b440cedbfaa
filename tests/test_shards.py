"""Webdataset tars and parquet files: finding, listing, reading whole, streaming, and training on them."""

import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from vision_gpt.data.records import DataReport, normalize_caption
from vision_gpt.data.torch_datasets import StreamingCaptionDataset
from vision_gpt.data.factory import load_captioning_dataset
from vision_gpt.data.shard_splits import resolve_data_files, shard_image_ids, shard_images
from vision_gpt.training.feature_cache import FeatureCache
from vision_gpt.data.shards import expand_braces, list_parquet, list_webdataset, resolve_shards
from vision_gpt.training.train import main

from .conftest import tiny_model
from .data_fixtures import (add_tar_member, image_bytes, save_tiny_towers, shard_rows, write_parquet,
                            write_webdataset)


def all_captions(count, offset=0, captions=2):
    return sorted(normalize_caption(text) for _, _, texts in shard_rows(count, offset, captions) for text in texts)


# ----- finding shards ------------------------------------------------------------------------------------------------


def test_expand_braces_spells_out_padded_ranges_lists_and_their_products():
    assert expand_braces("s/{000000..000002}.tar") == ["s/000000.tar", "s/000001.tar", "s/000002.tar"]
    assert expand_braces("{a,b}-{8..10}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "b-8.tar", "b-9.tar", "b-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match=r"runs backwards; write \{1..3\}"):
        expand_braces("{3..1}.tar")
    with pytest.raises(ValueError, match="neither a range"):
        expand_braces("{abc}.tar")


def test_resolve_shards_names_every_file_once_and_refuses_what_is_not_there(tmp_path):
    paths = [str(path) for path in write_webdataset(tmp_path / "wds", shards=3, per_shard=1)]
    (tmp_path / "notes.txt").write_text("not a shard")
    assert resolve_shards([f"{tmp_path}/wds/{{000000..000002}}.tar", paths[0]]) == paths
    assert resolve_shards([f"{tmp_path}/wds/*.tar"]) == paths
    with pytest.raises(ValueError, match=r"--data_files: '.*000003.tar' \(from .*\) is not a file"):
        resolve_shards([f"{tmp_path}/wds/{{000000..000003}}.tar"])
    with pytest.raises(ValueError, match=r"--eval_data_files: '.*/\*.parquet' matches no .tar or .parquet files"):
        resolve_shards([f"{tmp_path}/*.parquet"], "--eval_data_files")
    with pytest.raises(ValueError, match=r"'.*notes.txt' is neither a webdataset shard \(.tar\) nor a parquet file"):
        resolve_shards([str(tmp_path / "notes.txt")])
    with pytest.raises(ValueError, match=r"is a webdataset shard \(.tar\), but --dataset is parquet: use --dataset "
                                         "webdataset"):
        resolve_data_files("parquet", paths[0])


# ----- listing -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("json_captions", [False, True])
def test_webdataset_listing_gives_keys_image_members_and_captions(tmp_path, json_captions):
    path = str(write_webdataset(tmp_path, shards=1, per_shard=3, json_captions=json_captions)[0])
    samples = list_webdataset(path)
    assert [sample.key for sample in samples] == ["000000", "000001", "000002"]
    assert samples[1].captions == ["a green square number 1 take 0", "a green square number 1 take 1"]
    member = samples[2].image
    with open(path, "rb") as file:
        file.seek(member.offset)
        assert file.read(member.size) == image_bytes("blue")


@pytest.mark.parametrize("image", ["struct", "binary"])
def test_parquet_listing_finds_the_image_column_keys_and_row_groups(tmp_path, image):
    path = str(write_parquet(tmp_path / "a.parquet", count=5, image=image, row_group_size=3))
    samples = list_parquet(path, caption_columns=["caption_0", "caption_1"])
    assert [sample.key for sample in samples] == [f"{index:06d}" for index in range(5)]
    assert [(s.image.name, s.image.offset, s.image.group) for s in samples][2:4] == [
        ("image" if image == "struct" else "jpg", 2, 0), ("image" if image == "struct" else "jpg", 3, 1)]
    assert samples[4].captions == ["a red square number 4 take 0", "a red square number 4 take 1"]


@pytest.mark.parametrize("name, data, message", [
    ("000000.txt", b"caf\xe9 au lait", r"member 000000.txt is not UTF-8 \(byte 0xe9 at offset 3\); save it as UTF-8"),
    ("000000.json", b'{"captions": [', r"member 000000.json is not JSON \(Expecting value at line 1, column 15\)"),
    ("000000.json", b'{"title": "x"}', 'member 000000.json has none of the keys .*; put the captions under "captions"'),
])
def test_a_malformed_caption_member_is_named_with_its_shard(tmp_path, name, data, message):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as archive:
        add_tar_member(archive, "000000.jpg", image_bytes("red"))
        add_tar_member(archive, name, data)
    with pytest.raises(ValueError, match=f"'{path}' {message}"):
        list_webdataset(str(path))


# ----- read whole ----------------------------------------------------------------------------------------------------


def write_bad_shard(path: Path) -> Path:
    """One good sample, and one of each kind of bad one."""
    with tarfile.open(path, "w") as archive:
        add_tar_member(archive, "good.jpg", image_bytes("red"))
        add_tar_member(archive, "good.txt", b"a good red square")
        add_tar_member(archive, "noimage.txt", b"a caption without its image")
        add_tar_member(archive, "nocaption.jpg", image_bytes("green"))
        add_tar_member(archive, "broken.jpg", image_bytes("blue")[:100])
        add_tar_member(archive, "broken.txt", b"a blue square cut short")
        add_tar_member(archive, "latin1.jpg", image_bytes("yellow"))
        add_tar_member(archive, "latin1.txt", b"caf\xe9")
        add_tar_member(archive, "badjson.jpg", image_bytes("yellow"))
        add_tar_member(archive, "badjson.json", b"[1, 2")
    return path


def test_shards_read_whole_skip_and_count_bad_samples(tmp_path):
    write_bad_shard(tmp_path / "bad.tar")
    splits, report = load_captioning_dataset("webdataset", data_files=[str(tmp_path / "bad.tar")], split="validation")
    assert [(record.image_id, record.captions) for record in splits["validation"]] == [
        (f"{tmp_path}/bad.tar/good", ["a good red square"])]
    assert report.counts == Counter({"samples whose captions could not be read": 2, "samples with no image": 1,
                                     "samples with no caption": 1, "unreadable images": 1})
    assert "member latin1.txt is not UTF-8" in report.summary(splits)


def test_parquet_read_whole_takes_numbered_caption_columns_and_stops_at_max_images(tmp_path):
    write_parquet(tmp_path / "a.parquet", count=5, captions=3, image="binary")
    splits, report = load_captioning_dataset(None, data_files=[str(tmp_path / "*.parquet")], split="test",
                                             max_images=4)
    assert [len(record.captions) for record in splits["test"]] == [3, 3, 3, 3]
    assert report.source == f"1 parquet file ({tmp_path}/a.parquet)" and not report.counts


# ----- streaming -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream_shards(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("stream")
    paths = [str(path) for path in write_webdataset(root / "wds", shards=4, per_shard=3)]
    paths.append(str(write_parquet(root / "more.parquet", count=4, offset=12, image="binary")))
    return paths


def streamed_captions(dataset, num_workers=0, epoch=0):
    dataset.set_epoch(epoch)
    loader = DataLoader(dataset, batch_size=3, num_workers=num_workers,
                        collate_fn=lambda items: [item["caption"] for item in items])
    return [caption for batch in loader for caption in batch]


def test_a_pass_streams_every_pair_exactly_once_across_two_workers(stream_shards, processor):
    dataset = StreamingCaptionDataset(stream_shards, processor.image_processor, seed=5, shuffle_buffer_size=4,
                                      repeat=False)
    captions = streamed_captions(dataset, num_workers=2)
    assert sorted(captions) == all_captions(16)


def test_the_stream_order_is_a_function_of_seed_and_epoch(stream_shards, processor):
    def stream(seed):
        return StreamingCaptionDataset(stream_shards, processor.image_processor, seed=seed, shuffle_buffer_size=4,
                                       repeat=False)

    first = streamed_captions(stream(5), num_workers=2, epoch=0)
    assert streamed_captions(stream(5), num_workers=2, epoch=0) == first
    assert streamed_captions(stream(5), num_workers=2, epoch=1) != first
    assert streamed_captions(stream(6), num_workers=2, epoch=0) != first
    # Endless for Trainer: pass 1 follows pass 0, in the order set_epoch(1) gives it.
    endless = iter(StreamingCaptionDataset(stream_shards, processor.image_processor, seed=5, shuffle_buffer_size=4))
    two_passes = [next(endless)["caption"] for _ in range(64)]
    assert two_passes == streamed_captions(stream(5), epoch=0) + streamed_captions(stream(5), epoch=1)


def test_the_stream_skips_and_counts_bad_samples_and_broken_shards(tmp_path, processor):
    bad = write_bad_shard(tmp_path / "bad.tar")
    good = write_webdataset(tmp_path / "wds", shards=1, per_shard=3)[0]
    cut = tmp_path / "cut.tar"
    second_image = list_webdataset(str(good))[1].image
    cut.write_bytes(good.read_bytes()[: second_image.offset + 100])  # the first sample, then the tar breaks off
    dataset = StreamingCaptionDataset([str(bad), str(cut), str(good)], processor.image_processor,
                                      shuffle_buffer_size=2, repeat=False)
    captions = streamed_captions(dataset)
    assert sorted(captions) == sorted(["a good red square", *all_captions(3), *all_captions(1)])
    assert dataset.report.counts == Counter({
        "samples whose captions could not be read": 2, "samples with no image": 1, "samples with no caption": 1,
        "unreadable images": 1, "shards that broke off while being read": 1})
    assert f"'{cut}' could not be read to its end" in "\n".join(dataset.report.problems())


def test_a_feature_cache_built_from_the_stream_serves_it_and_remembers_unreadable_images(tmp_path, processor,
                                                                                          caplog):
    paths = [str(write_bad_shard(tmp_path / "bad.tar")), *map(str, write_webdataset(tmp_path / "wds", shards=2))]
    cache = FeatureCache(tmp_path / "cache", tiny_model(), processor.image_processor)
    report = DataReport("listing")
    ids = shard_image_ids(paths, report)
    assert len(ids) == 9  # every sample with an image member: 5 in bad.tar, 4 in wds
    cache.build_from_stream(ids, shard_images(paths, report), batch_size=4)
    assert cache.contains(f"{paths[0]}/good") and not cache.contains(f"{paths[0]}/broken")
    assert "could not be decoded" in cache.unreadable[f"{paths[0]}/broken"]
    with caplog.at_level("INFO", logger="vision_gpt.training.feature_cache"):
        cache.build_from_stream(ids, iter(()))
    assert "holds all 9 images; reusing it" in caplog.text

    dataset = StreamingCaptionDataset(paths, feature_cache=cache, repeat=False)
    items = list(dataset)
    assert sorted(item["caption"] for item in items) == sorted(["a good red square", *all_captions(4)])
    assert dataset.report.counts["unreadable images"] == 1
    good = next(item for item in items if item["caption"] == "a good red square")
    assert torch.equal(good["vision_features"], cache.get(f"{paths[0]}/good"))


def test_a_file_that_is_not_a_shard_stops_the_stream_at_start_naming_it(tmp_path, processor):
    (tmp_path / "zipped.tar").write_bytes(b"\x1f\x8b" + bytes(600))
    with pytest.raises(ValueError, match=r"'.*zipped.tar' is not a readable \(uncompressed\) tar file.*gunzip"):
        StreamingCaptionDataset([str(tmp_path / "zipped.tar")], processor.image_processor)


# ----- training ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("shard-training")
    vision, text = save_tiny_towers(root, tokenizer)
    write_webdataset(root / "train", shards=3, per_shard=2)  # 12 pairs: 3 batches of 4 a pass
    write_parquet(root / "val" / "val.parquet", count=3, offset=100, image="struct")
    return {"root": root, "vision": vision, "text": text}


def shard_args(setup, output, *extra):
    return ["--vision_model", setup["vision"], "--text_model", setup["text"], "--dataset", "webdataset",
            "--data_files", f"{setup['root']}/train/{{000000..000002}}.tar",
            "--eval_data_files", f"{setup['root']}/val/*.parquet",
            "--feature_cache_dir", str(setup["root"] / "cache"), "--output_dir", str(output),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--report_to", "none",
            "--caption_metrics", "false", "--dataloader_pin_memory", "false", "--shuffle_buffer_size", "5", *extra]


def resume_args(setup, output):
    # 8 steps of 4 pairs over 12 pairs a pass: the run crosses two pass boundaries, checkpoint-4 lies inside pass 1.
    return shard_args(setup, output, "--max_steps", "8", "--save_strategy", "steps", "--save_steps", "4",
                      "--eval_strategy", "no", "--load_best_model_at_end", "false", "--freeze_text", "false",
                      "--learning_rate", "0.01", "--logging_steps", "1", "--seed", "3",
                      "--dataloader_num_workers", "2")


@pytest.mark.parametrize("feature_cache", [True, False])
def test_training_streams_webdataset_shards(train_setup, tmp_path, feature_cache):
    output = tmp_path / "run"
    metrics = main(shard_args(train_setup, output, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps",
                              "2", "--save_strategy", "steps", "--save_steps", "2", "--feature_cache",
                              str(feature_cache).lower(), "--feature_cache_dir", str(tmp_path / "cache")))
    log = (output / "train.log").read_text()
    assert "Training data: 3 webdataset files" in log and ", streamed." in log
    assert "Validation data (--eval_data_files): Data from 1 parquet file" in log
    # Once each: 6 training images and 3 validation images.
    assert ("Computing vision features of 9 images" in log) is feature_cache
    assert "Streamed training data, the pass in progress at the end:\nNo problems found." in log
    assert "Total optimization steps = 2" in log
    assert metrics["eval_loss"] > 0 and (output / "model.safetensors").is_file()
    card = (output / "README.md").read_text()
    assert "shards" in card and "streamed" in card


@pytest.mark.parametrize("change, message", [
    ({}, "--dataset webdataset streams the shards, and a stream has no length: give --max_steps"),
    ({"--max_steps": "2", "--max_train_images": "2"}, "name fewer shards in --data_files instead"),
    ({"--max_steps": "2", "--dataset": "flickr8k"}, "--data_files names webdataset or parquet shards: add --dataset"),
    ({"--max_steps": "2", "--data_files": "{root}/nothing-usable.tar"},
     "1 webdataset file ({root}/nothing-usable.tar) hold no usable (image, caption) pair.\nSkipped 1 (samples with "
     "no image)"),
])
def test_training_on_shards_stops_at_start_naming_the_problem(train_setup, tmp_path, capsys, change, message):
    with tarfile.open(train_setup["root"] / "nothing-usable.tar", "w") as archive:
        add_tar_member(archive, "lonely.txt", b"a caption without its image")
    args = shard_args(train_setup, tmp_path / "o")
    for flag, value in change.items():
        value = value.format(root=train_setup["root"])
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert message.format(root=train_setup["root"]) in capsys.readouterr().err + str(stop.value.code)
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_resuming_a_streamed_run_mid_pass_gives_the_uninterrupted_result(train_setup, tmp_path):
    uninterrupted = tmp_path / "whole"
    main(resume_args(train_setup, uninterrupted))
    checkpoint = tmp_path / "checkpoint-4"
    shutil.copytree(uninterrupted / "checkpoint-4", checkpoint)

    resumed = tmp_path / "resumed"
    main(resume_args(train_setup, resumed) + ["--resume_from_checkpoint", str(checkpoint)])
    final, reference = load_file(resumed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    before = load_file(checkpoint / "model.safetensors")
    assert any(not torch.equal(reference[name], before[name]) for name in reference)  # steps 5-8 changed weights
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)
    losses = [[entry["loss"] for entry in json.loads((run / "checkpoint-8" / "trainer_state.json").read_text())[
        "log_history"] if "loss" in entry][-4:] for run in (resumed, uninterrupted)]
    assert losses[0] == losses[1]
