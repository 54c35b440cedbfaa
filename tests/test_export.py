import re

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

from vision_gpt.cli import commands as cli
from vision_gpt.assembly.build import assemble
from vision_gpt.export.repo import export_repo
from vision_gpt.export.model_card import render_model_card

from .conftest import tiny_model, tiny_text_config, tiny_vision_config


def front_matter(readme):
    text = readme.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1]), text


def test_export_writes_fp32_and_fp16_repos_with_cards(tmp_path, processor):
    model = tiny_model()
    folders = export_repo(model, processor, tmp_path / "repo", repo_id="user/tiny-captioner",
                          vision_model="tiny-vit", text_model="tiny-gpt2", license="mit", datasets=["flickr8k"],
                          dataset_name="Flickr8k", metrics={"BLEU-4": 21.5, "CIDEr": 55.25})
    assert folders == {"fp32": tmp_path / "repo", "fp16": tmp_path / "repo" / "fp16"}
    sizes = {name: (folder / "model.safetensors").stat().st_size for name, folder in folders.items()}
    assert 0.49 < sizes["fp16"] / sizes["fp32"] < 0.51
    meta, text = front_matter(folders["fp32"] / "README.md")
    assert meta["pipeline_tag"] == "image-to-text" and meta["license"] == "mit" and meta["datasets"] == ["flickr8k"]
    results = meta["model-index"][0]["results"][0]
    assert {m["name"]: m["value"] for m in results["metrics"]} == {"BLEU-4": 21.5, "CIDEr": 55.25}
    assert 'AutoModel.from_pretrained("user/tiny-captioner", trust_remote_code=True)' in text
    assert 'pipeline("image-to-text", model="user/tiny-captioner"' in text
    assert not re.search(r"{{\w+}}", text)  # every placeholder filled
    fp16_meta, fp16_text = front_matter(folders["fp16"] / "README.md")
    assert "FP16" in fp16_text and fp16_meta["pipeline_tag"] == "image-to-text"


def test_export_refuses_a_half_precision_model(tmp_path, processor):
    with pytest.raises(ValueError, match="FP32"):
        export_repo(tiny_model().to(torch.float16), processor, tmp_path, repo_id="x", vision_model="v",
                    text_model="t")


def test_card_refuses_unfilled_placeholders(tmp_path, monkeypatch):
    template = tmp_path / "MODEL_CARD.md"
    template.write_text("---\n{{card_data}}\n---\n{{mystery_field}}\n")
    monkeypatch.setattr("vision_gpt.export.model_card.template_path", lambda: template)
    with pytest.raises(KeyError, match="mystery_field"):
        render_model_card(tiny_model(), "user/x", vision_model="v", text_model="t")


def test_assemble_from_local_towers_builds_model_and_processor(tmp_path, tokenizer):
    ViTModel(ViTConfig(**{k: v for k, v in tiny_vision_config().items() if k != "model_type"}),
             add_pooling_layer=False).save_pretrained(tmp_path / "vit")
    GPT2LMHeadModel(GPT2Config(**{k: v for k, v in tiny_text_config().items() if k != "model_type"})).save_pretrained(
        tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    model, processor = assemble(str(tmp_path / "vit"), str(tmp_path / "gpt2"), fusion="cross_attention")
    assert model.config.fusion == "cross_attention"
    # The tower was saved without an image processor: its size and ImageNet statistics are used.
    assert processor.image_processor.size == {"height": 32, "width": 32}
    assert list(processor.image_processor.image_mean) == [0.485, 0.456, 0.406]
    assert processor.tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_cli_assemble_tiny_exports_and_reloads(tmp_path, capsys):
    assert cli.main(["assemble", "--tiny", "--output_dir", str(tmp_path / "out"), "--fusion", "cross_attention",
                     "--visual_tokens", "patches", "--license", "cc-by-4.0", "--language", "en", "fr"]) == 0
    out = capsys.readouterr().out
    assert "fp16:" in out and "generated_text" in out
    assert (tmp_path / "out" / "fp16" / "model.safetensors").is_file()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "cc-by-4.0" and card.data.language == ["en", "fr"]
    # Without --repo-id the card is addressed to the folder's name, never to a path of this machine.
    assert 'from_pretrained("out", trust_remote_code=True)' in card.text


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    assert cli.main(["assemble", "--output_dir", str(tmp_path)]) == 2
    assert "error: --vision-model and --text-model are required (or --tiny)." in capsys.readouterr().err
    assert cli.main(["assemble", "--tiny", "--output_dir", str(tmp_path), "--num_visual_tokens", "0"]) == 2
    assert "num_visual_tokens" in capsys.readouterr().err
