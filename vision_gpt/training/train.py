"""Train a captioner with `Trainer`: `accelerate launch scripts/train.py [flags | config.yaml | config.json]`.

Arguments are three `HfArgumentParser` dataclasses: `ModelArguments`, `DataArguments` and transformers'
`TrainingArguments` (as `CaptionTrainingArguments`, with captioning defaults). Multi-GPU, FSDP and DeepSpeed come from
Accelerate; this module only builds the model and data, runs `Trainer`, and exports the result as Hub-ready repos.
"""

import json
import logging
from dataclasses import asdict
from itertools import chain
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback, set_seed

from . import lora
from .arguments import (
    BERTSCORE_KEYS,
    CAPTION_METRIC_KEYS,
    NonFiniteLossError,
    build_model_and_processor,
    build_model_config,
    emulated_bf16_warning,
    logger,
    parse_arguments,
)
from .checkpoints import resolve_resume
from .trainer import CaptionTrainer, PlotCallback, StagedUnfreezingCallback, stage_for_epoch


def _setup_logging(training_args) -> None:
    level = logging.INFO if training_args.should_log else logging.WARNING
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=level, force=True)
    if training_args.process_index == 0:
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(Path(training_args.output_dir) / "train.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    import transformers

    transformers.utils.logging.set_verbosity(level)
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()


def _training_description(model_args, data_args, training_args, model, num_pairs, runtime) -> str:
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
        f"{training_args.gradient_accumulation_steps} accumulation, {precision}, {runtime:.0f} s.",
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


def _evaluation_description(metrics: dict, num_images: int) -> str:
    if not metrics:
        return "No validation split was evaluated."
    rows = [f"| {name} | {value:.2f} |" for name, value in metrics.items()]
    return (f"On the validation split ({num_images} images captioned for caption metrics; scores 0-100, loss per "
            "caption token):\n\n| metric | value |\n|---|---|\n" + "\n".join(rows))


def main(argv=None) -> dict:
    """Train and export; returns the training and final validation metrics. `argv` as on the command line (or one
    JSON/YAML config file)."""
    model_args, data_args, training_args = parse_arguments(argv)
    _setup_logging(training_args)
    warning = emulated_bf16_warning(training_args)
    if warning and training_args.process_index == 0:
        logger.warning("%s", warning)
    try:
        build_model_config(model_args)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None

    # Checked before anything slow runs, so a bad resume fails at once.
    resume = training_args.resume_from_checkpoint
    if resume is not None:
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

    bertscorer = None
    if data_args.bertscore_model and data_args.caption_metrics:
        from ..evaluation.bertscore import BERTScorer, BERTScoreSettings

        # Loaded once, here, so that a bad model stops the run at start-up, and not at every evaluation.
        try:
            bertscorer = BERTScorer(BERTScoreSettings(model=data_args.bertscore_model, layer=data_args.bertscore_layer,
                                                      idf=data_args.bertscore_idf, flag="--bertscore_model"),
                                    device=str(training_args.device))
        except (ValueError, ImportError) as error:
            raise SystemExit(f"error: {error}") from None
        if training_args.process_index == 0:
            logger.info("%s", bertscorer.description)

    from ..data.factory import load_captioning_dataset
    from ..data.records import DataReport
    from ..data.shard_splits import SHARD_DATASETS, describe_shards, resolve_data_files, shard_image_ids, shard_images
    from ..data.torch_datasets import CaptionCollator, CaptionPairDataset, StreamingCaptionDataset
    from ..export.repo import export_repo
    from .feature_cache import FeatureCache

    push = training_args.push_to_hub
    # Our export writes the repo and pushes it; Trainer's own push would create the repo at start-up.
    training_args.push_to_hub = False

    # Seeded before the model exists: its mapper (and any cross-attention) starts from random weights.
    set_seed(training_args.seed)
    model, processor = build_model_and_processor(model_args)
    if model_args.lora_r:
        lora_settings = lora.LoraSettings(
            r=model_args.lora_r, alpha=model_args.lora_alpha, dropout=model_args.lora_dropout or 0.0,
            vision=model_args.lora_vision,
            target_modules=tuple(model_args.lora_target_modules) if model_args.lora_target_modules else None,
        )
        try:
            lora.add_adapters(model, lora_settings)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        logger.info("%s.", lora.describe(model, lora_settings))
    logger.info("Trainable parameters: %s.", "; ".join(
        f"{part} {counts['trainable']:,} of {counts['total']:,}" for part, counts in model.parameter_summary().items()))
    # Shards are streamed: only their files are checked here, and their samples are read as training goes.
    streaming = data_args.dataset in SHARD_DATASETS
    columns = {"image_column": data_args.image_column, "caption_column": data_args.caption_column}
    try:
        if streaming:
            train_shards = resolve_data_files(data_args.dataset, data_args.data_files)
            seed = training_args.data_seed if training_args.data_seed is not None else training_args.seed
            # Opens every shard, so a file that is not one stops the run here.
            train_dataset = StreamingCaptionDataset(train_shards, processor.image_processor, seed=seed,
                                                    shuffle_buffer_size=data_args.shuffle_buffer_size, **columns)
            first, skipped = train_dataset.first_pair_or_problems()
            if first is None:
                raise ValueError(f"{describe_shards(train_shards)} hold no usable (image, caption) pair.\n"
                                 + "\n".join(skipped.problems()))
            train_images, eval_images = None, []
            logger.info("Training data: %s, streamed.", describe_shards(train_shards))
        else:
            splits, report = load_captioning_dataset(data_args.dataset, data_args.data_dir, **columns)
            train_images = splits["train"][: data_args.max_train_images]
            eval_images = splits.get("validation", [])[: data_args.max_eval_images]
            logger.info("%s", report.summary(splits))
        if data_args.eval_data_files:
            eval_splits, eval_report = load_captioning_dataset(None, data_files=data_args.eval_data_files,
                                                               split="validation",
                                                               max_images=data_args.max_eval_images,
                                                               files_flag="--eval_data_files", **columns)
            eval_images = eval_splits["validation"]
            logger.info("Validation data (--eval_data_files): %s", eval_report.summary(eval_splits))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    cache = None
    # A later stage or adapters in the tower change its features.
    vision_changes = model_args.unfreeze_vision_epoch is not None or model_args.lora_vision
    if data_args.feature_cache and model.config.freeze_vision and not vision_changes:
        cache = FeatureCache(data_args.feature_cache_dir, model, processor.image_processor)
        batch_size = training_args.per_device_eval_batch_size
        with training_args.main_process_first(desc="vision feature cache"):
            if streaming:
                # Listed first (tar headers, parquet id columns), so the cache file's shape is known; then the
                # shards are read once, front to back, and no more than a batch of images is held.
                listing = DataReport(source=describe_shards(train_shards))
                ids = shard_image_ids(train_shards, listing, data_args.image_column)
                images = shard_images(train_shards, listing, data_args.image_column)
                try:
                    cache.build_from_stream(ids + [record.image_id for record in eval_images],
                                            chain(images, ((record.image_id, record.image) for record in eval_images)),
                                            batch_size=batch_size)
                except ValueError as error:
                    raise SystemExit(f"error: {error}") from None
            else:
                cache.build(train_images + eval_images, batch_size=batch_size)
    elif data_args.feature_cache:
        logger.info("Feature cache off: the vision tower trains (now or in a later stage), so its features change.")

    if streaming:
        train_dataset.feature_cache = cache
    else:
        train_dataset = CaptionPairDataset(train_images, processor.image_processor, cache)
    eval_dataset = CaptionPairDataset(eval_images, processor.image_processor, cache) if eval_images else None
    if eval_dataset is None:
        training_args.eval_strategy = "no"
        training_args.load_best_model_at_end = False
    if streaming and training_args.process_index == 0:
        for name, what in (("save_strategy", "saves a checkpoint"), ("eval_strategy", "evaluates")):
            if getattr(training_args, name) == "epoch":
                logger.warning("--%s epoch with streamed shards %s only at the end: the whole run of --max_steps is "
                               "one epoch. Use --%s steps --%s N for more.", name, what, name,
                               name.replace("strategy", "steps"))

    later_trainable = []
    if model_args.unfreeze_text_epoch is not None or model_args.unfreeze_vision_epoch is not None:
        final_stage = stage_for_epoch(model_args, 10**9)
        current = {id(p) for p in model.parameters() if p.requires_grad}
        model.set_frozen(vision=final_stage["vision"], text=final_stage["text"])
        later_trainable = [p for p in model.parameters() if p.requires_grad and id(p) not in current]
        model.set_frozen(vision=model_args.freeze_vision, text=model_args.freeze_text)

    callbacks = [StagedUnfreezingCallback(model_args), PlotCallback()]
    if data_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))
    caption_images = eval_images[: data_args.caption_metrics_images] if data_args.caption_metrics else None
    trainer = CaptionTrainer(
        model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
        data_collator=CaptionCollator(processor, data_args.max_caption_length), processing_class=processor,
        callbacks=callbacks, later_trainable=later_trainable, caption_images=caption_images, data_args=data_args,
        bertscorer=bertscorer,
    )

    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except NonFiniteLossError as error:
        logger.error("%s", error)
        raise SystemExit(f"error: {error}") from None
    if streaming and training_args.dataloader_num_workers == 0:
        # With workers, each logs its own passes; read in this process, the pass in progress is reported here.
        logger.info("Streamed training data, the pass in progress at the end:\n%s",
                    "\n".join(train_dataset.report.problems()))
    metrics = trainer.evaluate() if eval_dataset is not None else {}
    if metrics:
        trainer.log_metrics("eval", metrics)

    if trainer.is_world_process_zero():
        final = trainer.accelerator.unwrap_model(trainer.model)
        if lora.has_adapters(final):
            if model_args.save_adapters:
                unmerged = Path(training_args.output_dir) / "unmerged"
                final.save_pretrained(unmerged, state_dict=lora.base_state_dict(final))
                processor.save_pretrained(unmerged)
                lora.save_adapters(final, Path(training_args.output_dir) / "adapters", str(unmerged.resolve()))
                logger.info("Wrote the unmerged model to %s and its LoRA adapters to %s (PEFT's files).", unmerged,
                            Path(training_args.output_dir) / "adapters")
            # The exported repo needs no peft: the adapters are merged into the weights they adapt.
            lora.merge_adapters(final)
        card_metrics = {name.removeprefix("eval_"): value for name, value in metrics.items()
                        if name.removeprefix("eval_") in {*CAPTION_METRIC_KEYS.values(), *BERTSCORE_KEYS, "loss",
                                                           "perplexity"}}
        repo_id = training_args.hub_model_id or Path(training_args.output_dir).name
        folders = export_repo(
            final.to(torch.float32), processor, training_args.output_dir, repo_id=repo_id,
            vision_model=model_args.vision_model or model_args.model_name_or_path,
            # A local GGUF file by its name: its folder is this machine's.
            text_model=(Path(model_args.text_model).name if str(model_args.text_model).lower().endswith(".gguf")
                        else model_args.text_model or model_args.model_name_or_path),
            merged_adapters=f"LoRA rank {model_args.lora_r}" if model_args.lora_r else None,
            # Shards are no Hub dataset the card could link to.
            datasets=None if streaming else [data_args.dataset],
            dataset_name=data_args.dataset, metrics=card_metrics,
            training_description=_training_description(model_args, data_args, training_args, final,
                                                       None if streaming else len(train_dataset),
                                                       result.metrics.get("train_runtime", 0)),
            evaluation_description=_evaluation_description(card_metrics, len(caption_images or eval_images)),
            data_limitations=(f"the captions of {', '.join(data_args.data_files)}" if streaming
                              else f"{data_args.dataset} captions"),
        )
        config = {"model": asdict(model_args), "data": asdict(data_args), "training": training_args.to_dict()}
        (Path(training_args.output_dir) / "training_config.json").write_text(json.dumps(config, indent=2, default=str))
        logger.info("Wrote %s", ", ".join(str(f) for f in folders.values()))
        if push:
            from ..export.hub import push_folder

            url = push_folder(training_args.output_dir, repo_id, token=training_args.hub_token,
                              private=training_args.hub_private_repo, revision=training_args.hub_revision)
            logger.info("Pushed to %s", url)
    trainer.accelerator.wait_for_everyone()
    return {**result.metrics, **metrics}
