"""`vision-gpt` as one program: bare help, --version, dashed flags with their underscore aliases, defaults in help,
`vision-gpt train` next to `accelerate launch scripts/train.py`, and `vision-gpt push`."""

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from safetensors.torch import load_file

import vision_gpt
from vision_gpt.cli import build_parser, main
from vision_gpt.cli.commands import command_parsers
from vision_gpt.export.repo import export_repo

from .conftest import tiny_model
from .data_fixtures import save_tiny_towers, write_flickr8k
from .hub_stub import HubStub

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ("demo", "train", "evaluate", "caption", "assemble", "convert", "export-onnx", "push", "app")
# What each command needs beyond the flag under test, so that its parser accepts the line.
REQUIRED = {"evaluate": ["--model", "m"], "caption": ["--model", "m"], "app": ["--model", "m"],
            "assemble": ["--output-dir", "o"], "convert": ["source"], "push": ["folder", "user/repo"],
            "demo": [], "export-onnx": []}


def subcommands():
    return build_parser(), command_parsers()


def test_bare_command_lists_every_subcommand_with_what_it_does_and_exits_0(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for command in COMMANDS:
        # argparse puts a long name's description on the next line.
        at = next((i for i, line in enumerate(lines) if line.split()[:1] == [command]), None)
        assert at is not None, f"{command} is not listed:\n{out}"
        description = lines[at].split()[1:] or lines[at + 1].split()
        assert len(description) > 3, f"{command} is listed without a description:\n{out}"
    # The installed entry point too, as a shell runs it.
    result = subprocess.run([Path(sys.executable).parent / "vision-gpt"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "export-onnx" in result.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"vision-gpt {vision_gpt.__version__}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])
def test_every_flag_takes_its_dashed_spelling_and_its_underscore_alias(command):
    parser, choices = subcommands()
    for action in choices[command]._actions:
        flags = [name for name in action.option_strings if name.startswith("--")]
        if not flags or action.help == argparse.SUPPRESS or action.dest in ("help", "version"):
            continue
        flag = flags[0]
        assert "_" not in flag, f"{command} {flag}: flags are spelled with dashes"
        value = [] if action.nargs == 0 else [str(action.choices[0]) if action.choices else "1"]
        if action.type is not None and getattr(action.type, "__name__", "") == "parse_bool":
            value = ["false"]
        line = [command, *REQUIRED.get(command, []), flag, *value]
        underscore = "--" + flag[2:].replace("-", "_")
        dashed = vars(parser.parse_args(line))
        underscored = vars(parser.parse_args([underscore if token == flag else token for token in line]))
        assert dashed == underscored, f"{command}: {flag} and {underscore} parse differently"


def test_the_flags_assemble_and_the_app_spelled_with_underscores_still_parse():
    parser = build_parser()
    args = parser.parse_args(["assemble", "--vision_model", "v", "--text_model", "t", "--output_dir", "o",
                              "--repo_id", "u/r", "--no_fp16", "--visual_tokens", "queries", "--freeze_vision", "false"])
    assert (args.vision_model, args.text_model, args.output_dir, args.repo_id, args.no_fp16, args.visual_tokens,
            args.freeze_vision) == ("v", "t", "o", "u/r", True, "queries", False)
    args = parser.parse_args(["app", "--model", "m", "--max_upload_mb", "2", "--no_urls", "--max_queue", "3"])
    assert (args.max_upload_mb, args.no_urls, args.max_queue) == (2.0, True, 3)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_dashed_flags_and_defaults(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert not re.findall(r"--[a-z0-9]+_[a-z0-9_]*", out), f"underscore spellings in {command} --help"
    assert "(default: " in out or command in ("push", "convert")


def test_demo_help_shows_its_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "training images to generate (default: 2000)" in text and "training batch size (default: 32)" in text
    assert "(default: vision-gpt-demo)" in text


def test_negative_training_flags_say_what_they_do(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-freeze-vision Unfreeze the vision tower: it trains too." in text
    assert "--no-freeze-text Unfreeze the decoder: it trains too." in text


def test_train_takes_dashed_and_underscore_flags_alike(tmp_path):
    from vision_gpt.training.arguments import parse_arguments

    data, out = str(tmp_path), str(tmp_path / "out")
    common = ["--dataset", "flickr8k", "--data-dir", data, "--output-dir", out, "--use-cpu", "true"]
    dashed = parse_arguments(["--vision-model", "v", "--text-model", "t", "--no-freeze-vision", *common])
    underscored = parse_arguments(["--vision_model", "v", "--text_model", "t", "--no_freeze_vision", "--dataset",
                                   "flickr8k", "--data_dir", data, "--output_dir", out, "--use_cpu", "true"])
    assert dashed[0] == underscored[0] and dashed[0].freeze_vision is False
    assert dashed[1] == underscored[1]


def test_vision_gpt_train_and_accelerate_launch_scripts_train_give_the_same_weights(tmp_path, tokenizer):
    vision, text = save_tiny_towers(tmp_path, tokenizer)
    data = write_flickr8k(tmp_path / "f8k", train=4, val=2, test=2)

    def flags(output):
        return ["--vision-model", vision, "--text-model", text, "--data-dir", str(data), "--output-dir", str(output),
                "--max-steps", "2", "--per-device-train-batch-size", "4", "--report-to", "none",
                "--caption-metrics", "false", "--eval-strategy", "no", "--save-strategy", "no",
                "--load-best-model-at-end", "false", "--dataloader-pin-memory", "false", "--feature-cache", "false",
                "--use-cpu", "true", "--seed", "3"]

    assert main(["train", *flags(tmp_path / "cli")]) == 0
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--num-processes", "1", "--num-machines", "1", "--mixed-precision", "no",
               "--dynamo-backend", "no", "--cpu", str(REPO / "scripts" / "train.py"), *flags(tmp_path / "script")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = (load_file(tmp_path / run / "model.safetensors") for run in ("cli", "script"))
    assert ours.keys() == theirs.keys()
    assert all((ours[key] == theirs[key]).all() for key in ours)
    # Quiet by default: transformers' config dumps go to train.log, not to the console.
    log = (tmp_path / "script" / "train.log").read_text()
    assert '"model_type": "vit"' in log and '"model_type": "vit"' not in result.stderr


def test_push_uploads_a_saved_folder(tmp_path, processor, monkeypatch, capsys):
    folder = tmp_path / "repo"
    export_repo(tiny_model(), processor, folder, repo_id="user/tiny", vision_model="v", text_model="t")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with HubStub(token="hf_cli") as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert main(["push", str(folder), "user/tiny", "--private", "--revision", "v1", "--token", "hf_cli"]) == 0
        received = hub.repo("user/tiny").received("v1")
    assert {"config.json", "model.safetensors", "README.md", "fp16/model.safetensors"} <= set(received)
    assert "Pushed" in capsys.readouterr().out
    assert main(["push", str(tmp_path / "nowhere"), "user/tiny"]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_convert_names_a_missing_or_doubled_output_folder(capsys):
    assert main(["convert", "some/ved"]) == 2
    assert "convert needs the output folder: --output-dir DIR." in capsys.readouterr().err
    assert main(["convert", "some/ved", "a", "--output-dir", "b"]) == 2
    assert "Two output folders: --output-dir b and a; give one." in capsys.readouterr().err


def test_command_parsers_give_every_subcommand_with_its_summary():
    # The docs' command-line reference is written from these (docs/hooks/cli_reference.py).
    parsers = command_parsers()
    assert list(parsers) == ["demo", "train", "evaluate", "caption", "assemble", "convert", "export-onnx", "push",
                             "app", "serve"]
    listing = build_parser().format_help()
    for name, parser in parsers.items():
        assert parser.summary and parser.summary in " ".join(listing.split()), name
