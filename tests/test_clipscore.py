"""CLIPScore and RefCLIPScore as Hessel et al. (2021) define them, on a tiny random CLIP built here."""

import shutil

import pytest
import torch
from transformers import CLIPModel

from vision_gpt.evaluation.clipscore import CLIP_WEIGHT, CLIPScorer, CLIPScoreSettings

from .conftest import random_images, tiny_model
from .data_fixtures import save_tiny_clip

CAPTIONS = ["a dog runs on the grass", "a red square", "a cat sleeps on a sofa"]
REFERENCES = [["a dog on the grass", "the dog runs"], ["a red square", "a red box"], ["a cat on a sofa"]]
WORDS = "a photo depicts " + " ".join(CAPTIONS + [ref for refs in REFERENCES for ref in refs])


@pytest.fixture(scope="module")
def scorer(tmp_path_factory):
    folder = save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", WORDS.split())
    return CLIPScorer(CLIPScoreSettings(model=str(folder)))


def forward_cosines(scorer, images, texts):
    """cos(E_c, E_v) for each (caption, image) pair through CLIPModel.forward: logits / logit scale, not our path."""
    model = CLIPModel.from_pretrained(scorer.settings.model).eval()
    tokens = scorer.tokenizer(texts, padding=True, return_tensors="pt")
    pixels = scorer.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels)
        return (output.logits_per_image / model.logit_scale.exp()).diag()


def test_clipscore_is_w_times_the_clipped_cosine_of_caption_and_image(scorer):
    images = random_images(3, seed=4)
    rows = scorer.per_image(images, CAPTIONS)
    cosines = forward_cosines(scorer, images, ["A photo depicts " + caption for caption in CAPTIONS])
    expected = 100.0 * CLIP_WEIGHT * cosines.clamp(min=0)
    assert [row["clipscore"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-3)
    assert scorer(images, CAPTIONS)["clipscore"] == pytest.approx(float(expected.mean()), abs=1e-3)


def test_refclipscore_is_the_harmonic_mean_with_the_best_reference(scorer):
    images = random_images(3, seed=4)
    rows = scorer.per_image(images, CAPTIONS, REFERENCES)
    captions = scorer.embed_texts(["A photo depicts " + caption for caption in CAPTIONS])
    for row, caption, refs in zip(rows, captions, REFERENCES):
        best = float((scorer.embed_texts(["A photo depicts " + ref for ref in refs]) @ caption).max().clamp(min=0))
        clip = row["clipscore"] / 100.0
        assert row["refclipscore"] / 100.0 == pytest.approx(2 * clip * best / (clip + best), abs=1e-5)
    # A reference equal to the caption gives the best possible reference term, cos = 1.
    same = scorer.per_image(images[:1], CAPTIONS[:1], [[CAPTIONS[0]]])[0]
    clip = same["clipscore"] / 100.0
    assert same["refclipscore"] / 100.0 == pytest.approx(2 * clip / (clip + 1), abs=1e-5)


def test_an_empty_caption_scores_zero(scorer):
    rows = scorer.per_image(random_images(2), ["", "a dog"], [["a dog"], ["a dog"]])
    assert rows[0] == {"clipscore": 0.0, "refclipscore": 0.0} and rows[1]["clipscore"] >= 0


def test_bad_models_and_inputs_get_errors_naming_them(scorer, tmp_path):
    with pytest.raises(ValueError, match=r"--clipscore-model '.*nowhere' could not be loaded: .* Pass a CLIP model"):
        CLIPScorer(CLIPScoreSettings(model=str(tmp_path / "nowhere")))
    tiny_model().save_pretrained(tmp_path / "captioner")
    with pytest.raises(ValueError, match="is a vision_gpt model, not a CLIP model"):
        CLIPScorer(CLIPScoreSettings(model=str(tmp_path / "captioner")))
    with pytest.raises(ValueError, match="Got 1 images but 2 captions"):
        scorer.per_image(random_images(1), ["a", "b"])
    with pytest.raises(ValueError, match="Image 0 has no non-empty reference caption"):
        scorer.per_image(random_images(1), ["a dog"], [[" "]])


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java: apt-get install openjdk-17-jre-headless")
def test_the_evaluate_module_adds_clipscore_given_the_images(scorer):
    import evaluate

    from vision_gpt.evaluation.metrics import CAPTION_METRICS_PATH

    metric = evaluate.load(CAPTION_METRICS_PATH)
    images = random_images(3, seed=4)
    results = metric.compute(predictions=CAPTIONS, references=REFERENCES, spice=False,
                             clipscore_model=scorer.settings.model, images=images)
    expected = scorer(images, CAPTIONS, REFERENCES)
    assert results["clipscore"] == pytest.approx(expected["clipscore"], abs=1e-4)
    assert results["refclipscore"] == pytest.approx(expected["refclipscore"], abs=1e-4)
    with pytest.raises(ValueError, match=r"clipscore_model needs `images`, one per prediction \(3\), got none"):
        metric.compute(predictions=CAPTIONS, references=REFERENCES, spice=False, clipscore_model=scorer.settings.model)
