"""Train a captioner with `Trainer`: `accelerate launch scripts/train.py [flags | config.yaml | config.json]`.

Arguments are three `HfArgumentParser` dataclasses: `ModelArguments`, `DataArguments` and transformers'
`TrainingArguments` (as `CaptionTrainingArguments`, with captioning defaults). Multi-GPU, FSDP and DeepSpeed come from
Accelerate; this module only builds the model and data, runs `Trainer`, and exports the result as Hub-ready repos.
"""

import json
import logging
import os
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch
import transformers
from transformers import EarlyStoppingCallback, set_seed

from ..assembly.dinov2_port import ported_tower_description, ported_tower_license
from ..data.factory import load_captioning_dataset
from ..data.records import DataReport
from ..data.shard_splits import SHARD_DATASETS, describe_shards, resolve_data_files, shard_image_ids, shard_images
from ..data.torch_datasets import CaptionCollator, CaptionPairDataset, StreamingCaptionDataset
from ..export.model_card import declared_license
from ..export.repo import export_repo
from . import lora
from .arguments import (
    CAPTION_METRIC_KEYS,
    NonFiniteLossError,
    build_model_and_processor,
    build_model_config,
    emulated_bf16_warning,
    parse_arguments,
)
from .checkpoints import resolve_resume
from .feature_cache import FeatureCache
from .trainer import CaptionTrainer, PlotCallback, StagedUnfreezingCallback, stage_for_epoch

logger = logging.getLogger("vision_gpt.training")


def _setup_logging(training_args) -> None:
    """The console shows this package's progress lines (on the main process) and, from transformers, what
    `--log-level` asks for: warnings by default, as transformers' own example scripts do. `OUTPUT_DIR/train.log` keeps
    everything at INFO, transformers' lines (configs, the Trainer's) included."""
    console_level = training_args.get_process_log_level()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = logging.StreamHandler()
    console.setFormatter(formatter)
    ours = logging.INFO if training_args.should_log else logging.WARNING
    console.addFilter(lambda record: record.levelno >= (ours if record.name.startswith("vision_gpt") else console_level))
    handlers = [console]
    if training_args.process_index == 0:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        log_file = logging.FileHandler(Path(training_args.output_dir) / "train.log")
        log_file.setFormatter(formatter)
        handlers.append(log_file)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True)
    _log_everything()


def _log_everything() -> None:
    """transformers at INFO, propagated to our handlers (whose console filter keeps it quiet). Again after `Trainer`
    is built: its constructor sets transformers' verbosity to the console's level."""
    import transformers

    transformers.utils.logging.set_verbosity(logging.INFO)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


def _training_description(model_args, data_args, training_args, model, num_pairs) -> str:
    """`num_pairs` is None for streamed shards (their size is not known)."""
    summary = model.parameter_summary()["total"]
    precision = "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32"
    if num_pairs is None:
        data = (f"{data_args.dataset} shards {', '.join(data_args.data_files)} (streamed, every reference caption a "
                f"training example), {training_args.max_steps} steps")
    else:
        data = (f"{data_args.dataset} ({num_pairs} image-caption pairs, every reference caption a training example), "
                f"{training_args.num_train_epochs:g} epochs"
                + (f" (max {training_args.max_steps} steps)" if training_args.max_steps > 0 else ""))
    lines = [
        f"Trained with `vision_gpt.training` on {data}"
        + f", learning rate {training_args.learning_rate:g}, batch size "
        f"{training_args.per_device_train_batch_size} x {training_args.world_size} process(es) x "
        f"{training_args.gradient_accumulation_steps} accumulation, {precision}.",
        f"Trainable parameters at the end: {summary['trainable']:,} of {summary['total']:,}.",
    ]
    if model_args.unfreeze_text_epoch is not None or model_args.unfreeze_vision_epoch is not None:
        lines.append(f"Staged unfreezing: GPT-2 from epoch {model_args.unfreeze_text_epoch}, everything from epoch "
                     f"{model_args.unfreeze_vision_epoch}.")
    if model_args.lora_r:
        where = "decoder and vision tower" if model_args.lora_vision else "decoder"
        lines.append(f"LoRA adapters (rank {model_args.lora_r}, alpha {model_args.lora_alpha:g}) trained on the "
                     f"{where}, merged into this repo's weights.")
    config = {"model": asdict(model_args), "data": asdict(data_args)}
    lines.append("\nTraining configuration:\n\n```json\n" + json.dumps(config, indent=2) + "\n```")
    return "\n".join(lines)


def _compute_description(training_args, runtime: float) -> str:
    import platform

    from ..inference.hardware import cpu_name

    if torch.cuda.is_available():
        device = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        device = f"{cpu_name()} ({os.cpu_count()} cores)"
    return (f"{runtime / 60:.1f} minutes of training on {device}, {training_args.world_size} process(es); "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
            f"{platform.python_version()}.")


def main(argv=None, **parser_kwargs) -> dict:
    """Train and export; returns the training and final validation metrics. `argv` as on the command line (or one
    JSON/YAML config file); `parser_kwargs` go to the argument parser (`vision-gpt train` passes its name and help).

    The run, step by step: check the arguments and the checkpoint to resume from (before anything slow), build the
    model (with LoRA adapters when asked), read the data, fill the vision feature cache, set up staged unfreezing,
    train, then export the repos and push them."""
    model_args, data_args, training_args = parse_arguments(argv, **parser_kwargs)
    _setup_logging(training_args)
    warning = emulated_bf16_warning(training_args)
    if warning and training_args.process_index == 0:
        logger.warning("%s", warning)
    try:
        build_model_config(model_args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None
    resume = _checkpoint_to_resume(model_args, training_args)
    bertscorer = _bertscorer(data_args, training_args)
    push = training_args.push_to_hub
    # Our export writes the repo and pushes it; Trainer's own push would create the repo at start-up.
    training_args.push_to_hub = False

    # Seeded before the model exists: its mapper (and any cross-attention) starts from random weights.
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(model_args)
    _add_adapters(model, model_args)
    logger.info("Trainable parameters: %s.", "; ".join(
        f"{part} {counts['trainable']:,} of {counts['total']:,}" for part, counts in model.parameter_summary().items()))
    data = _read_data(data_args, training_args, processor)
    cache = _feature_cache(model, processor, model_args, data_args, training_args, data)
    train_dataset, eval_dataset = _datasets(processor, training_args, data, cache)
    later_trainable = _later_trainable(model, model_args)

    callbacks = [StagedUnfreezingCallback(model_args), PlotCallback()]
    if data_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))
    caption_images = data.eval_images[: data_args.caption_metrics_images] if data_args.caption_metrics else None
    trainer = CaptionTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=CaptionCollator(processor, data_args.max_caption_length), processing_class=processor,
        callbacks=callbacks, later_trainable=later_trainable, caption_images=caption_images, data_args=data_args,
        bertscorer=bertscorer,
    )
    _log_everything()

    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        raise SystemExit(f"error: {error}") from None
    if data.streaming and training_args.dataloader_num_workers == 0:
        # With workers, each logs its own passes; read in this process, the pass in progress is reported here.
        logger.info("Streamed training data, the pass in progress at the end:\n%s",
                    "\n".join(train_dataset.report.problems()))
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    if metrics:
        trainer.log_metrics("eval", metrics)
    if trainer.is_world_process_zero():
        _export_and_push(trainer, processor, model_args, data_args, training_args, data, metrics,
                         result.metrics.get("train_runtime", 0), len(caption_images or data.eval_images), push)
    trainer.accelerator.wait_for_everyone()
    return {**result.metrics, **metrics}


def _checkpoint_to_resume(model_args, training_args) -> str | None:
    """`--resume-from-checkpoint` resolved and checked before anything slow runs, so a bad resume fails at once."""
    resume = training_args.resume_from_checkpoint
    if resume is None:
        return None
    # DeepSpeed and FSDP keep optimizer state in their own layouts; only the files common to all are checked.
    sharded = bool(training_args.deepspeed or training_args.fsdp)
    try:
        resume, notes = resolve_resume(resume, training_args.output_dir, num_processes=training_args.world_size,
                                       optimizer_state=not (training_args.save_only_model or sharded))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if training_args.process_index == 0:
        for note in notes:
            logger.warning("%s", note)
    has_adapters = (Path(resume) / lora.CHECKPOINT_ADAPTERS).is_dir()
    if has_adapters != bool(model_args.lora_r):
        raise SystemExit(
            f"error: --resume_from_checkpoint {resume} was written by a run "
            f"{'with' if has_adapters else 'without'} LoRA adapters; resume it "
            f"{'with the same --lora_r and LoRA flags' if has_adapters else 'without --lora_r'}.")
    return resume


def _bertscorer(data_args, training_args):
    """The BERTScore model, loaded once at start-up, so that a bad one stops the run now and not at every evaluation."""
    if not (data_args.bertscore_model and data_args.caption_metrics):
        return None
    from ..evaluation.bertscore import BERTScorer, BERTScoreSettings

    try:
        bertscorer = BERTScorer(BERTScoreSettings(model=data_args.bertscore_model, layer=data_args.bertscore_layer,
                                                  idf=data_args.bertscore_idf, flag="--bertscore_model"),
                                device=str(training_args.device))
    except (ValueError, ImportError) as error:
        raise SystemExit(f"error: {error}") from None
    if training_args.process_index == 0:
        logger.info("%s", bertscorer.description)
    return bertscorer


def _add_adapters(model, model_args) -> None:
    if not model_args.lora_r:
        return
    settings = lora.LoraSettings(
        r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout or 0.0,
        vision=model_args.lora_vision,
        target_modules=tuple(model_args.lora_target_modules) if model_args.lora_target_modules else None,
    )
    try:
        lora.add_adapters(model, settings)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    logger.info("%s.", lora.describe(model, settings))


@dataclass
class TrainingData:
    """What the run reads: streamed shards (`train_shards`, `streaming`) or records (`train_images`), and the
    validation records."""

    streaming: bool
    eval_images: list
    train_images: list | None = None
    train_shards: list[str] | None = None
    stream: object = None  # the StreamingCaptionDataset over `train_shards`


def _read_data(data_args, training_args, processor) -> TrainingData:
    """The training and validation data, checked: shards are only opened (their samples are read as training goes),
    a dataset folder is read and checked whole."""
    columns = {"image_column": data_args.image_column, "caption_column": data_args.caption_column}
    try:
        if data_args.dataset in SHARD_DATASETS:
            shards = resolve_data_files(data_args.dataset, data_args.data_files)
            seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
            # Opens every shard, so a file that is not one stops the run here.
            stream = StreamingCaptionDataset(shards, processor.image_processor, seed=seed,
                                             shuffle_buffer_size=data_args.shuffle_buffer_size, **columns)
            first, skipped = stream.first_pair_or_problems()
            if first is None:
                raise ValueError(f"{describe_shards(shards)} hold no usable (image, caption) pair.\n"
                                 + "\n".join(skipped.problems()))
            data = TrainingData(streaming=True, eval_images=[], train_shards=shards, stream=stream)
            logger.info("Training data: %s, streamed.", describe_shards(shards))
        else:
            splits, report = load_captioning_dataset(data_args.dataset, data_args.data_dir, **columns)
            data = TrainingData(streaming=False, train_images=splits["train"][: data_args.max_train_images],
                                eval_images=splits.get("validation", [])[: data_args.max_eval_images])
            logger.info("%s", report.summary(splits))
        if data_args.eval_data_files:
            eval_splits, eval_report = load_captioning_dataset(None, data_files=data_args.eval_data_files,
                                                               split="validation",
                                                               max_images=data_args.max_eval_images,
                                                               files_flag="--eval_data_files", **columns)
            data.eval_images = eval_splits["validation"]
            logger.info("Validation data (--eval_data_files): %s", eval_report.summary(eval_splits))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    return data


def _feature_cache(model, processor, model_args, data_args, training_args, data: TrainingData):
    """The frozen vision tower's features on disk, computed once per image (None where the tower's features change
    during the run: it trains now, in a later stage, or carries adapters)."""
    vision_changes = model_args.unfreeze_vision_epoch is not None or model_args.lora_vision
    if not (data_args.feature_cache and model.config.freeze_vision and not vision_changes):
        if data_args.feature_cache:
            logger.info("Feature cache off: the vision tower trains (now or in a later stage), so its features "
                        "change.")
        return None
    cache = FeatureCache(data_args.feature_cache_dir, model, processor.image_processor)
    batch_size = training_args.per_device_eval_batch_size
    with training_args.main_process_first(desc="vision feature cache"):
        if not data.streaming:
            cache.build(data.train_images + data.eval_images, batch_size=batch_size)
            return cache
        # Listed first (tar headers, parquet id columns), so the cache file's shape is known; then the shards are
        # read once, front to back, and no more than a batch of images is held.
        listing = DataReport(source=describe_shards(data.train_shards))
        ids = shard_image_ids(data.train_shards, listing, data_args.image_column)
        images = shard_images(data.train_shards, listing, data_args.image_column)
        try:
            cache.build_from_stream(ids + [record.image_id for record in data.eval_images],
                                    chain(images, ((record.image_id, record.image) for record in data.eval_images)),
                                    batch_size=batch_size)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
    return cache


def _datasets(processor, training_args, data: TrainingData, cache):
    """(training dataset, validation dataset or None); without validation data, evaluation is turned off."""
    if data.streaming:
        data.stream.feature_cache = cache
        train_dataset = data.stream
    else:
        train_dataset = CaptionPairDataset(data.train_images, processor.image_processor, cache)
    eval_dataset = CaptionPairDataset(data.eval_images, processor.image_processor, cache) if data.eval_images else None
    if eval_dataset is None:
        training_args.eval_strategy = "no"
        training_args.load_best_model_at_end = False
    if data.streaming and training_args.process_index == 0:
        for name, what in (("save_strategy", "saves a checkpoint"), ("eval_strategy", "evaluates")):
            if getattr(training_args, name) == "epoch":
                logger.warning("--%s epoch with streamed shards %s only at the end: the whole run of --max_steps is "
                               "one epoch. Use --%s steps --%s N for more.", name, what, name,
                               name.replace("strategy", "steps"))
    return train_dataset, eval_dataset


def _later_trainable(model, model_args) -> list:
    """Staged unfreezing: the parameters a later stage unfreezes, which the optimizer must hold from the start."""
    if model_args.unfreeze_text_epoch is None and model_args.unfreeze_vision_epoch is None:
        return []
    final_stage = stage_for_epoch(model_args, 10**9)
    current = {id(p) for p in model.parameters() if p.requires_grad}
    model.set_frozen(vision=final_stage["vision"], text=final_stage["text"])
    later = [p for p in model.parameters() if p.requires_grad and id(p) not in current]
    model.set_frozen(vision=model_args.freeze_vision, text=model_args.freeze_text)
    return later


def _export_and_push(trainer, processor, model_args, data_args, training_args, data: TrainingData, metrics: dict,
                     runtime: float, num_scored: int, push: bool) -> None:
    """The trained model as FP32/FP16 repos with a model card (LoRA adapters merged, and saved apart when asked),
    the run's configuration, and the upload."""
    final = trainer.accelerator.unwrap_model(trainer.model)
    output_dir = Path(training_args.output_dir)
    if lora.has_adapters(final):
        if model_args.save_adapters:
            unmerged = output_dir / "unmerged"
            final.save_pretrained(unmerged, state_dict=lora.base_state_dict(final))
            processor.save_pretrained(unmerged)
            lora.save_adapters(final, output_dir / "adapters", str(unmerged.resolve()))
            logger.info("Wrote the unmerged model to %s and its LoRA adapters to %s (PEFT's files).", unmerged,
                        output_dir / "adapters")
        # The exported repo needs no peft: the adapters are merged into the weights they adapt.
        lora.merge_adapters(final)
    # The card's metrics by the names papers print (BLEU-4, CIDEr-D, BERTScore-F1).
    display = {key: name for name, key in CAPTION_METRIC_KEYS.items()} | {
        "bertscore_precision": "BERTScore-P", "bertscore_recall": "BERTScore-R", "bertscore_f1": "BERTScore-F1",
        "loss": "loss", "perplexity": "perplexity"}
    card_metrics = {display[name.removeprefix("eval_")]: value for name, value in metrics.items()
                    if name.removeprefix("eval_") in display}
    repo_id = training_args.hub_model_id or output_dir.name
    ported = ported_tower_description(model_args.vision_model)
    vision_source = model_args.vision_model or model_args.model_name_or_path
    text_source = model_args.text_model or model_args.model_name_or_path
    dataset = model_args.card_dataset or data_args.dataset
    card_fields = {}
    if model_args.widget_image:
        card_fields["widget_image"] = model_args.widget_image
    folders = export_repo(
        final.to(torch.float32), processor, output_dir, repo_id=repo_id, **card_fields,
        # A tower ported from a package's file says where it came from and under which licences.
        vision_model=ported or vision_source,
        # A local GGUF file by its name: its folder is this machine's.
        text_model=(Path(text_source).name if str(text_source).lower().endswith(".gguf") else text_source),
        # Whose own cards declare the license, where --license does not: a ported tower's is its weights'.
        # (read only when --license is not given: a Hub card is a download)
        tower_licenses=None if model_args.license else {
            vision_source: ported_tower_license(vision_source) if ported else declared_license(vision_source),
            text_source: declared_license(text_source)},
        license=model_args.license, language=model_args.language,
        merged_adapters=f"LoRA rank {model_args.lora_r}" if model_args.lora_r else None,
        # Shards are no Hub dataset the card could link to.
        datasets=None if data.streaming and not model_args.card_dataset else [dataset],
        dataset_name=dataset, dataset_split="validation", metrics=card_metrics, num_scored_images=num_scored,
        decoding={"num_beams": data_args.generation_num_beams,
                  "max_new_tokens": data_args.generation_max_new_tokens},
        training_data=(f"{dataset}: the shards {', '.join(data_args.data_files)}, streamed." if data.streaming
                       else None),
        training_description=_training_description(model_args, data_args, training_args, final,
                                                   None if data.streaming else len(trainer.train_dataset)),
        compute_description=_compute_description(training_args, runtime),
    )
    config = {"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()}
    (output_dir / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
    logger.info("Wrote %s", ", ".join(str(f) for f in folders.values()))
    if push:
        from ..export.hub import push_folder

        url = push_folder(output_dir, repo_id, token=training_args.hub_token,
                          private=training_args.hub_private_repo, revision=training_args.hub_revision)
        logger.info("Pushed to %s", url)
