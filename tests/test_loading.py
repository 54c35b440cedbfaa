"""The one loader (`vision_gpt.inference.loading`): remote code only when trusted, one dtype vocabulary, one device
choice, and the one decoding check, as every command and `VisionGPTCaptioner` meet them."""

import json
import shutil

import pytest
import torch

from vision_gpt import VisionGPTCaptioner
from vision_gpt.app.server import Captioner
from vision_gpt.cli import build_parser
from vision_gpt.cli import commands as cli
from vision_gpt.export.repo import export_repo
from vision_gpt.inference.decoding import check_decoding
from vision_gpt.inference.loading import RemoteCodeError, dtype_name, load_model, resolve_device

from .conftest import random_images, tiny_model
from .data_fixtures import write_flickr8k

TRUST_FLAG = "--trust-remote-code"


@pytest.fixture(scope="module")
def remote_code_repo(tmp_path_factory, processor):
    """An exported repo whose model type this package does not register: only the code in the repo can build it, as
    for any custom model on the Hub."""
    folder = tmp_path_factory.mktemp("remote-code") / "repo"
    export_repo(tiny_model(), processor, folder, repo_id="someone/fork", fp16=False, vision_model="tiny ViT",
                text_model="tiny GPT-2")
    config = json.loads((folder / "config.json").read_text())
    assert "AutoModel" in config["auto_map"]
    config["model_type"] = "vision_gpt_fork"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def flickr8k(tmp_path_factory):
    return write_flickr8k(tmp_path_factory.mktemp("f8k"), train=1, val=1, test=2)


def test_the_loader_refuses_remote_code_unless_trusted_and_names_the_flag(remote_code_repo):
    with pytest.raises(RemoteCodeError, match=f"needs the Python code stored in its repo.*pass {TRUST_FLAG} "
                                              r"\(trust_remote_code=True in Python\)"):
        load_model(str(remote_code_repo))
    model, processor = load_model(str(remote_code_repo), trust_remote_code=True)
    # The repo's own classes, loaded from its files: not this package's.
    assert type(model).__module__.startswith("transformers_modules.")
    assert not model.training and processor is not None


def test_a_repo_of_this_package_needs_no_remote_code(tiny_model_dir):
    model, _ = load_model(str(tiny_model_dir))
    assert type(model).__module__ == "vision_gpt.modeling.modeling_vision_gpt"


def test_vision_gpt_captioner_refuses_remote_code_unless_trusted(remote_code_repo):
    with pytest.raises(RemoteCodeError, match=TRUST_FLAG):
        VisionGPTCaptioner(str(remote_code_repo), max_new_tokens=2)
    captioner = VisionGPTCaptioner(str(remote_code_repo), max_new_tokens=2, num_beams=1, trust_remote_code=True)
    out = captioner({"image": random_images(1)})
    assert out["error"] == [""] and isinstance(out["caption"][0], str)


def test_app_refuses_remote_code_unless_trusted(remote_code_repo, capsys):
    with pytest.raises(RemoteCodeError, match=TRUST_FLAG):
        Captioner.from_pretrained(str(remote_code_repo))
    assert Captioner.from_pretrained(str(remote_code_repo), trust_remote_code=True).model is not None
    # The command says so and exits 2 before any page is built.
    assert cli.main(["app", "--model", str(remote_code_repo), "--port", "1"]) == 2
    assert TRUST_FLAG in capsys.readouterr().err


def test_evaluate_refuses_remote_code_unless_trusted(remote_code_repo, flickr8k, tmp_path, capsys):
    argv = ["evaluate", "--model", str(remote_code_repo), "--data-dir", str(flickr8k), "--output-dir",
            str(tmp_path / "eval"), "--max-new-tokens", "2", "--num-beams", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert TRUST_FLAG in err and "needs the Python code stored in its repo" in err
    assert not (tmp_path / "eval").exists()


def test_caption_refuses_remote_code_unless_trusted(remote_code_repo, tmp_path, capsys):
    image = tmp_path / "a.png"
    random_images(1)[0].save(image)
    argv = ["caption", str(image), "--model", str(remote_code_repo), "--num-workers", "0", "--max-new-tokens", "2",
            "--num-beams", "1"]
    assert cli.main(argv) == 2
    assert TRUST_FLAG in capsys.readouterr().err
    assert cli.main([*argv, TRUST_FLAG]) == 0


@pytest.mark.parametrize("alias, name", [("fp32", "float32"), ("float32", "float32"), ("bf16", "bfloat16"),
                                         ("BFloat16", "bfloat16"), ("fp16", "float16"), ("half", "float16"),
                                         ("torch.float16", "float16")])
def test_one_dtype_vocabulary_with_aliases(alias, name):
    assert dtype_name(alias) == name


def test_dtypes_each_runtime_refuses_say_what_to_do():
    with pytest.raises(ValueError, match="q8 is a quantized ONNX export.s: use runtime onnx"):
        dtype_name("q8")
    with pytest.raises(ValueError, match="bf16 is not one of an ONNX export's"):
        dtype_name("bf16", runtime="onnx")
    assert dtype_name("fp16", runtime="onnx") == "float16" and dtype_name("q8", runtime="onnx") == "q8"
    with pytest.raises(ValueError, match="fp64 is not one of float32|fp32"):
        dtype_name("fp64")
    with pytest.raises(ValueError, match="runtime must be one of torch, onnx"):
        dtype_name("fp32", runtime="tensorrt")


@pytest.mark.parametrize("command", ["caption", "app", "evaluate"])
def test_every_command_that_takes_a_dtype_accepts_bf16(command):
    argv = {"caption": ["caption", "a.png"], "app": ["app"], "evaluate": ["evaluate"]}[command]
    args = build_parser().parse_args([*argv, "--model", "m", "--dtype", "bf16"])
    assert dtype_name(args.dtype, args.runtime) == "bfloat16"


@pytest.mark.skipif(shutil.which("java") is None,
                    reason="pycocoevalcap needs Java: apt-get install openjdk-17-jre-headless")
def test_bf16_loads_in_bf16_through_the_app_and_evaluate(tiny_model_dir, flickr8k, tmp_path):
    assert Captioner.from_pretrained(str(tiny_model_dir), dtype="bf16", device="cpu").model.dtype == torch.bfloat16
    output = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(tiny_model_dir), "--data-dir", str(flickr8k), "--output-dir",
                     str(output), "--dtype", "bf16", "--max-new-tokens", "2", "--num-beams", "1"]) == 0
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["dtype"] == "bfloat16"


def test_devices_are_resolved_once():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cpu" if not torch.accelerator.is_available() else
                                           torch.accelerator.current_accelerator().type)
    with pytest.raises(ValueError, match="'gpu0' is not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available on this machine"):
            resolve_device("cuda:0")


def test_the_onnx_runtime_refuses_a_revision_and_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="CPU provider, not device cuda"):
        load_model(str(tmp_path), runtime="onnx", device="cuda")
    with pytest.raises(ValueError, match="no revisions"):
        load_model(str(tmp_path), runtime="onnx", revision="main")


def test_the_decoding_check_names_the_flag_and_the_keyword(tiny_model_dir):
    config = tiny_model().generation_config
    cases = [
        ({"num_beams": 0}, r"--num-beams \(num_beams\) must be at least 1, got 0"),
        ({"max_new_tokens": 0}, r"--max-new-tokens \(max_new_tokens\) must be at least 1"),
        ({"do_sample": True, "temperature": 0.0}, r"--temperature \(temperature\) must be positive"),
        ({"do_sample": True, "top_p": 1.5}, r"--top-p \(top_p\) must be in \(0, 1\]"),
        ({"do_sample": True, "top_k": -1}, r"--top-k \(top_k\) must be 0 \(off\) or more"),
        ({"top_p": 0.9, "top_k": 5}, r"--top-p \(top_p\), --top-k \(top_k\) only matter with --do-sample"),
        ({"num_beams": 2, "num_return_sequences": 3}, r"--num-captions \(num_return_sequences\) 3 needs at least as "
                                                      r"many beams \(the model uses --num-beams \(num_beams\) 2\)"),
    ]
    for given, message in cases:
        with pytest.raises(ValueError, match=message):
            check_decoding(given, config)
    kwargs, used = check_decoding({"num_beams": 2, "max_new_tokens": None, "temperature": None}, config)
    assert kwargs == {"num_beams": 2}
    assert used["num_beams"] == 2 and used["do_sample"] is False and used["temperature"] is None
    kwargs, used = check_decoding({"do_sample": True, "num_return_sequences": 4, "top_p": 0.8}, config)
    assert used["num_return_sequences"] == 4 and used["top_p"] == 0.8 and used["temperature"] == 1.0


def test_evaluate_checks_decoding_settings_as_caption_does(tiny_model_dir, flickr8k, tmp_path, capsys):
    message = "--temperature (temperature) only matters with --do-sample (do_sample)"
    image = tmp_path / "a.png"
    random_images(1)[0].save(image)
    assert cli.main(["evaluate", "--model", str(tiny_model_dir), "--data-dir", str(flickr8k), "--output-dir",
                     str(tmp_path / "eval"), "--temperature", "0.5"]) == 2
    assert message in capsys.readouterr().err
    assert cli.main(["caption", str(image), "--model", str(tiny_model_dir), "--temperature", "0.5"]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_is_named(tmp_path):
    with pytest.raises(ValueError, match="Could not load the model '.*nowhere'"):
        load_model(str(tmp_path / "nowhere"))


def test_export_onnx_takes_the_dtype_vocabulary_and_says_which_graphs_it_writes(tmp_path, capsys):
    # Refused before the model loads: there is none at this path.
    argv = ["export-onnx", "--model", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out")]
    assert cli.main([*argv, "--dtype", "bf16"]) == 2
    assert "dtype bf16 is not one of an ONNX export's" in capsys.readouterr().err
    assert cli.main([*argv, "--dtype", "int8"]) == 2
    assert "int8 graphs come from --quantize int8" in capsys.readouterr().err
    assert build_parser().parse_args([*argv, "--dtype", "half"]).dtype == "half"
