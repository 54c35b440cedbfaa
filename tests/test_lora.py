"""LoRA adapters (peft) with `scripts/train.py --lora_r`: training, checkpoints, the merged export, PEFT's files."""

import json
import re

import pytest
import torch
from safetensors import safe_open

from vision_gpt import VisionGPTForConditionalGeneration, VisionGPTProcessor
from vision_gpt.training.lora import LoraSettings, add_adapters, has_adapters, merge_adapters
from vision_gpt.training.train import main

from .conftest import random_images, tiny_decoder_config, tiny_model, train_args

peft = pytest.importorskip("peft")

LORA = ["--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "5e-2"]


@pytest.fixture(scope="module")
def lora_run(llama_checkpoints, tmp_path_factory):
    """Two steps with LoRA on a frozen tiny Llama, the adapters also written the PEFT way."""
    vision, text_folder, _, data = llama_checkpoints
    output = tmp_path_factory.mktemp("lora") / "out"
    main(train_args(vision, text_folder, data, output, "--max_steps", "2", "--save_adapters", "true", *LORA))
    return output


def batch_for(folder):
    processor = VisionGPTProcessor.from_pretrained(folder)
    return processor(images=random_images(2), suffix=["a red circle", "two blue squares"])


def test_lora_run_exports_merged_weights_that_load_without_peft(lora_run):
    with safe_open(lora_run / "model.safetensors", "pt") as weights:
        names = set(weights.keys())
    assert not any("lora_" in name or "base_layer" in name for name in names)
    assert "model.language_model.layers.0.self_attn.q_proj.weight" in names
    log = (lora_run / "train.log").read_text()
    assert "LoRA r=4, alpha=8, dropout=0 on the decoder's" in log and "adapter parameters" in log
    count = re.search(r"([\d,]+) adapter parameters", log).group(1)
    assert f"; adapters {count} of {count};" in log  # the summary's row for them: all trainable
    assert "LoRA adapters (rank 4, alpha 8) trained on the decoder, merged" in (lora_run / "README.md").read_text()


def test_lora_changes_the_logits_and_the_merged_export_equals_the_adapted_model(lora_run, llama_checkpoints):
    batch = batch_for(lora_run)
    merged = VisionGPTForConditionalGeneration.from_pretrained(lora_run).eval()
    base = VisionGPTForConditionalGeneration.from_pretrained(lora_run / "unmerged").eval()
    # The frozen decoder's own weights did not train; the merge is what changed them.
    name = "layers.0.self_attn.q_proj.weight"
    pretrained = llama_checkpoints[2].base_model.state_dict()[name]
    assert torch.equal(base.language_model.state_dict()[name], pretrained)
    assert not torch.equal(merged.language_model.state_dict()[name], pretrained)
    config = json.loads((lora_run / "adapters" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["base_model_name_or_path"] == str(
        (lora_run / "unmerged").resolve())
    with torch.no_grad():
        without = base(**batch).logits
        adapted = peft.PeftModel.from_pretrained(base, lora_run / "adapters").eval()(**batch).logits
        ours = merged(**batch).logits
    assert (adapted - without).abs().max() > 1e-3  # the adapters moved the decoder
    torch.testing.assert_close(ours, adapted, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decoder", ["gpt2", "llama"])
def test_adapters_train_next_to_the_projector_and_merge_exactly(decoder):
    model = tiny_model(text_config=tiny_decoder_config(decoder) if decoder != "gpt2" else None)
    add_adapters(model, LoraSettings(r=2, alpha=4, target_modules=("c_attn",) if decoder == "gpt2" else ("q_proj",
                                                                                                          "v_proj")))
    summary = model.parameter_summary()
    assert summary["adapters"]["trainable"] == summary["adapters"]["total"] > 0
    assert summary["projector"]["trainable"] == summary["projector"]["total"] > 0
    assert summary["language_model"]["trainable"] == 0  # freeze_text: only the adapters train in the decoder
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # LoRA starts as a no-op (B = 0); give it an effect to merge
    pixel_values, input_ids = torch.randn(2, 3, 32, 32), torch.randint(0, 90, (2, 5))
    greedy = dict(max_new_tokens=6, min_new_tokens=6, num_beams=1)
    with torch.no_grad():
        adapted = model(pixel_values=pixel_values, input_ids=input_ids).logits
        model.generate(pixel_values=pixel_values, **greedy)  # packs the unmerged weights where oneDNN runs
        merge_adapters(model)
        merged = model(pixel_values=pixel_values, input_ids=input_ids).logits
    assert not has_adapters(model) and "adapters" not in model.parameter_summary()
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    # generate's fast path reads the merged weights, not a packed copy of the old ones.
    assert torch.equal(model.generate(pixel_values=pixel_values, **greedy),
                       model.generate(pixel_values=pixel_values, use_packed_linears=False, **greedy))


def test_unknown_target_modules_are_named(llama_checkpoints, tmp_path, capsys):
    vision, text_folder, _, data = llama_checkpoints
    with pytest.raises(SystemExit) as stop:
        main(train_args(vision, text_folder, data, tmp_path / "out", "--max_steps", "1", "--lora_r", "2",
                        "--lora_target_modules", "q_proj", "c_attn"))
    assert "--lora_target_modules ['c_attn'] name no linear layer of the decoder; its linear layers are" in str(
        stop.value.code)


@pytest.mark.parametrize("flags", [["--save_adapters", "true"], ["--lora_alpha", "8"], ["--lora_r", "-1"]])
def test_lora_flags_without_a_rank_fail_at_start(llama_checkpoints, tmp_path, capsys, flags):
    vision, text_folder, _, data = llama_checkpoints
    with pytest.raises(SystemExit):
        main(train_args(vision, text_folder, data, tmp_path / "out", *flags))
    assert "--lora_r" in capsys.readouterr().err
