import json

import pytest

from vision_gpt.training.checkpoints import checkpoint_problems, list_checkpoints, resolve_resume

COMPLETE = ("model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth")


def make_checkpoint(root, step, files=COMPLETE, state='{"global_step": 0}'):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in files:
        (folder / name).write_bytes(b"x")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_a_checkpoint_is_complete_only_with_every_file_a_resume_reads(tmp_path):
    assert checkpoint_problems(make_checkpoint(tmp_path, 1)) == []
    assert checkpoint_problems(make_checkpoint(tmp_path, 2, state=None)) == ["trainer_state.json is missing"]
    cut = checkpoint_problems(make_checkpoint(tmp_path, 3, state='{"global_step": 3, "log_hi'))
    assert len(cut) == 1 and cut[0].startswith("trainer_state.json is unreadable (")
    assert checkpoint_problems(make_checkpoint(tmp_path, 4, files=("model.safetensors",))) == [
        "optimizer.pt is missing", "scheduler.pt is missing", "rng_state.pth is missing"]
    assert checkpoint_problems(make_checkpoint(tmp_path, 5, files=("config.json",)), optimizer_state=False) == [
        "no model weights (model.safetensors or model.safetensors.index.json)"]


def test_save_only_model_and_multi_process_checkpoints_expect_their_own_files(tmp_path):
    assert checkpoint_problems(make_checkpoint(tmp_path, 1, files=("model.safetensors",)), optimizer_state=False) == []
    two = make_checkpoint(tmp_path, 2, files=("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pth"))
    assert checkpoint_problems(two, num_processes=2) == ["rng_state_1.pth is missing"]


def test_sharded_weights_need_every_shard_the_index_names(tmp_path):
    folder = make_checkpoint(tmp_path, 1, files=("optimizer.pt", "scheduler.pt", "rng_state.pth",
                                                  "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                             "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert checkpoint_problems(folder) == ["model-00002-of-00002.safetensors is missing"]


def test_latest_is_the_newest_complete_checkpoint_and_says_what_it_passed_over(tmp_path):
    make_checkpoint(tmp_path, 3)
    make_checkpoint(tmp_path, 10)  # newer than 9 by number, not by name
    make_checkpoint(tmp_path, 9)
    make_checkpoint(tmp_path, 12, files=("model.safetensors",), state=None)
    (tmp_path / "checkpoint-13-notes").mkdir()
    (tmp_path / "checkpoint-14").write_text("a file, not a folder")
    assert [check.step for check in list_checkpoints(tmp_path)] == [12, 10, 9, 3]

    folder, notes = resolve_resume("latest", tmp_path)
    assert folder == str(tmp_path / "checkpoint-10")
    assert notes == [f"Resuming from {tmp_path / 'checkpoint-10'}; passed over the newer checkpoint-12 "
                     "(trainer_state.json is missing; optimizer.pt is missing; scheduler.pt is missing; rng_state.pth "
                     "is missing): a run stopped during its save (Trainer writes trainer_state.json last)."]
    assert resolve_resume("true", tmp_path)[0] == folder
    assert resolve_resume(str(tmp_path / "checkpoint-3"), tmp_path) == (str(tmp_path / "checkpoint-3"), [])


def test_a_named_incomplete_checkpoint_is_refused_naming_the_newest_complete_one(tmp_path):
    make_checkpoint(tmp_path, 2)
    cut = make_checkpoint(tmp_path, 4, files=("model.safetensors", "config.json"), state=None)
    with pytest.raises(ValueError) as error:
        resolve_resume(str(cut), tmp_path)
    assert str(error.value) == (
        f"--resume_from_checkpoint {cut} is incomplete (a run stopped during its save?): trainer_state.json is "
        "missing; optimizer.pt is missing; scheduler.pt is missing; rng_state.pth is missing. The newest complete "
        f"checkpoint is {tmp_path / 'checkpoint-2'}. `--resume_from_checkpoint latest` picks the newest complete one.")
    with pytest.raises(ValueError, match="no such folder"):
        resolve_resume(str(tmp_path / "checkpoint-7"), tmp_path)
    with pytest.raises(ValueError, match=f"no complete checkpoint in {tmp_path / 'none'}"):
        resolve_resume("latest", tmp_path / "none")
