"""The model card of every exported repo, read back with huggingface_hub's own `ModelCard` parser."""

import copy
import logging
import re

import pytest
from huggingface_hub import ModelCard

from vision_gpt.export.model_card import (
    DEFAULT_WIDGET_IMAGE,
    readdress_model_card,
    render_model_card,
    resolve_license,
)
from vision_gpt.export.repo import export_repo

from .conftest import tiny_model

# The sections of the Hub's model card guide (https://huggingface.co/docs/hub/model-cards), as the card names them.
SECTIONS = ["Model details", "Uses", "Direct use", "Out-of-scope use", "Bias, risks and limitations",
            "How to get started", "Training details", "Training data", "Training procedure", "Compute", "Evaluation",
            "Citation"]


def headings(card: ModelCard) -> list[str]:
    return [line.lstrip("#").strip() for line in card.text.splitlines() if re.match(r"#{2,3} ", line)]


def tower_with_card(folder, license):
    folder.mkdir()
    ModelCard(f"---\nlicense: {license}\n---\n# a tower\n").save(folder / "README.md")
    return str(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, processor):
    root = tmp_path_factory.mktemp("card")
    folders = export_repo(
        tiny_model(), processor, root / "repo", repo_id="user/tiny-captioner", license="apache-2.0",
        language=["en", "de"], vision_model="google/vit-base-patch16-224-in21k", text_model="gpt2",
        datasets=["flickr8k"], dataset_name="flickr8k", dataset_split="validation",
        metrics={"BLEU-4": 21.5, "CIDEr-D": 55.25, "loss": 2.5}, num_scored_images=100,
        decoding={"num_beams": 3, "max_new_tokens": 32})
    return folders


def test_card_metadata_follows_the_hub_conventions(exported):
    card = ModelCard.load(exported["fp32"] / "README.md")
    data = card.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-to-text"
    assert data.license == "apache-2.0" and data.language == ["en", "de"]
    assert data.base_model == ["google/vit-base-patch16-224-in21k", "gpt2"]
    assert data.datasets == ["flickr8k"] and {"image-captioning", "vision-gpt", "vit", "gpt2"} <= set(data.tags)
    # The widget's image is in the repo, at the address the Hub serves it from.
    assert data.widget == [{"src": "https://huggingface.co/user/tiny-captioner/resolve/main/example.jpg",
                            "example_title": "Example image"}]
    assert (exported["fp32"] / "example.jpg").read_bytes() == DEFAULT_WIDGET_IMAGE.read_bytes()


def test_model_index_names_split_and_decoding(exported):
    results = {r.metric_type: r for r in ModelCard.load(exported["fp32"] / "README.md").data.eval_results}
    assert set(results) == {"bleu_4", "cider_d", "loss"}
    cider = results["cider_d"]
    assert (cider.task_type, cider.dataset_name, cider.dataset_split) == ("image-to-text", "flickr8k", "validation")
    assert cider.metric_value == 55.25 and cider.metric_name == "CIDEr-D (3 beams, up to 32 new tokens)"
    assert cider.metric_args == {"num_beams": 3, "max_new_tokens": 32}
    # Loss is teacher-forced: no decoding settings.
    assert results["loss"].metric_name == "loss" and results["loss"].metric_args is None


def test_card_body_has_the_guide_sections_and_a_runnable_quick_start(exported):
    card = ModelCard.load(exported["fp32"] / "README.md")
    assert headings(card) == SECTIONS
    assert 'AutoModel.from_pretrained("user/tiny-captioner", trust_remote_code=True)' in card.text
    assert "**validation** split" in card.text and "| CIDEr-D | 55.25 |" in card.text
    assert "Flickr8k (Hodosh et al., 2013)" in card.text  # the dataset's known skews
    assert "pip install vision-gpt" not in card.text  # not published: the card says how to install from source
    fp16 = ModelCard.load(exported["fp16"] / "README.md")
    assert "FP16" in fp16.text and fp16.data.widget == card.data.widget


def test_license_comes_from_the_towers_cards_or_is_other_with_a_warning(tmp_path, caplog):
    apache = tower_with_card(tmp_path / "vit", "apache-2.0")
    also_apache = tower_with_card(tmp_path / "gpt", "apache-2.0")
    mit = tower_with_card(tmp_path / "mit-gpt", "mit")
    model = tiny_model()
    card = ModelCard(render_model_card(model, "user/x", vision_model=apache, text_model=also_apache))
    assert card.data.license == "apache-2.0" and card.data.base_model is None  # local folders are no Hub models
    with caplog.at_level(logging.WARNING):
        card = ModelCard(render_model_card(model, "user/x", vision_model=apache, text_model=mit))
    assert card.data.license == "other"
    assert "--license" in caplog.text and "apache-2.0" in caplog.text and "mit" in caplog.text
    assert resolve_license("cc-by-4.0", {"a": "mit"}) == "cc-by-4.0"
    assert resolve_license(None, {"random tower": None, "b": "mit"}) == "mit"


def test_instruct_decoder_cards_are_image_text_to_text(tmp_path, processor):
    chat = copy.deepcopy(processor)
    chat.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    folders = export_repo(tiny_model(), chat, tmp_path / "repo", repo_id="user/chat", fp16=False, license="mit",
                          vision_model="v", text_model="t", widget_image=None)
    card = ModelCard.load(folders["fp32"] / "README.md")
    assert card.data.pipeline_tag == "image-text-to-text" and getattr(card.data, "widget", None) is None


def test_a_missing_widget_image_is_refused_before_anything_is_written(tmp_path, processor):
    with pytest.raises(ValueError, match="widget image .*nope.jpg"):
        export_repo(tiny_model(), processor, tmp_path / "repo", repo_id="x", license="mit", vision_model="v",
                    text_model="t", widget_image=tmp_path / "nope.jpg")
    assert not (tmp_path / "repo").exists()


def test_a_card_is_readdressed_to_the_repo_it_is_pushed_to(exported):
    text = (exported["fp32"] / "README.md").read_text()
    moved = ModelCard(readdress_model_card(text, "me/shapes-captioner"))
    assert 'AutoModel.from_pretrained("me/shapes-captioner", trust_remote_code=True)' in moved.text
    assert "user/tiny-captioner" not in moved.content
    assert moved.data.widget[0]["src"] == "https://huggingface.co/me/shapes-captioner/resolve/main/example.jpg"
    assert moved.data.eval_results[0].dataset_split == "validation"
    assert readdress_model_card("# not ours\n", "me/x") == "# not ours\n"
