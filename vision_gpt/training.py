"""Train a captioner with `Trainer`: `accelerate launch scripts/train.py [flags | config.yaml | config.json]`.

Arguments are three `HfArgumentParser` dataclasses: `ModelArguments`, `DataArguments` and transformers'
`TrainingArguments` (as `CaptionTrainingArguments`, with captioning defaults). Multi-GPU, FSDP and DeepSpeed come from
Accelerate; this module only builds the model and data, runs `Trainer`, and exports the result as Hub-ready repos.
"""

import importlib.util
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import torch
from transformers import (AutoConfig, EarlyStoppingCallback, HfArgumentParser, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)

from . import hardware, lora
from .checkpoints import resolve_resume
from .generation import generate_captions
from .modeling import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor
from .modeling.configuration_vision_gpt import FUSIONS, PROJECTOR_TYPES, VISUAL_TOKENS
from .modeling.processing_vision_gpt import text_model_source

logger = logging.getLogger("vision_gpt.training")

CAPTION_METRIC_KEYS = {"BLEU-1": "bleu_1", "BLEU-2": "bleu_2", "BLEU-3": "bleu_3", "BLEU-4": "bleu_4",
                       "METEOR": "meteor", "ROUGE-L": "rouge_l", "CIDEr-D": "cider_d", "SPICE": "spice"}
BERTSCORE_KEYS = ("bertscore_precision", "bertscore_recall", "bertscore_f1")


@dataclass
class ModelArguments:
    vision_model: str | None = field(default=None, metadata={
        "help": "Vision tower to start from: Hub id or folder (ViT, CLIP, SigLIP, DINOv2), e.g. "
                "google/vit-base-patch16-224-in21k."})
    text_model: str | None = field(default=None, metadata={
        "help": "Decoder to start from (GPT-2, Llama/SmolLM2, Mistral, Qwen2/3, Gemma, OPT, GPT-NeoX, Phi; fusion "
                "'cross_attention' needs GPT-2): Hub id, folder or local .gguf file, e.g. gpt2."})
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Continue from an existing vision-gpt model (Hub id or folder) instead of --vision_model/--text_model."})
    fusion: str = field(default="cross_attention", metadata={"help": f"One of {list(FUSIONS)}."})
    visual_tokens: str = field(default="patches", metadata={"help": f"One of {list(VISUAL_TOKENS)}."})
    num_visual_tokens: int = field(default=32, metadata={"help": "K visual tokens for 'queries' and 'pooled'."})
    patch_merge_size: int = field(default=2, metadata={"help": "'merged': blocks of m x m patches become one token."})
    projector_type: str = field(default="mlp", metadata={"help": f"One of {list(PROJECTOR_TYPES)}."})
    projector_hidden_act: str = field(default="gelu")
    vision_feature_layer: int = field(default=-1)
    freeze_vision: bool = field(default=True, metadata={"help": "Freeze the vision tower."})
    freeze_text: bool = field(default=True, metadata={
        "help": "Freeze the decoder (cross-attention layers still train)."})
    freeze_text_layers: int = field(default=0, metadata={"help": "When GPT-2 trains, keep its first N blocks frozen."})
    unfreeze_text_epoch: int | None = field(default=None, metadata={
        "help": "Staged unfreezing: from this epoch (0-based) on, GPT-2 trains too."})
    unfreeze_vision_epoch: int | None = field(default=None, metadata={
        "help": "Staged unfreezing: from this epoch (0-based) on, everything trains."})
    lora_r: int = field(default=0, metadata={
        "help": "Train LoRA adapters of this rank (peft) on the decoder, next to the projector; 0: no adapters."})
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha (default: 2 x --lora_r)."})
    lora_dropout: float | None = field(default=None, metadata={"help": "Dropout on the LoRA adapters' input (0)."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Names of the linear layers to adapt (e.g. q_proj v_proj, or c_attn for GPT-2); default: all of the "
                "decoder's (and, with --lora_vision, the vision tower's)."})
    lora_vision: bool = field(default=False, metadata={"help": "Also adapt the vision tower's linear layers."})
    save_adapters: bool = field(default=False, metadata={
        "help": "With --lora_r: also write the unmerged model (unmerged/) and its adapters as PEFT writes them "
                "(adapters/); the exported repo has them merged either way."})


@dataclass
class DataArguments:
    dataset: str = field(default="flickr8k", metadata={
        "help": "flickr8k, flickr30k, coco or auto (layout detected in --data_dir), a datasets Hub id / folder, or "
                "webdataset or parquet (shards named by --data_files, streamed)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder with the images and caption files."})
    data_files: list[str] | None = field(default=None, metadata={
        "help": "For --dataset webdataset or parquet: the training shards, as files, globs or brace ranges (quoted), "
                'e.g. "shards/{000000..000099}.tar". Streamed, never loaded whole: needs --max_steps.'})
    eval_data_files: list[str] | None = field(default=None, metadata={
        "help": "Validation shards (webdataset .tar or .parquet, taken by suffix), read whole (cap them with "
                "--max_eval_images); they replace the dataset's validation split."})
    shuffle_buffer_size: int = field(default=1000, metadata={
        "help": "Streamed shards: how many (image, caption) pairs are held to shuffle them (more mixes better)."})
    image_column: str | None = field(default=None, metadata={"help": "For datasets and parquet: the image column."})
    caption_column: str | None = field(default=None, metadata={
        "help": "For datasets and parquet: the captions column (default: caption_0..N, captions, sentences, caption, "
                "text)."})
    max_caption_length: int = field(default=64, metadata={"help": "Longest caption in tokens, start and end included."})
    max_train_images: int | None = field(default=None, metadata={"help": "Use only the first N training images."})
    max_eval_images: int | None = field(default=None, metadata={"help": "Use only the first N validation images."})
    feature_cache: bool = field(default=True, metadata={
        "help": "With a frozen vision tower, compute its features once per image and train from a disk cache."})
    feature_cache_dir: str = field(default="~/.cache/vision-gpt/features")
    caption_metrics: bool = field(default=True, metadata={
        "help": "At each evaluation, caption validation images and score them (BLEU, METEOR, ROUGE-L, CIDEr-D)."})
    caption_metrics_images: int = field(default=100, metadata={"help": "How many validation images to caption."})
    generation_num_beams: int = field(default=3)
    generation_max_new_tokens: int = field(default=32)
    bertscore_model: str | None = field(default=None, metadata={
        "help": "Also score the captioned validation images by BERTScore with this text encoder (folder or Hub id, "
                "e.g. roberta-large): eval_bertscore_precision/recall/f1, usable as --metric_for_best_model."})
    bertscore_layer: int | None = field(default=None, metadata={
        "help": "Its layer (default: bert-score's tuned layer for a model it knows, else the last)."})
    bertscore_idf: bool = field(default=False, metadata={"help": "Weight BERTScore tokens by idf over the references."})
    early_stopping_patience: int | None = field(default=None, metadata={
        "help": "Stop when metric_for_best_model has not improved for this many evaluations."})


@dataclass
class CaptionTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` with captioning defaults (evaluate and save each epoch, keep the best)."""

    output_dir: str | None = field(default=None, metadata={"help": "Where checkpoints and the final repos go."})
    eval_strategy: str = field(default="epoch")
    save_strategy: str = field(default="epoch")
    save_total_limit: int | None = field(default=2)
    load_best_model_at_end: bool = field(default=True)
    metric_for_best_model: str | None = field(default="loss")
    logging_steps: float = field(default=10)
    learning_rate: float = field(default=5e-4)
    remove_unused_columns: bool = field(default=False)
    prediction_loss_only: bool = field(default=True)
    report_to: None | str | list[str] = field(default="auto", metadata={
        "help": "Where to log: 'auto' is TensorBoard when installed, else none."})

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required.")
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.accelerator.is_available():
            # A multi-process launch (accelerate launch --multi_gpu / torchrun) on a machine without accelerators:
            # run data-parallel over CPU processes (gloo) instead of silently falling back to one process each.
            self.use_cpu = True
        if self.report_to == "auto":
            try:
                import tensorboard  # noqa: F401

                self.report_to = ["tensorboard"]
            except ImportError:
                self.report_to = "none"
        super().__post_init__()


class NonFiniteLossError(RuntimeError):
    pass


# ----- arguments -----------------------------------------------------------------------------------------------------


def parse_arguments(argv=None):
    """Flags, or a single JSON/YAML file; unknown keys and bad values fail here, before any data is read."""
    parser = HfArgumentParser((ModelArguments, DataArguments, CaptionTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
            path = Path(argv[0])
            if not path.is_file():
                parser.error(f"config file '{path}' does not exist")
            if path.suffix == ".json":
                args = parser.parse_json_file(path, allow_extra_keys=False)
            else:
                args = parser.parse_yaml_file(path, allow_extra_keys=False)
        else:
            *args, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
            if unknown:
                parser.error(f"unknown arguments: {' '.join(unknown)} (see --help)")
    except ValueError as error:
        # TrainingArguments checks its own values (e.g. bf16 without a GPU needs --use_cpu): say so as an argument
        # error, with no traceback.
        parser.error(f"{argv[0] + ': ' if len(argv) == 1 else ''}{error}")
    model_args, data_args, training_args = args
    try:
        validate_arguments(model_args, data_args, training_args)
    except ValueError as error:
        parser.error(str(error))
    return model_args, data_args, training_args


def validate_lora_arguments(model_args: ModelArguments, training_args) -> None:
    """The LoRA flags, before any model is loaded; fills in `--lora_alpha`'s default (2 x rank)."""
    if model_args.lora_r < 0:
        raise ValueError(f"--lora_r {model_args.lora_r}: a LoRA rank is positive (0 trains no adapters)")
    if not model_args.lora_r:
        given = [name for name in ("lora_alpha", "lora_dropout", "lora_target_modules")
                 if getattr(model_args, name) is not None]
        given += [name for name in ("lora_vision", "save_adapters") if getattr(model_args, name)]
        if given:
            raise ValueError(f"--{', --'.join(given)} configure LoRA adapters, which only --lora_r N (N >= 1) adds")
        return
    if model_args.lora_alpha is None:
        model_args.lora_alpha = 2.0 * model_args.lora_r
    if model_args.lora_alpha <= 0:
        raise ValueError(f"--lora_alpha {model_args.lora_alpha:g}: must be positive")
    if not 0 <= (model_args.lora_dropout or 0.0) < 1:
        raise ValueError(f"--lora_dropout {model_args.lora_dropout:g}: must be in [0, 1)")
    if training_args.deepspeed or training_args.fsdp:
        raise ValueError("--lora_r with DeepSpeed or FSDP is not supported: their checkpoints hold sharded weights "
                         "that vision-gpt's adapter checkpoints do not split; use DDP (accelerate launch --multi_gpu)")
    if importlib.util.find_spec("peft") is None:
        raise ValueError("--lora_r needs the peft package: pip install 'vision-gpt[lora]'")


def validate_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    if model_args.model_name_or_path is None and not (model_args.vision_model and model_args.text_model):
        raise ValueError("give --vision_model and --text_model, or --model_name_or_path to continue a vision-gpt model")
    validate_shard_arguments(model_args, data_args, training_args)
    if data_args.dataset in ("flickr8k", "flickr30k", "coco", "auto"):
        if not data_args.data_dir:
            raise ValueError(f"--dataset {data_args.dataset} needs --data_dir")
        if not Path(data_args.data_dir).is_dir():
            raise ValueError(f"--data_dir '{data_args.data_dir}' is not a folder")
    validate_lora_arguments(model_args, training_args)
    for name in ("unfreeze_text_epoch", "unfreeze_vision_epoch"):
        value = getattr(model_args, name)
        if value is not None and value < 0:
            raise ValueError(f"--{name} must be 0 or more, got {value}")
    staged = model_args.unfreeze_text_epoch is not None or model_args.unfreeze_vision_epoch is not None
    if staged and training_args.world_size > 1:
        # DistributedDataParallel registers the parameters that train when it wraps the model; parameters unfrozen
        # later would never be synchronised across processes.
        raise ValueError("staged unfreezing (--unfreeze_*_epoch) needs a single process; under DDP, run each stage "
                         "as its own run with --model_name_or_path")
    for name in ("max_caption_length", "caption_metrics_images", "generation_num_beams", "generation_max_new_tokens",
                 "shuffle_buffer_size"):
        if getattr(data_args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(data_args, name)}")
    best = training_args.metric_for_best_model
    caption_metrics = set(CAPTION_METRIC_KEYS.values())
    if best is not None:
        key = best.removeprefix("eval_")
        if key not in {"loss", "perplexity", *caption_metrics, *BERTSCORE_KEYS}:
            raise ValueError(f"--metric_for_best_model {best!r} is not computed; use loss, perplexity or one of "
                             f"{sorted(caption_metrics | set(BERTSCORE_KEYS))}")
        if (key in caption_metrics or key in BERTSCORE_KEYS) and not data_args.caption_metrics:
            raise ValueError(f"--metric_for_best_model {best} needs --caption_metrics true")
        if key in BERTSCORE_KEYS and not data_args.bertscore_model:
            raise ValueError(f"--metric_for_best_model {best} needs --bertscore_model (e.g. roberta-large)")
    if data_args.bertscore_model and not data_args.caption_metrics:
        raise ValueError("--bertscore_model scores the captions of --caption_metrics: add --caption_metrics true")
    if data_args.early_stopping_patience is not None and data_args.early_stopping_patience < 1:
        raise ValueError("--early_stopping_patience must be at least 1")
    # Model fields are checked by VisionGPTConfig itself, against the real tower sizes, in build_model_config.


def validate_shard_arguments(model_args: ModelArguments, data_args: DataArguments, training_args) -> None:
    """Streamed shards have no length and no epochs of their own: what needs either is refused here, at start."""
    from .data import SHARD_DATASETS, resolve_data_files

    for name in ("data_files", "eval_data_files"):
        if isinstance(getattr(data_args, name), str):  # a single pattern in a config file
            setattr(data_args, name, [getattr(data_args, name)])
    if data_args.dataset not in SHARD_DATASETS:
        if data_args.data_files:
            raise ValueError("--data_files names webdataset or parquet shards: add --dataset webdataset or --dataset "
                             "parquet")
    else:
        dataset = data_args.dataset
        if not data_args.data_files:
            raise ValueError(f'--dataset {dataset} needs --data_files, e.g. "shards/{{000000..000099}}.tar"')
        if data_args.data_dir:
            raise ValueError(f"--dataset {dataset} reads the shards of --data_files; drop --data_dir")
        if training_args.max_steps is None or training_args.max_steps <= 0:
            raise ValueError(f"--dataset {dataset} streams the shards, and a stream has no length: give --max_steps, "
                             "the number of optimizer steps to train (each of per_device_train_batch_size x processes "
                             "x gradient_accumulation_steps pairs)")
        if data_args.max_train_images is not None:
            raise ValueError(f"--max_train_images takes the first images of a list, and --dataset {dataset} streams: "
                             'name fewer shards in --data_files instead (e.g. "shards/{000000..000009}.tar")')
        if model_args.unfreeze_text_epoch is not None or model_args.unfreeze_vision_epoch is not None:
            raise ValueError(f"staged unfreezing (--unfreeze_*_epoch) counts epochs, and with --dataset {dataset} the "
                             "whole run of --max_steps is one epoch: run each stage as its own run with "
                             "--model_name_or_path")
        resolve_data_files(dataset, data_args.data_files, "--data_files")
    if data_args.eval_data_files:
        resolve_data_files(None, data_args.eval_data_files, "--eval_data_files")


def emulated_bf16_warning(training_args) -> str | None:
    """What to tell a user who asks for bf16 on a CPU that has no native bf16 (None otherwise). Not an error: the run
    works, only many times slower than in float32."""
    flags = " and ".join(f"--{name}" for name in ("bf16", "bf16_full_eval") if getattr(training_args, name))
    # With bf16, TrainingArguments already refused a machine without an accelerator unless use_cpu is set.
    if not flags or not training_args.use_cpu or hardware.cpu_bf16_is_native():
        return None
    return (f"{flags} on the CPU: {hardware.describe_cpu_bf16()}; in training many times slower (a demo step at batch "
            f"32 took 68.8 s with --bf16 and 1.71 s without on an AVX2-only AMD EPYC). Drop {flags} to run in float32.")


def _model_overrides(model_args: ModelArguments) -> dict:
    names = ("fusion", "visual_tokens", "num_visual_tokens", "patch_merge_size", "projector_type",
             "projector_hidden_act", "vision_feature_layer", "freeze_vision", "freeze_text", "freeze_text_layers")
    return {name: getattr(model_args, name) for name in names}


def build_model_config(model_args: ModelArguments) -> VisionGPTConfig:
    """The config the run will train, validated before any weights or data are loaded."""
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)
        if not isinstance(config, VisionGPTConfig):
            raise ValueError(f"--model_name_or_path {model_args.model_name_or_path} is not a vision-gpt model "
                             f"(model_type {config.model_type!r})")
        freezing = {k: getattr(model_args, k) for k in ("freeze_vision", "freeze_text", "freeze_text_layers")}
        return VisionGPTConfig.from_dict({**config.to_dict(), **freezing})
    vision_config = AutoConfig.from_pretrained(model_args.vision_model)
    vision_config = getattr(vision_config, "vision_config", None) or vision_config
    text_source, text_kwargs = text_model_source(model_args.text_model)
    text_config = AutoConfig.from_pretrained(text_source, **text_kwargs)
    return VisionGPTConfig(vision_config=vision_config, text_config=text_config, **_model_overrides(model_args))


def build_model_and_processor(model_args: ModelArguments):
    if model_args.model_name_or_path:
        model = VisionGPTForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
        model.set_frozen(vision=model_args.freeze_vision, text=model_args.freeze_text,
                         text_layers=model_args.freeze_text_layers)
        processor = VisionGPTProcessor.from_pretrained(model_args.model_name_or_path)
        processor.use_image_tokens_of(model.config)  # a processor saved before it knew them
        return model, processor
    from .assembly import assemble

    return assemble(model_args.vision_model, model_args.text_model, **_model_overrides(model_args))


# ----- trainer -------------------------------------------------------------------------------------------------------


def stage_for_epoch(model_args: ModelArguments, epoch: int) -> dict:
    """What is frozen during `epoch` under the staged schedule (projector first, then GPT-2, then everything)."""
    text_on = model_args.unfreeze_text_epoch is not None and epoch >= model_args.unfreeze_text_epoch
    vision_on = model_args.unfreeze_vision_epoch is not None and epoch >= model_args.unfreeze_vision_epoch
    return {
        "vision": model_args.freeze_vision and not vision_on,
        "text": model_args.freeze_text and not (text_on or vision_on),
    }


class StagedUnfreezingCallback(TrainerCallback):
    """Unfreezes GPT-2 and then the vision tower at the epochs the arguments give (the VisionGPT2 seed's schedule)."""

    def __init__(self, model_args: ModelArguments):
        self.model_args = model_args

    def _apply(self, model, epoch: int):
        stage = stage_for_epoch(self.model_args, epoch)
        before = model.parameter_summary()["total"]["trainable"]
        model.set_frozen(vision=stage["vision"], text=stage["text"])
        after = model.parameter_summary()["total"]["trainable"]
        if after != before:
            logger.info("Epoch %d: trainable parameters %s -> %s (vision frozen: %s, GPT-2 frozen: %s).", epoch,
                        f"{before:,}", f"{after:,}", stage["vision"], stage["text"])

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # A resumed run starts mid-schedule.
        self._apply(model, int(state.epoch or 0))

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        self._apply(model, int(round(state.epoch or 0)))


class PlotCallback(TrainerCallback):
    """Loss and caption-metric curves as PNG files in `output_dir`, redrawn after every evaluation."""

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_history(state.log_history, Path(args.output_dir))

    on_train_end = on_evaluate


def plot_history(history: list[dict], output_dir: Path) -> list[Path]:
    """`loss.png` (train and validation loss) and `caption_metrics.png` from a Trainer's `log_history`."""
    losses = {"train loss": [(h["step"], h["loss"]) for h in history if "loss" in h and "step" in h],
              "validation loss": [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]}
    metrics = {key: [(h["step"], h[f"eval_{key}"]) for h in history if f"eval_{key}" in h]
               for key in (*CAPTION_METRIC_KEYS.values(), *BERTSCORE_KEYS)}
    written = []
    for series, ylabel, name in ((losses, "cross-entropy per caption token", "loss.png"),
                                 (metrics, "score (0-100)", "caption_metrics.png")):
        series = {label: points for label, points in series.items() if points}
        if series:
            written.append(_plot(series, ylabel, output_dir / name))
    return written


def _plot(series: dict[str, list[tuple]], ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for label, points in series.items():
        axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


class CaptionTrainer(Trainer):
    """`Trainer` plus: an optimizer that covers parameters unfrozen later, a stop on non-finite losses, and
    perplexity and caption metrics at each evaluation."""

    def __init__(self, *args, later_trainable=(), caption_images=None, data_args=None, bertscorer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.later_trainable = list(later_trainable)
        self.caption_images = caption_images
        self.data_args = data_args
        self._metrics_unavailable = None
        self.bertscorer = bertscorer

    def create_optimizer(self, model=None):
        # Parameters that a later stage unfreezes must be in the optimizer from the start (AdamW skips them while
        # they have no gradient), or they would never be updated.
        if self.optimizer is not None or not self.later_trainable:
            return super().create_optimizer(model)
        flags = [p.requires_grad for p in self.later_trainable]
        for parameter in self.later_trainable:
            parameter.requires_grad_(True)
        try:
            return super().create_optimizer(model)
        finally:
            for parameter, flag in zip(self.later_trainable, flags):
                parameter.requires_grad_(flag)

    def _load_weights(self, folder: str) -> None:
        # Trainer reads checkpoint files straight into `load_state_dict`, but transformers 5 saves ViT (and other
        # towers) under their legacy key names: only `from_pretrained` maps them back. Without this, resuming and
        # load_best_model_at_end would silently keep the current vision weights.
        model = self.accelerator.unwrap_model(self.model)
        if lora.has_adapters(model):
            lora.load_checkpoint(model, folder)
            return
        reference = type(model).from_pretrained(folder, dtype=torch.float32)
        model.load_state_dict(reference.state_dict())

    def _save(self, output_dir=None, state_dict=None):
        model = self.accelerator.unwrap_model(self.model)
        if not lora.has_adapters(model):
            return super()._save(output_dir, state_dict)
        # With adapters: the plain model's weights under its own names, which `from_pretrained` reads, and the
        # adapters in PEFT's files in a subfolder.
        super()._save(output_dir, state_dict=lora.base_state_dict(model))
        if self.args.should_save:
            lora.save_adapters(model, Path(output_dir or self.args.output_dir) / lora.CHECKPOINT_ADAPTERS)
        return None

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._load_weights(resume_from_checkpoint)

    def _load_best_model(self):
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("Loading the best model from %s (%s = %s).", self.state.best_model_checkpoint,
                    self.args.metric_for_best_model, self.state.best_metric)
        self._load_weights(self.state.best_model_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        finite = torch.isfinite(loss).all().float()
        if self.accelerator.num_processes > 1:
            # Every process must stop together, or the others would wait for it forever.
            finite = self.accelerator.reduce(finite.to(self.accelerator.device), reduction="mean")
        if finite.item() < 1:
            raise NonFiniteLossError(
                f"Training stopped at step {self.state.global_step + 1}: the loss became {loss.item()}. fp16 training "
                "of GPT-2 is known to overflow; use --bf16 (or full precision), a lower --learning_rate, or "
                "--max_grad_norm. No final model was written; earlier checkpoints are intact."
            )
        return loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                         metric_key_prefix)
        loss = output.metrics.get(f"{metric_key_prefix}_loss")
        if loss is not None:
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 50.0))
        if self.caption_images and self.data_args.caption_metrics:
            for name, value in self.caption_metrics().items():
                output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def caption_metrics(self) -> dict[str, float]:
        """Caption the validation subset and score it; an unavailable scorer (no Java) is reported once, not fatal."""
        if self._metrics_unavailable:
            return {}
        try:
            from .evaluation import compute_caption_metrics
        except ImportError as error:
            self._metrics_unavailable = str(error)
            logger.warning("Caption metrics are unavailable (%s); evaluating loss and perplexity only.", error)
            return {}
        model = self.accelerator.unwrap_model(self.model)
        predictions, references = generate_captions(
            model, self.processing_class, self.caption_images, batch_size=self.args.per_device_eval_batch_size,
            num_beams=self.data_args.generation_num_beams, max_new_tokens=self.data_args.generation_max_new_tokens)
        try:
            scores = compute_caption_metrics(predictions, references)
        except (OSError, RuntimeError) as error:
            self._metrics_unavailable = str(error)
            logger.warning("Caption metrics failed (%s); evaluating loss and perplexity only.", error)
            return {}
        scores = {CAPTION_METRIC_KEYS[name]: value for name, value in scores.items() if name in CAPTION_METRIC_KEYS}
        if self.bertscorer is not None:
            bertscore = self.bertscorer(list(predictions.values()), list(references.values()))
            scores.update({key: bertscore[key] for key in BERTSCORE_KEYS})
        return scores


# ----- main ----------------------------------------------------------------------------------------------------------


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
        from .bertscore import BERTScorer, BERTScoreSettings

        # Loaded once, here, so that a bad model stops the run at start-up, and not at every evaluation.
        try:
            bertscorer = BERTScorer(BERTScoreSettings(model=data_args.bertscore_model, layer=data_args.bertscore_layer,
                                                      idf=data_args.bertscore_idf, flag="--bertscore_model"),
                                    device=str(training_args.device))
        except (ValueError, ImportError) as error:
            raise SystemExit(f"error: {error}") from None
        if training_args.process_index == 0:
            logger.info("%s", bertscorer.description)

    from .data import (SHARD_DATASETS, CaptionCollator, CaptionPairDataset, DataReport, StreamingCaptionDataset,
                       describe_shards, load_captioning_dataset, resolve_data_files, shard_image_ids, shard_images)
    from .export import export_repo
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
            from .hub import push_folder

            url = push_folder(training_args.output_dir, repo_id, token=training_args.hub_token,
                              private=training_args.hub_private_repo, revision=training_args.hub_revision)
            logger.info("Pushed to %s", url)
    trainer.accelerator.wait_for_everyone()
    return {**result.metrics, **metrics}
