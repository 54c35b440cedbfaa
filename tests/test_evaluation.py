"""Caption metrics against hand-derived scores and pycocoevalcap itself, caption statistics, perplexity, the table."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

from vision_gpt.evaluation import metrics as evaluation
from vision_gpt.evaluation.metrics import (CAPTION_METRICS_PATH, JAVA_INSTALL_HINT, caption_metrics_session,
                                           caption_statistics, compute_caption_metrics, format_metrics_table,
                                           perplexity, repeats_phrase)

from .conftest import random_images, tiny_model

needs_java = pytest.mark.skipif(
    shutil.which("java") is None, reason=f"pycocoevalcap runs Java; install it with `{JAVA_INSTALL_HINT}`"
)

# Each image's captions use words no other image uses, so every CIDEr-D document frequency is 1 and every idf is
# log(num_images) > 0. The first reference equals the prediction up to case, punctuation and whitespace (the "\r\n"
# would also shift every later caption onto the wrong image if it reached the line-based PTB tokenizer); the second
# shares no word with it.
IDENTICAL = (
    ["A black dog runs along the beach.", "Two children fly\r\na red kite!", "an old truck parked near some trees"],
    [
        ["a black dog runs along the beach", "puppy sprinting across sand"],
        ["two children fly a red kite", "youngsters playing outdoors"],
        ["an old truck parked near some trees", "rusty vehicle beside forest"],
    ],
)
# No prediction shares a word with its references; one is empty and one is punctuation only (empty once tokenized).
DISJOINT = (
    ["purple elephants juggle", "", "?!..."],
    [
        ["a man rides a bicycle", "cyclist on a road"],
        ["two cats sleep on a sofa"],
        ["bowl of soup with bread", "hot meal served at lunch"],
    ],
)
# Hand-checked BLEU and ROUGE-L, derived in test_bleu_and_rouge_match_hand_computation.
HAND = (
    ["the cat sat on the mat", "a brown dog runs fast"],
    [
        ["the cat is on the mat", "there is a cat on the mat"],
        ["a brown dog runs fast on grass", "a brown dog is running on the grass"],
    ],
)
# One prediction equals its only reference; the other is empty (its closest reference length is then 4).
WITH_EMPTY = (
    ["a red kite flies high", ""],
    [["a red kite flies high"], ["two men play chess", "men playing chess indoors at night"]],
)
# Caption-like text with case, punctuation and string ids, as a COCO results file would give.
REALISTIC = (
    {
        "img-1": "A man riding a bike down a dirt road.",
        "img-2": "A woman is cutting a cake with a knife",
        "img-3": "Two dogs playing with a frisbee in the park.",
        "img-4": "A plate of food with broccoli and rice",
        "img-5": "a train on the tracks",
    },
    {
        "img-1": ["A man rides a motorbike on a dirt road.", "Man on a motorcycle on a country road.", "A biker."],
        "img-2": ["A woman cuts a birthday cake.", "A lady slicing a cake with a large knife."],
        "img-3": ["Two dogs chase a frisbee on the grass.", "Dogs play in a park", "Two brown dogs running."],
        "img-4": ["A plate with rice, broccoli and chicken.", "Healthy dinner on a white plate."],
        "img-5": ["A red train travels along the tracks.", "A train pulling into a station.", "Train on rails"],
    },
)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Every corpus scored in one caption_metrics_session, since each METEOR start loads its tables for seconds."""
    import evaluate
    from pycocoevalcap.spice import get_stanford_models

    results = {}
    with caption_metrics_session():
        results["session_process"] = evaluation._session_meteor.meteor_p
        # An empty SPICE folder: SPICE must be skipped with its reason, never downloaded.
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(get_stanford_models, "SPICEDIR", str(tmp_path_factory.mktemp("spice")))
            results["identical"] = compute_caption_metrics(*IDENTICAL, spice=None)
        for name, corpus in (("disjoint", DISJOINT), ("hand", HAND), ("with_empty", WITH_EMPTY)):
            results[name] = compute_caption_metrics(*corpus, spice=False)
        results["realistic"] = compute_caption_metrics(*REALISTIC, spice=False)
        predictions, references = REALISTIC
        ids = list(predictions)
        module = evaluate.load(CAPTION_METRICS_PATH)
        results["evaluate"] = module.compute(
            predictions=[predictions[i] for i in ids], references=[references[i] for i in ids], spice=False
        )
        # CHAIR through the module, from a COCO instances file and from lists of objects.
        instances = tmp_path_factory.mktemp("instances") / "instances_val.json"
        instances.write_text(json.dumps({
            "images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1}, {"id": 2, "image_id": 8, "category_id": 2}],
            "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "person"}]}))
        chair_inputs = {"predictions": ["two dogs and a cat", "a man"], "references": [["a dog"], ["a woman"]],
                        "spice": False}
        results["evaluate_chair"] = module.compute(**chair_inputs, instances=str(instances), image_ids=["a.jpg", 8])
        results["evaluate_objects"] = module.compute(**chair_inputs, objects=[["dog"], ["person"]],
                                                     object_categories=["dog", "cat", "person"])
    return results


# ----- compute_caption_metrics: known scores -----------------------------------------------------------------------


@needs_java
def test_identical_captions_score_maximal(scored):
    metrics = scored["identical"]
    # Every n-gram of each prediction is in its identical reference, whose length (the closest) equals the
    # prediction's: all modified precisions are 1 and the brevity penalty is 1 (pycocoevalcap's 1e-9 smoothing aside).
    for n in range(1, 5):
        assert metrics[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-6)
    # ROUGE-L takes the best precision and recall over references: the identical one gives LCS = length, so 1 and 1.
    assert metrics["ROUGE-L"] == pytest.approx(100.0)
    # METEOR 1.5 gives an exact match no fragmentation penalty, and such segments add no chunks to the corpus
    # statistics (MeteorStats.addStats), so the corpus score is Fmean = 1.
    assert metrics["METEOR"] == pytest.approx(100.0)
    # CIDEr-D per image: 10 * mean over references of mean over n = 1..4 of the clipped tf-idf cosine. The identical
    # reference gives cosine 1 for every n (no length penalty: same length), the disjoint one 0: 10 * (1 + 0) / 2 = 5.
    assert metrics["CIDEr-D"] == pytest.approx(500.0)
    assert metrics["num_images"] == 3
    assert metrics["num_references"] == 6


@needs_java
def test_disjoint_and_empty_predictions_score_zero(scored):
    metrics = scored["disjoint"]
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"):
        assert metrics[name] == pytest.approx(0.0, abs=1e-6), name
    assert (metrics["num_images"], metrics["num_references"]) == (3, 5)


@needs_java
def test_bleu_and_rouge_match_hand_computation(scored):
    metrics = scored["hand"]
    # Image 1, "the cat sat on the mat" (6 words) against "the cat is on the mat" / "there is a cat on the mat":
    #   1-grams: the x2 (clipped at 2), cat, on, mat match, sat does not: 5 / 6
    #   2-grams: the cat, on the, the mat match; cat sat, sat on do not: 3 / 5
    #   3-grams: only "on the mat": 1 / 4;  4-grams: none: 0 / 3
    #   closest reference length to 6: 6
    # Image 2, "a brown dog runs fast" (5 words) is a prefix of "a brown dog runs fast on grass":
    #   all n-grams match: 5 / 5, 4 / 4, 3 / 3, 2 / 2; closest reference length to 5: 7 (the other has 8)
    # Corpus BLEU sums the counts before dividing: p1 = 10/11, p2 = 7/9, p3 = 4/7, p4 = 2/5, and with 11 predicted
    # words against 13 reference words the brevity penalty is exp(1 - 13/11). BLEU-n = BP * (p1 ... pn)^(1/n).
    precisions = [10 / 11, 7 / 9, 4 / 7, 2 / 5]
    brevity_penalty = math.exp(1 - 13 / 11)
    for n in range(1, 5):
        expected = 100 * brevity_penalty * math.prod(precisions[:n]) ** (1 / n)
        assert metrics[f"BLEU-{n}"] == pytest.approx(expected, rel=1e-6), n
    # Sentence-level BLEU-4 averaged over images would be 0 here (image 1 has no matching 4-gram).
    assert metrics["BLEU-4"] > 10

    # ROUGE-L (beta = 1.2) takes the best LCS precision and the best LCS recall over references, then their F-score.
    # Image 1: LCS with reference 1 is "the cat on the mat" (5): P = R = 5/6, so F = 5/6.
    # Image 2: reference 1 has LCS 5: P = 5/5, R = 5/7 (reference 2: LCS "a brown dog", P = 3/5, R = 3/8).
    def f_score(precision, recall, beta=1.2):
        return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)

    expected_rouge = 100 * (f_score(5 / 6, 5 / 6) + f_score(1.0, 5 / 7)) / 2
    assert metrics["ROUGE-L"] == pytest.approx(expected_rouge, rel=1e-9)


@needs_java
def test_empty_prediction_counts_in_brevity_penalty_and_means(scored):
    metrics = scored["with_empty"]
    # Predicted words 5 + 0; reference length 5 (identical) + 4 (closest to 0 of 4 and 6): BP = exp(1 - 9/5), and
    # every predicted n-gram matches. Dropping the empty caption would give 100.
    for n in range(1, 5):
        assert metrics[f"BLEU-{n}"] == pytest.approx(100 * math.exp(1 - 9 / 5), rel=1e-6)
    # Means over both images: (100 + 0) / 2; CIDEr-D (10 * 1 + 0) / 2 with the single identical reference.
    assert metrics["ROUGE-L"] == pytest.approx(50.0)
    assert metrics["CIDEr-D"] == pytest.approx(500.0)
    assert 0 < metrics["METEOR"] < 100


# ----- compute_caption_metrics: agreement with pycocoevalcap and evaluate ------------------------------------------


@needs_java
def test_metrics_equal_pycocoevalcap_called_directly(scored):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    predictions, references = REALISTIC
    # As pycocoevalcap's COCOEvalCap does it: tokenize references and results separately, score on the tokens.
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in refs] for i, refs in references.items()})
    res = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    try:
        meteor_score, _ = meteor.compute_score(gts, res)
    finally:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.wait(timeout=30)
    expected = {f"BLEU-{n}": bleu[n - 1] for n in range(1, 5)}
    expected["METEOR"] = meteor_score
    expected["ROUGE-L"] = Rouge().compute_score(gts, res)[0]
    expected["CIDEr-D"] = Cider().compute_score(gts, res)[0]

    metrics = scored["realistic"]
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(100 * value, rel=1e-12), name
    assert (metrics["num_images"], metrics["num_references"]) == (5, 13)
    # Not a degenerate agreement: these captions overlap their references only partly.
    assert 10 < metrics["BLEU-1"] < 95 and 0 < metrics["CIDEr-D"]


@needs_java
def test_evaluate_module_gives_compute_caption_metrics_numbers(scored):
    chair = {key: scored["evaluate"].pop(key) for key in ("CHAIR-i", "CHAIR-s", "object_mentions", "CHAIR_skipped")}
    assert scored["evaluate"] == scored["realistic"]
    assert chair["CHAIR-s"] is None and "pass `instances` and `image_ids`" in chair["CHAIR_skipped"]


@needs_java
def test_evaluate_module_reports_chair_from_instances_or_objects(scored):
    # "two dogs and a cat": dog there, cat not there (and, in the instances file, not a category at all, so not an
    # object word); "a man" is the person there (the paper's synonym).
    from_file = scored["evaluate_chair"]
    assert (from_file["CHAIR-i"], from_file["CHAIR-s"], from_file["object_mentions"]) == (0.0, 0.0, 2)
    from_objects = scored["evaluate_objects"]
    assert from_objects["CHAIR-i"] == pytest.approx(100 / 3) and from_objects["CHAIR-s"] == 50.0
    assert from_objects["object_mentions"] == 3


@needs_java
def test_meteor_process_ends_after_each_call_and_session(scored, monkeypatch):
    from pycocoevalcap.meteor import meteor as meteor_module

    started = []

    class RecordingMeteor(meteor_module.Meteor):
        def __init__(self):
            super().__init__()
            started.append(self.meteor_p)

    monkeypatch.setattr(meteor_module, "Meteor", RecordingMeteor)
    assert evaluation._session_meteor is None
    metrics = compute_caption_metrics(*HAND, spice=False)
    assert len(started) == 1
    # Ended by closing its stdin (exit status 0), not left for pycocoevalcap's __del__.
    assert started[0].poll() == 0
    assert scored["session_process"].poll() == 0
    # A session shares one process between calls without changing any number.
    assert metrics == scored["hand"]


@needs_java
def test_dead_meteor_process_raises_instead_of_hanging():
    gts, res = {0: ["a dog runs"]}, {0: ["a dog"]}
    with evaluation._meteor_scorer() as scorer:
        scorer.meteor_p.kill()
        scorer.meteor_p.wait()
        with pytest.raises(RuntimeError, match="METEOR's Java process .* stopped"):
            evaluation._meteor_score(scorer, gts, res)
    # pycocoevalcap's compute_score left its lock held; garbage collection (Meteor.__del__) must not block on it.
    lock_is_free = scorer.lock.acquire(blocking=False)
    scorer.lock.release()  # either way, so that a regression fails here rather than hanging in Meteor.__del__
    assert lock_is_free


# ----- compute_caption_metrics: inputs and environment -------------------------------------------------------------


@pytest.mark.parametrize(
    "predictions, references, message",
    [
        ({"a": "x", "b": "y"}, {"a": ["x"]}, r"no references for \['b'\]"),
        ({"a": "x"}, {"a": ["x"], "c": ["z"]}, r"no prediction for \['c'\]"),
        (["x", "y", "z"], [["x"], ["y"]], "3 captions but `references` has 2"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "b": []}, "image 'b' are an empty list"),
        ({"a": "x", "b": None}, {"a": ["x"], "b": ["y"]}, "prediction for image 'b' must be a string"),
        ({"a": "x", "b": "y"}, {"a": ["x"], "b": ["y", 3]}, "Reference 1 of image 'b' must be a string"),
        (["x", "y"], [["x"], "y"], "references for image 1 must be a list of strings.*wrap"),
        ({"a": "x"}, [["x"]], "pass both as dicts"),
        ([], [], "empty"),
    ],
)
def test_malformed_inputs_raise_naming_the_image(predictions, references, message):
    with pytest.raises(ValueError, match=message):
        compute_caption_metrics(predictions, references, spice=False)


@needs_java
def test_reference_without_words_raises_naming_the_image():
    with pytest.raises(ValueError, match=r"Reference 1 of image 'b' \('\.\.\.'\) has no words"):
        compute_caption_metrics({"a": "a dog", "b": "a cat"}, {"a": ["a dog"], "b": ["a cat", "..."]}, spice=False)


def test_missing_java_is_explained(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="no `java` is on PATH.*apt-get install openjdk-17-jre-headless"):
        compute_caption_metrics(["a dog"], [["a dog"]], spice=False)


def test_required_spice_without_corenlp_raises_without_downloading(monkeypatch, tmp_path):
    from pycocoevalcap.spice import get_stanford_models

    monkeypatch.setattr(get_stanford_models, "SPICEDIR", str(tmp_path))
    # A download attempt would fail loudly instead of reaching the network.
    monkeypatch.setattr(get_stanford_models, "urlretrieve", lambda *args, **kwargs: pytest.fail("tried to download"))
    with pytest.raises(RuntimeError, match="SPICE skipped: Stanford CoreNLP .*get_stanford_models"):
        compute_caption_metrics(["a dog"], [["a dog"]], spice=True)


@needs_java
def test_spice_is_skipped_with_a_one_line_reason(scored):
    metrics = scored["identical"]
    assert "SPICE" not in metrics
    assert metrics["SPICE_skipped"].startswith("SPICE skipped: Stanford CoreNLP")
    assert "\n" not in metrics["SPICE_skipped"]
    assert "SPICE_skipped" not in scored["hand"]  # spice=False: neither score nor reason


# ----- caption_statistics ------------------------------------------------------------------------------------------


def test_caption_statistics_on_crafted_captions():
    captions = [
        "A dog runs on the beach.",  # the same words as the next caption
        "a dog runs on the beach",
        "A man on top of a hill on top of a hill",  # "on top of" twice: repeats
        "the the the end",  # one word three times in a row: repeats
        "",
        "on the on the grass",  # "on the" twice back to back: repeats
        "a man on a board on a wave",  # "on a" twice but apart: normal English, does not repeat
    ]
    stats = caption_statistics(captions)
    assert stats["num_captions"] == 7
    # a dog runs on the beach man top of hill end grass board wave
    assert stats["vocabulary_size"] == 14
    assert stats["distinct_captions_pct"] == pytest.approx(100 * 6 / 7)
    assert stats["mean_length_words"] == pytest.approx((6 + 6 + 12 + 4 + 0 + 5 + 8) / 7)
    assert stats["empty_captions_pct"] == pytest.approx(100 * 1 / 7)
    assert stats["repeating_captions_pct"] == pytest.approx(100 * 3 / 7)


@pytest.mark.parametrize(
    "caption, expected",
    [("a a a", True), ("a a", False), ("a dog a dog", True), ("a dog and a cat", False), ("x y z q x y z", True)],
)
def test_repeats_phrase(caption, expected):
    assert repeats_phrase(caption.split()) is expected


def test_caption_statistics_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        caption_statistics([])
    with pytest.raises(ValueError, match="Caption 1 must be a string"):
        caption_statistics(["a dog", None])


# ----- perplexity --------------------------------------------------------------------------------------------------


def make_batch(processor, captions, seed):
    return dict(processor(images=random_images(len(captions), seed=seed), suffix=captions))


def label_tokens(batch):
    return int((batch["labels"][:, 1:] != -100).sum())


def test_perplexity_of_one_batch_is_exp_of_model_loss(processor):
    model = tiny_model()
    # Different lengths, so the batch has padding that must not be scored.
    batch = make_batch(processor, ["a dog", "a cat sleeps on a red sofa in the sun", "two birds"], seed=1)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    result = perplexity(model, [batch])
    assert result["num_tokens"] == label_tokens(batch)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_weights_batches_by_tokens(processor):
    model = tiny_model()
    short = make_batch(processor, ["a dog"], seed=2)
    long = make_batch(processor, ["a man rides a horse across a wide green field", "people walk on a busy street"], 3)
    with torch.no_grad():
        short_loss, long_loss = model(**short).loss.item(), model(**long).loss.item()
    short_tokens, long_tokens = label_tokens(short), label_tokens(long)
    expected = (short_loss * short_tokens + long_loss * long_tokens) / (short_tokens + long_tokens)
    # The batch-mean would differ: the test can tell the two apart.
    assert abs(expected - (short_loss + long_loss) / 2) > 1e-3

    result = perplexity(model, [short, long])
    assert result["num_tokens"] == short_tokens + long_tokens
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)


def test_perplexity_runs_in_eval_mode_and_restores_training(processor):
    model = tiny_model()
    assert model.config.text_config.resid_pdrop > 0  # in train mode dropout would make the loss random
    batch = make_batch(processor, ["a dog runs on the beach", "a cat"], seed=4)
    with torch.no_grad():
        eval_loss = model(**batch).loss.item()
    model.train()
    first, second = perplexity(model, [batch]), perplexity(model, [batch])
    assert model.training
    assert first == second
    assert first["loss"] == pytest.approx(eval_loss, rel=1e-5)


def test_perplexity_without_label_tokens_raises(processor):
    batch = make_batch(processor, ["a dog"], seed=5)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    with pytest.raises(ValueError, match="no label tokens"):
        perplexity(tiny_model(), [batch])


# ----- format_metrics_table ----------------------------------------------------------------------------------------


def test_format_metrics_table():
    rows = {
        "vision-gpt": {"BLEU-4": 31.04, "CIDEr-D": np.float64(101.26), "num_images": np.int64(5000),
                       "SPICE_skipped": "SPICE skipped: no CoreNLP."},
        "baseline": {"BLEU-4": 27.5, "CIDEr-D": 88.0, "SPICE": 20.05, "num_images": 5000},
    }
    assert format_metrics_table(rows) == "\n".join(
        [
            "| metric | vision-gpt | baseline |",
            "|---|---:|---:|",
            "| BLEU-4 | 31.0 | 27.5 |",
            "| CIDEr-D | 101.3 | 88.0 |",
            "| num_images | 5000 | 5000 |",
            "| SPICE | - | 20.1 |",
            "",
            "- vision-gpt: SPICE skipped: no CoreNLP.",
        ]
    )
