import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from transformers import AutoModel, TrainingArguments

from vision_gpt.training.arguments import ModelArguments, parse_arguments
from vision_gpt.training.trainer import StagedUnfreezingCallback, stage_for_epoch
from vision_gpt.training.train import main

from .conftest import tiny_model
from .data_fixtures import save_tiny_bert, save_tiny_towers, write_flickr8k

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("training")
    vision, text = save_tiny_towers(root, tokenizer)
    data = write_flickr8k(root / "f8k", train=4, val=2, test=2)
    return {"root": root, "vision": vision, "text": text, "data": str(data), "cache": str(root / "cache")}


def base_args(setup, output_dir, *extra):
    return ["--vision_model", setup["vision"], "--text_model", setup["text"], "--dataset", "flickr8k",
            "--data_dir", setup["data"], "--feature_cache_dir", setup["cache"], "--output_dir", str(output_dir),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--report_to", "none",
            "--caption_metrics", "false", "--dataloader_pin_memory", "false", *extra]


# ----- a real run, checked from its output folder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_step_run(setup, tmp_path_factory):
    """Two steps on a fixture with one of each kind of bad data, evaluated with caption metrics."""
    data = write_flickr8k(tmp_path_factory.mktemp("bad") / "f8k", train=5, val=2, test=1)
    images = data / "Flicker8k_Dataset"
    (images / "img_000.jpg").unlink()
    raw = (images / "img_001.jpg").read_bytes()
    (images / "img_001.jpg").write_bytes(raw[: len(raw) // 3])
    with open(data / "Flickr8k.token.txt", "a") as tokens:
        tokens.write("ghost.jpg.1#0\tan image that is not there\nimg_002.jpg#5\t \n")
    with open(data / "Flickr8k.token.txt", "ab") as tokens:
        tokens.write(b"img_003.jpg#5\tcaf\xe9\n" + b"img_004.jpg#5\t" + b"a dog " * 200_000 + b"\n")
    output = tmp_path_factory.mktemp("run") / "out"
    args = base_args(setup, output, "--max_steps", "2", "--eval_strategy", "steps", "--eval_steps", "1",
                     "--save_strategy", "steps", "--save_steps", "1", "--caption_metrics", "true",
                     "--caption_metrics_images", "2", "--generation_num_beams", "1", "--logging_steps", "1")
    args[args.index("--data_dir") + 1] = str(data)
    metrics = main(args)
    return output, metrics


def test_two_step_run_writes_hub_ready_fp32_and_fp16_repos(two_step_run):
    output, _ = two_step_run
    for folder in (output, output / "fp16"):
        for name in ("config.json", "model.safetensors", "generation_config.json", "modeling_vision_gpt.py",
                     "pipeline_vision_gpt.py", "processor_config.json", "tokenizer.json", "README.md"):
            assert (folder / name).is_file(), folder / name
    ratio = (output / "fp16" / "model.safetensors").stat().st_size / (output / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.51
    check = (
        "import sys, torch; sys.modules['vision_gpt'] = None\n"
        "from transformers import AutoModel\n"
        f"model = AutoModel.from_pretrained({str(output)!r}, trust_remote_code=True)\n"
        "assert type(model).__module__.startswith('transformers_modules.')\n"
        "print(model.generate(pixel_values=torch.randn(1, 3, 32, 32), max_new_tokens=3).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_MODULES_CACHE": str(output.parent / "modules")})
    assert "torch.Size([1," in result.stdout, result.stderr[-2000:]


def test_two_step_run_reports_metrics_logs_plots_and_card(two_step_run):
    output, metrics = two_step_run
    assert metrics["eval_perplexity"] == pytest.approx(float(torch.tensor(metrics["eval_loss"]).exp()), rel=1e-4)
    assert "eval_bleu_4" in metrics and "eval_cider_d" in metrics
    assert (output / "loss.png").stat().st_size > 1000
    assert (output / "caption_metrics.png").stat().st_size > 1000
    log = (output / "train.log").read_text()
    assert "Total optimization steps = 2" in log
    card = ModelCard.load(output / "README.md")
    assert card.data.pipeline_tag == "image-to-text" and card.data.datasets == ["flickr8k"]
    results = {result.metric_type: result for result in card.data.eval_results}
    assert {"loss", "perplexity", "bleu_4", "cider_d"} <= set(results)
    # Captioned with the run's --generation_num_beams 1 and the default 32 new tokens, on the validation split.
    assert results["bleu_4"].metric_args == {"num_beams": 1, "max_new_tokens": 32}
    assert results["bleu_4"].metric_name == "BLEU-4 (greedy, up to 32 new tokens)"
    assert {result.dataset_split for result in results.values()} == {"validation"}
    # Local random towers declare no license: "other", and the run still finished.
    assert card.data.license == "other" and getattr(card.data, "base_model", None) is None
    assert "Training configuration" in card.text and "minutes of training on" in card.text
    config = json.loads((output / "training_config.json").read_text())
    assert config["training"]["max_steps"] == 2


def test_bad_data_is_reported_at_start_and_training_completes(two_step_run):
    output, _ = two_step_run
    log = (output / "train.log").read_text()
    for line in ("Skipped 1 (missing image files)", "Skipped 1 (unreadable images)",
                 "Skipped 1 (captions naming images in no split)", "Skipped 1 (empty captions)",
                 "Skipped 1 (lines that are not UTF-8), e.g. Flickr8k.token.txt line 43 (byte 0xe9 at column 18)",
                 "Cut 1 (captions longer than 1000 characters, cut at a word before that), e.g. img_004.jpg "
                 "(1199999 characters)"):
        assert line in log
    assert log.index("Skipped 1 (missing image files)") < log.index("***** Running training *****")


def test_frozen_tower_trains_from_the_feature_cache(two_step_run, setup):
    output, _ = two_step_run
    log = (output / "train.log").read_text()
    assert "Computing vision features of 5 images" in log  # 3 usable train + 2 validation images, once each


# ----- arguments -----------------------------------------------------------------------------------------------------


def test_config_files_give_the_same_arguments_as_flags(setup, tmp_path):
    flags = base_args(setup, tmp_path / "o", "--learning_rate", "0.001", "--fusion", "cross_attention")
    values = dict(zip(flags[::2], flags[1::2]))
    config = {key.lstrip("-"): value for key, value in values.items()}
    config["learning_rate"] = 0.001
    config["caption_metrics"] = False
    config["dataloader_pin_memory"] = False
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "c.json").write_text(json.dumps(config))
    from_flags = parse_arguments(flags)
    for path in ("c.yaml", "c.json"):
        from_file = parse_arguments([str(tmp_path / path)])
        assert from_file[0] == from_flags[0] and from_file[1] == from_flags[1]
        assert from_file[2].learning_rate == 0.001 and from_file[2].output_dir == str(tmp_path / "o")


@pytest.mark.parametrize("extra, message", [
    (["--no_such_flag", "1"], "no_such_flag"),
    (["--fusion", "sideways"], "fusion"),
    (["--freeze_text_layers", "9"], "freeze_text_layers"),
    (["--metric_for_best_model", "accuracy"], "accuracy"),
    (["--unfreeze_text_epoch", "-1"], "unfreeze_text_epoch"),
    (["--vision_learning_rate", "0"], "--vision_learning_rate must be positive, got 0.0"),
    (["--vision_learning_rate=-1e-4"], "--vision_learning_rate must be positive, got -0.0001"),
    (["--metric_for_best_model", "bertscore_f1", "--caption_metrics", "true"],
     "--metric_for_best_model bertscore_f1 needs --bertscore_model"),
    (["--bertscore_model", "/no/such/bert"], "--bertscore_model scores the captions of --caption_metrics"),
    (["--widget_image", "/no/such/example.jpg"], "--widget_image '/no/such/example.jpg' is not a file"),
    (["--bertscore_model", "/no/such/bert", "--caption_metrics", "true"],
     "--bertscore_model '/no/such/bert' could not be loaded"),
])
def test_bad_arguments_fail_at_start_naming_them(setup, tmp_path, capsys, extra, message):
    broken = tmp_path / "broken"
    broken.mkdir()  # any data access would fail with a different message
    args = base_args(setup, tmp_path / "o", *extra)
    args[args.index("--data_dir") + 1] = str(broken)
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert message in capsys.readouterr().err + str(exit_info.value.code)
    assert not (tmp_path / "o" / "train.log").exists() or "Data from" not in (tmp_path / "o" / "train.log").read_text()


def test_unknown_config_file_keys_are_named(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path), "learning_rat": 0.1}))
    with pytest.raises(SystemExit):
        parse_arguments([str(tmp_path / "c.yaml")])
    assert "learning_rat" in capsys.readouterr().err


# ----- schedules, precision, stopping ---------------------------------------------------------------------------------


def test_staged_schedule_changes_trainable_parameters_at_the_given_epochs():
    model = tiny_model()
    args = ModelArguments(unfreeze_text_epoch=1, unfreeze_vision_epoch=3)
    callback = StagedUnfreezingCallback(args)
    counts = []
    for epoch in range(5):
        callback.on_epoch_begin(None, type("State", (), {"epoch": float(epoch)})(), None, model=model)
        counts.append(model.parameter_summary())
    projector = counts[0]["projector"]["total"]
    assert counts[0]["total"]["trainable"] == projector
    assert counts[1]["language_model"]["trainable"] == counts[1]["language_model"]["total"]
    assert counts[2]["vision_model"]["trainable"] == 0
    assert counts[3]["total"]["trainable"] == counts[3]["total"]["total"] == counts[4]["total"]["trainable"]
    assert stage_for_epoch(args, 0) == {"vision": True, "text": True}


def test_staged_run_trains_gpt2_after_its_epoch(setup, tmp_path):
    output = tmp_path / "staged"
    main(base_args(setup, output, "--num_train_epochs", "2", "--unfreeze_text_epoch", "1", "--max_train_images", "1",
                   "--per_device_train_batch_size", "5", "--eval_strategy", "no", "--save_strategy", "no",
                   "--load_best_model_at_end", "false"))
    trained = load_file(output / "model.safetensors")
    initial = load_file(Path(setup["text"]) / "model.safetensors")
    assert not torch.equal(trained["model.language_model.h.0.mlp.c_fc.weight"], initial["transformer.h.0.mlp.c_fc.weight"])
    log = (output / "train.log").read_text()
    assert "Epoch 1: trainable parameters" in log
    assert "Feature cache" in log or "Computing vision features" in log


def test_bertscore_is_a_training_metric_that_selects_the_best_checkpoint(setup, tmp_path):
    words = [w.lower() for line in (Path(setup["data"]) / "Flickr8k.token.txt").read_text().splitlines()
             for w in line.split()[1:]]
    bert = str(save_tiny_bert(tmp_path / "bert", words))
    output = tmp_path / "out"
    main(base_args(setup, output, "--max_steps", "3", "--eval_strategy", "steps", "--eval_steps", "1",
                   "--save_strategy", "steps", "--save_steps", "1", "--caption_metrics", "true",
                   "--caption_metrics_images", "2", "--generation_num_beams", "1", "--generation_max_new_tokens", "4",
                   "--freeze_text", "false", "--learning_rate", "0.05", "--bertscore_model", bert,
                   "--metric_for_best_model", "bertscore_f1", "--greater_is_better", "true",
                   "--save_total_limit", "5"))
    state = json.loads((output / "checkpoint-3" / "trainer_state.json").read_text())
    scores = {entry["step"]: entry["eval_bertscore_f1"] for entry in state["log_history"]
              if "eval_bertscore_f1" in entry}
    assert sorted(scores) == [1, 2, 3]
    best_step = max(scores, key=lambda step: (scores[step], -step))
    assert state["best_metric"] == pytest.approx(scores[best_step])
    assert state["best_model_checkpoint"] == str(output / f"checkpoint-{best_step}")
    final, best = load_file(output / "model.safetensors"), load_file(output / f"checkpoint-{best_step}" /
                                                                    "model.safetensors")
    for name in best:
        torch.testing.assert_close(final[name], best[name], rtol=0, atol=0, msg=name)
    assert "BERTScore: " in (output / "train.log").read_text()


def test_non_finite_loss_stops_without_writing_a_model(setup, tmp_path, processor):
    broken = tiny_model()
    source = tmp_path / "broken_model"
    with torch.no_grad():
        broken.projector.proj.fc2.weight.fill_(float("inf"))
    broken.save_pretrained(source)
    processor.save_pretrained(source)
    output = tmp_path / "nan"
    args = base_args(setup, output, "--max_steps", "3", "--eval_strategy", "no", "--save_strategy", "no",
                     "--load_best_model_at_end", "false")
    args = ["--model_name_or_path", str(source)] + args[4:]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert "loss became nan" in str(exit_info.value.code) and "--bf16" in str(exit_info.value.code)
    assert not (output / "model.safetensors").exists()


# transformers 5.24 renamed TrainingArguments' --gradient_checkpointing to --activation_checkpointing (the old name
# warns); the test uses the name of the installed release.
CHECKPOINTING = ("--activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                 else "--gradient_checkpointing")


def test_bf16_gradient_accumulation_and_checkpointing_run(setup, tmp_path):
    output = tmp_path / "mixed"
    main(base_args(setup, output, "--max_steps", "2", "--bf16", "true", "--use_cpu", "true",
                   "--gradient_accumulation_steps", "2",
                   CHECKPOINTING, "true", "--freeze_text", "false", "--eval_strategy", "no",
                   "--save_strategy", "no", "--load_best_model_at_end", "false", "--feature_cache", "false"))
    state = AutoModel.from_pretrained(output)
    assert state.dtype == torch.float32
    assert "Gradient Accumulation steps = 2" in (output / "train.log").read_text()


def test_early_stopping_ends_a_run_that_stopped_improving(setup, tmp_path):
    output = tmp_path / "early"
    main(base_args(setup, output, "--num_train_epochs", "6", "--learning_rate", "0", "--early_stopping_patience",
                   "1", "--per_device_train_batch_size", "20"))
    state = json.loads(sorted(output.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    assert state["epoch"] < 6


# ----- interruption and processes ------------------------------------------------------------------------------------


def resume_args(setup, output, *extra):
    return base_args(setup, output, "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "2",
                     "--eval_strategy", "no", "--load_best_model_at_end", "false", "--freeze_text", "false",
                     "--save_total_limit", "10", "--logging_steps", "1", "--seed", "3", *extra)


def losses(output):
    state = json.loads((output / "checkpoint-6" / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


# With LoRA adapters (peft), checkpoints hold the plain weights and the adapters beside them; resuming reads both.
@pytest.mark.parametrize("extra", [[], ["--lora_r", "4", "--lora_alpha", "16"]], ids=["plain", "lora"])
def test_kill_9_during_a_save_then_resume_latest_gives_the_uninterrupted_result(setup, tmp_path, extra):
    uninterrupted = tmp_path / "whole"
    main(resume_args(setup, uninterrupted, *extra))
    assert (uninterrupted / "checkpoint-2" / "adapters" / "adapter_model.safetensors").is_file() == bool(extra)

    killed = tmp_path / "killed"
    # A FIFO where checkpoint-4's optimizer state goes holds the run inside that save, after the model is written and
    # before trainer_state.json: the kill then lands exactly where a real one leaves a half-saved checkpoint.
    (killed / "checkpoint-4").mkdir(parents=True)
    fifo = killed / "checkpoint-4" / "optimizer.pt"
    os.mkfifo(fifo)
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "train.py"),
                                *resume_args(setup, killed, *extra)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 240
    while not (killed / "checkpoint-4" / "model.safetensors").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before checkpoint-4's save"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert (killed / "checkpoint-2" / "trainer_state.json").exists()
    assert not (killed / "checkpoint-4" / "trainer_state.json").exists()
    fifo.unlink()
    fifo.write_bytes(b"PK\x03\x04 cut short")  # what a kill during torch.save leaves

    main(resume_args(setup, killed, *extra) + ["--resume_from_checkpoint", "latest"])
    log = (killed / "train.log").read_text()
    assert "Resuming from" in log and "checkpoint-2; passed over the newer checkpoint-4 (trainer_state.json is " \
        "missing; scheduler.pt is missing; rng_state.pth is missing)" in log
    assert losses(killed)[-4:] == losses(uninterrupted)[-4:]
    final, reference = load_file(killed / "model.safetensors"), load_file(uninterrupted / "model.safetensors")
    assert final.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(final[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_resume_from_an_incomplete_checkpoint_stops_at_start_naming_what_is_missing(setup, tmp_path):
    cut = tmp_path / "out" / "checkpoint-5"
    cut.mkdir(parents=True)
    (cut / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        main(resume_args(setup, tmp_path / "out") + ["--resume_from_checkpoint", "latest"])
    assert str(stop.value.code) == (
        f"error: --resume_from_checkpoint latest: no complete checkpoint in {tmp_path / 'out'}. Incomplete: "
        "checkpoint-5 (trainer_state.json is missing; optimizer.pt is missing; scheduler.pt is missing; "
        "rng_state.pth is missing).")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_two_process_accelerate_run(setup, tmp_path):
    output = tmp_path / "ddp"
    # `--cpu` selects Accelerate's single-process launcher (multi-CPU there means mpirun); the torchrun launcher gives
    # two real processes, which training runs data-parallel over gloo when no accelerator is present.
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
               "no", "--dynamo_backend", "no", str(REPO / "scripts" / "train.py"),
               *base_args(setup, output, "--max_steps", "2", "--per_device_train_batch_size", "2",
                          "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
                          "--freeze_text", "false")]
    accelerate = Path(sys.executable).parent / "accelerate"
    command[0] = str(accelerate)
    result = subprocess.run(command, capture_output=True, text=True, timeout=420,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = (output / "train.log").read_text()
    assert "Total train batch size (w. parallel, distributed & accumulation) = 4" in log
    assert AutoModel.from_pretrained(output).config.freeze_text is False


def test_the_vision_tower_trains_at_its_own_learning_rate(setup, tmp_path):
    # A tower rate of 1e-9 against 1e-2 for the rest: after two AdamW steps the tower has moved by about 2e-9, the
    # projector and decoder by about 2e-2. Without the flag the tower moves as much as the rest.
    initial = load_file(Path(setup["vision"]) / "model.safetensors")

    def moved(*extra):
        output = tmp_path / f"run{len(extra)}"
        main(base_args(setup, output, "--freeze_vision", "false", "--freeze_text", "false", "--learning_rate", "1e-2",
                       "--max_steps", "2", "--warmup_steps", "0", "--eval_strategy", "no", "--save_strategy", "no",
                       "--load_best_model_at_end", "false", "--feature_cache", "false", *extra))
        trained = load_file(output / "model.safetensors")
        tower = [(trained[key] - initial[key.removeprefix("model.vision_model.")]).abs().max().item()
                 for key in trained if key.startswith("model.vision_model.")
                 and key.removeprefix("model.vision_model.") in initial]
        projector = [value for key, value in trained.items() if key.startswith("model.projector.")]
        return max(tower), len(tower), projector

    tower, matched, projector = moved("--vision_learning_rate", "1e-9")
    assert matched > 4 and tower < 1e-6
    assert max(value.abs().max().item() for value in projector) > 0
    default_tower, _, _ = moved()
    assert default_tower > 1e-3
