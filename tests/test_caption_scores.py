"""Trust scores for captions: `score_captions`, and `generate(..., output_caption_scores=True)`."""

import pytest
import torch

from .conftest import random_images, tiny_model

FUSIONS = ["prefix", "cross_attention"]
CAPTIONS = ["a dog runs", "two red squares on a black background", "a", "the cat sleeps on a sofa by the window"]


@pytest.fixture(scope="module")
def images():
    return random_images(4, seed=5)


def rows_for(sequences, prompt_length, eos):
    """score_captions' labels for generated sequences: their new tokens up to and including the first end token."""
    labels = sequences.clone()
    labels[:, :prompt_length] = -100
    for row in labels:
        ends = (row[prompt_length:] == eos).nonzero()
        if len(ends):
            row[prompt_length + int(ends[0]) + 1:] = -100
    return labels


@pytest.mark.parametrize("fusion", FUSIONS)
def test_scores_are_probabilities_and_log_ratios(fusion, processor, images):
    model = tiny_model(fusion=fusion)
    scores = model.score_captions(**processor(images=images, suffix=CAPTIONS))
    assert scores.confidence.shape == scores.grounding.shape == (4,)
    assert bool(((scores.confidence > 0) & (scores.confidence <= 1)).all())
    tokens = [len(processor.tokenizer(caption)["input_ids"]) + 1 for caption in CAPTIONS]  # the caption, its end
    assert scores.num_tokens.tolist() == tokens
    torch.testing.assert_close(scores.confidence, (scores.log_prob / scores.num_tokens).exp())
    torch.testing.assert_close(scores.grounding, (scores.log_prob - scores.log_prob_without_image) / scores.num_tokens)
    # The images move the scores (a decoder that ignored them would give grounding 0 everywhere).
    assert scores.grounding.abs().max() > 1e-3


@pytest.mark.parametrize("fusion", FUSIONS)
def test_no_image_is_the_null_image_and_grounds_nothing(fusion, processor, images):
    model = tiny_model(fusion=fusion)
    batch = processor(images=images, suffix=CAPTIONS)
    null = model.null_image_embeds(len(CAPTIONS))
    scores = model.score_captions(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"], image_embeds=null)
    assert scores.grounding.abs().max() == 0
    blank = model.get_image_features(pixel_values=torch.zeros_like(batch["pixel_values"][:1])).pooler_output
    torch.testing.assert_close(model.null_image_embeds(1), blank)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_a_captions_scores_do_not_depend_on_its_batch_or_padding(fusion, padding_side, processor, images):
    model = tiny_model(fusion=fusion)
    batched = model.score_captions(**processor(images=images, suffix=CAPTIONS, padding_side=padding_side))
    for index, (image, caption) in enumerate(zip(images, CAPTIONS)):
        alone = model.score_captions(**processor(images=[image], suffix=[caption]))
        for name in ("confidence", "grounding", "log_prob", "log_prob_without_image"):
            torch.testing.assert_close(getattr(batched, name)[index], getattr(alone, name)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("decoding", [dict(num_beams=1), dict(num_beams=3, num_return_sequences=2),
                                      dict(do_sample=True, num_beams=1, num_return_sequences=2, top_k=20)])
def test_generate_returns_the_scores_that_score_captions_gives_its_sequences(fusion, decoding, processor, images):
    model = tiny_model(fusion=fusion)
    inputs = processor(images=images)
    torch.manual_seed(0)
    output = model.generate(**inputs, max_new_tokens=6, output_caption_scores=True, **decoding)
    copies = output.sequences.shape[0] // len(images)
    labels = rows_for(output.sequences, 1, model.generation_config.eos_token_id)
    again = model.score_captions(pixel_values=inputs["pixel_values"].repeat_interleave(copies, dim=0),
                                 input_ids=output.sequences, attention_mask=torch.ones_like(output.sequences),
                                 labels=labels)
    for name in ("confidence", "grounding", "num_tokens"):
        torch.testing.assert_close(getattr(output.caption_scores, name), getattr(again, name), atol=1e-5, rtol=1e-5)


def test_the_end_token_counts_only_where_the_model_generated_it(processor, images):
    model = tiny_model()
    eos = model.generation_config.eos_token_id
    inputs = processor(images=images)
    output = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, num_beams=1, output_caption_scores=True)
    ended = (output.sequences[:, 1:] == eos).any(-1)
    assert not bool(ended.any())  # min_new_tokens: no row could end
    assert output.caption_scores.num_tokens.tolist() == [3] * len(images)
    # Forcing the end token first: the one scored token is that end token.
    output = model.generate(**inputs, max_new_tokens=3, num_beams=1, output_caption_scores=True,
                            begin_suppress_tokens=None, forced_bos_token_id=eos)
    assert output.caption_scores.num_tokens.tolist() == [1] * len(images)


def test_prompted_generation_scores_only_the_new_tokens(processor, images):
    model = tiny_model(fusion="cross_attention")
    inputs = processor(images=images[:2], text=["a photo of", "two"])
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, num_beams=1, output_caption_scores=True)
    assert output.caption_scores.num_tokens.tolist() == [4, 4]


def test_bad_input_is_named(processor, images):
    model = tiny_model()
    batch = processor(images=images[:2], suffix=CAPTIONS[:2])
    with pytest.raises(ValueError, match="suffix=captions"):
        model.score_captions(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"])
    with pytest.raises(ValueError, match="needs the images"):
        model.score_captions(input_ids=batch["input_ids"], labels=batch["labels"])
    with pytest.raises(ValueError, match="2 captions"):
        model.score_captions(pixel_values=processor(images=images[:3])["pixel_values"], input_ids=batch["input_ids"],
                             labels=batch["labels"])
    with pytest.raises(ValueError, match="needs the images"):
        model.generate(input_ids=batch["input_ids"][:, :1], output_caption_scores=True, max_new_tokens=2)


# ----- the caption job's columns -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("scored-images")
    for index, image in enumerate(images):
        image.save(folder / f"img_{index}.png")
    (folder / "broken.jpg").write_bytes(b"not an image")
    return folder


def read_jsonl(path):
    import json

    return {row["image"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize("max_new_tokens", [3, 12])
def test_each_rows_scores_are_those_of_the_text_it_holds(tiny_model_dir, processor, image_folder, tmp_path,
                                                         max_new_tokens):
    from PIL import Image

    from vision_gpt.cli import main
    from vision_gpt.inference.trust import score_texts
    from vision_gpt.modeling import VisionGPTForConditionalGeneration

    output = tmp_path / "rows.jsonl"
    assert main(["caption", str(image_folder), "--model", str(tiny_model_dir), "--output", str(output),
                 "--num-beams", "1", "--max-new-tokens", str(max_new_tokens), "--num-workers", "0"]) == 1  # broken
    rows = read_jsonl(output)
    bad = rows.pop(str(image_folder / "broken.jpg"))
    assert bad["error"] and bad["confidence"] is None and bad["grounding"] is None
    model = VisionGPTForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    keys = sorted(rows)
    pixel_values = processor(images=[Image.open(key).convert("RGB") for key in keys])["pixel_values"]
    again = score_texts(model, processor, pixel_values, [rows[key]["caption"] for key in keys],
                        [rows[key]["truncated"] for key in keys])
    for index, key in enumerate(keys):
        assert rows[key]["confidence"] == pytest.approx(float(again.confidence[index]), abs=1e-4)
        assert rows[key]["grounding"] == pytest.approx(float(again.grounding[index]), abs=1e-4)
    # This random model never writes its end token within these lengths: every caption is cut, and scored so.
    assert all(rows[key]["truncated"] for key in keys)


def test_review_below_marks_rows_and_drops_none(tiny_model_dir, image_folder, tmp_path):
    from vision_gpt.cli import main

    output = tmp_path / "rows.csv"
    assert main(["caption", str(image_folder), "--model", str(tiny_model_dir), "--output", str(output),
                 "--max-new-tokens", "4", "--num-captions", "2", "--num-beams", "2", "--review-below", "0.5",
                 "--num-workers", "0"]) == 1
    import csv

    rows = list(csv.DictReader(output.open()))
    assert len(rows) == 5  # four images and the broken file: nothing dropped
    header = list(rows[0])
    assert header[:8] == ["image", "caption", "caption_2", "confidence", "grounding", "truncated",
                          "confidence_2", "grounding_2"] and "needs_review" in header
    for row in rows:
        if row["error"]:
            assert row["needs_review"] == "" and row["confidence"] == ""
        else:
            assert row["needs_review"] == str(float(row["confidence"]) < 0.5)


def test_scores_can_be_left_out_and_bad_thresholds_are_named(tiny_model_dir, image_folder, tmp_path, capsys):
    from vision_gpt.cli import main

    output = tmp_path / "rows.jsonl"
    assert main(["caption", str(image_folder / "img_0.png"), "--model", str(tiny_model_dir), "--output", str(output),
                 "--max-new-tokens", "3", "--no-caption-scores", "--num-workers", "0"]) == 0
    row = next(iter(read_jsonl(output).values()))
    assert "confidence" not in row and "grounding" not in row
    assert main(["caption", str(image_folder), "--model", str(tiny_model_dir), "--review-below", "1.5"]) == 2
    assert "--review-below 1.5 is outside the range of confidence scores, [0, 1]" in capsys.readouterr().err
    assert main(["caption", str(image_folder), "--model", str(tiny_model_dir), "--review-below", "0.2",
                 "--no-caption-scores"]) == 2
    assert "--no-caption-scores turns off" in capsys.readouterr().err


def test_pipeline_returns_scores_when_asked(processor, images):
    from vision_gpt import VisionGPTImageToTextPipeline

    model = tiny_model(fusion="cross_attention")
    captioner = VisionGPTImageToTextPipeline(model=model, processor=processor)
    plain = captioner(images[:2], max_new_tokens=5, num_beams=1)
    scored = captioner(images[:2], max_new_tokens=5, num_beams=1, return_caption_scores=True, batch_size=2)
    assert [row[0]["generated_text"] for row in plain] == [row[0]["generated_text"] for row in scored]
    assert set(plain[0][0]) == {"generated_text"}
    inputs = processor(images=images[:2])
    expected = model.generate(**inputs, max_new_tokens=5, num_beams=1, output_caption_scores=True).caption_scores
    for index, row in enumerate(scored):
        assert row[0]["confidence"] == pytest.approx(float(expected.confidence[index]), abs=1e-5)
        assert row[0]["grounding"] == pytest.approx(float(expected.grounding[index]), abs=1e-5)


def test_thresholds_outside_the_range_are_named():
    from argparse import Namespace

    from vision_gpt.caption.workers import row_options

    with pytest.raises(ValueError, match=r"--review-below nan is outside"):
        row_options(Namespace(review_below=float("nan"), no_caption_scores=False, rerank=None))
    assert row_options(Namespace(review_below=0.3, no_caption_scores=False, rerank=None)).review_below == 0.3


# ----- --score-captions: existing captions, scored -------------------------------------------------------------------


def test_score_captions_reproduces_a_caption_runs_rows_and_keeps_every_row(tiny_model_dir, image_folder, tmp_path):
    from vision_gpt.cli import main

    captioned = tmp_path / "captions.jsonl"
    assert main(["caption", str(image_folder), "--model", str(tiny_model_dir), "--output", str(captioned),
                 "--max-new-tokens", "5", "--num-beams", "1", "--num-workers", "0"]) == 1
    scored = tmp_path / "scored.jsonl"
    # The caption run's own file, its error row included; decoding flags are accepted and change nothing.
    assert main(["caption", "--score-captions", str(captioned), "--model", str(tiny_model_dir), "--output",
                 str(scored), "--num-beams", "4", "--review-below", "0.5", "--num-workers", "0"]) == 1
    before, after = read_jsonl(captioned), read_jsonl(scored)
    assert sorted(before) == sorted(after)
    for key, row in after.items():
        assert list(row) == ["image", "caption", "confidence", "grounding", "truncated", "needs_review", "error",
                             "model", "dtype"]
        if before[key]["error"]:
            assert row["error"] and row["confidence"] is None and row["needs_review"] is None
        else:
            assert row["confidence"] == pytest.approx(before[key]["confidence"], abs=1e-4)
            assert row["grounding"] == pytest.approx(before[key]["grounding"], abs=1e-4)
            assert row["needs_review"] == (row["confidence"] < 0.5)


def test_score_captions_reads_csv_limits_to_given_images_and_names_bad_files(tiny_model_dir, image_folder, tmp_path,
                                                                              capsys):
    from vision_gpt.cli import main

    table = tmp_path / "alt.csv"
    table.write_text("image,caption\n"
                     f"{image_folder / 'img_0.png'},a red square\n"
                     f"{image_folder / 'img_1.png'},two dogs on a beach\n"
                     f"{tmp_path / 'gone.png'},a missing picture\n")
    scored = tmp_path / "scored.csv"
    assert main(["caption", "--score-captions", str(table), str(image_folder / "img_1.png"), "--model",
                 str(tiny_model_dir), "--output", str(scored), "--num-workers", "0"]) == 0
    import csv

    rows = list(csv.DictReader(scored.open()))
    assert [row["image"] for row in rows] == [str(image_folder / "img_1.png")]
    assert rows[0]["caption"] == "two dogs on a beach" and 0 < float(rows[0]["confidence"]) <= 1
    # A listed image that is not there is an error row, not a crash.
    assert main(["caption", "--score-captions", str(table), "--model", str(tiny_model_dir), "--output",
                 str(tmp_path / "all.jsonl"), "--num-workers", "0"]) == 1
    assert "gone.png" in read_jsonl(tmp_path / "all.jsonl")[str(tmp_path / "gone.png")]["error"]
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg", "caption": "a dog"}\n{"image": "b.jpg"}\n')
    assert main(["caption", "--score-captions", str(bad), "--model", str(tiny_model_dir)]) == 2
    assert f"{bad} line 2: 'caption' is missing" in capsys.readouterr().err
    bad.write_text('{"image": "a.jpg", "caption": "a dog"}\n{"image": "./a.jpg", "caption": "a cat"}\n')
    assert main(["caption", "--score-captions", str(bad), "--model", str(tiny_model_dir)]) == 2
    assert "lines 1 and 2 both name the image 'a.jpg'" in capsys.readouterr().err
    assert main(["caption", "--score-captions", str(table), "--model", str(tiny_model_dir), "--engine", "ray"]) == 2
    assert "cannot be combined with --engine ray" in capsys.readouterr().err


def test_rerank_keeps_the_candidate_with_the_best_score(tiny_model_dir, processor, image_folder, tmp_path, capsys):
    from PIL import Image

    from vision_gpt.cli import main
    from vision_gpt.inference.generation import one_line
    from vision_gpt.inference.trust import caption_trust, rerank_value
    from vision_gpt.modeling import VisionGPTForConditionalGeneration

    output = tmp_path / "reranked.jsonl"
    assert main(["caption", str(image_folder / "img_0.png"), str(image_folder / "img_1.png"), "--model",
                 str(tiny_model_dir), "--output", str(output), "--num-beams", "3", "--max-new-tokens", "5",
                 "--rerank", "combined", "--num-workers", "0"]) == 0
    rows = read_jsonl(output)
    model = VisionGPTForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    for key, row in rows.items():
        pixel_values = processor(images=[Image.open(key).convert("RGB")])["pixel_values"]
        beams = model.generate(pixel_values=pixel_values, num_beams=3, num_return_sequences=3, max_new_tokens=5,
                               output_caption_scores=True)
        texts = [one_line(text) for text in processor.batch_decode(beams.sequences)]
        trust = caption_trust(model, processor, pixel_values, beams, texts)
        best = max(range(3), key=lambda index: rerank_value(trust[index], "combined"))
        assert row["caption"] == texts[best] and row["rerank"] == "combined"
        assert row["confidence"] == pytest.approx(trust[best]["confidence"], abs=1e-4)
    assert main(["caption", str(image_folder / "img_0.png"), "--model", str(tiny_model_dir), "--num-beams", "1",
                 "--rerank", "grounding"]) == 2
    assert "--rerank grounding chooses among candidates" in capsys.readouterr().err


def test_rerank_of_samples_keeps_the_best_of_num_candidates(tiny_model_dir, image_folder, tmp_path, capsys):
    from vision_gpt.cli import main

    images = [str(image_folder / "img_0.png"), str(image_folder / "img_1.png")]
    common = ["--model", str(tiny_model_dir), "--do-sample", "--num-beams", "1", "--seed", "7", "--max-new-tokens", "5",
              "--num-workers", "0", "--rerank", "confidence", "--num-candidates", "4"]
    all_four, best = tmp_path / "all.jsonl", tmp_path / "best.jsonl"
    assert main(["caption", *images, *common, "--num-captions", "4", "--output", str(all_four)]) == 0
    assert main(["caption", *images, *common, "--output", str(best)]) == 0
    for key, row in read_jsonl(best).items():
        ranked = read_jsonl(all_four)[key]
        # The same seeded samples: one run keeps all four, best first; the other keeps the best one.
        assert ranked["confidences"] == sorted(ranked["confidences"], reverse=True)
        assert row["caption"] == ranked["captions"][0] and row["rerank"] == "confidence"
    for extra, message in ((["--num-candidates", "2", "--num-captions", "3"], "--num-candidates 2 is fewer than"),
                           (["--num-beams", "3", "--no-do-sample", "--num-candidates", "3"], "--num-candidates counts"),
                           ):
        assert main(["caption", images[0], *common[:-2], *extra]) == 2
        assert message in capsys.readouterr().err
    assert main(["caption", images[0], "--model", str(tiny_model_dir), "--num-candidates", "3"]) == 2
    assert "--num-candidates is how many samples --rerank chooses from" in capsys.readouterr().err
