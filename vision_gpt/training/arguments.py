"""The training command's arguments: `ModelArguments`, `DataArguments` and `CaptionTrainingArguments`, parsed by
`HfArgumentParser` from flags or a YAML/JSON config file, and checked before anything loads."""

import importlib.util
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, HfArgumentParser, TrainingArguments

from ..assembly.build import assemble, model_overrides
from ..inference import hardware
from ..modeling import VisionGPTConfig, VisionGPTForConditionalGeneration, VisionGPTProcessor
from ..modeling.configuration_vision_gpt import FUSIONS, PROJECTOR_TYPES, VISUAL_TOKENS
from ..modeling.processing_vision_gpt import text_model_source

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
    projector_hidden_act: str = field(default="gelu", metadata={"help": "The projector MLP's activation."})
    vision_feature_layer: list[int] = field(default_factory=lambda: [-1], metadata={
        "help": "The vision tower's layer whose output the projector reads (-1: the last); several, e.g. 4 -1, are "
                "concatenated (LLaVA's convention)."})
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
    # The exported repo's model card (README.md).
    license: str | None = field(default=None, metadata={
        "help": "The model card's license, a Hub license id such as apache-2.0 or mit. Default: the license the "
                "towers' own cards agree on, else 'other' (with a warning)."})
    language: list[str] = field(default_factory=lambda: ["en"], metadata={
        "help": "The captions' languages for the model card, as ISO 639-1 codes."})
    card_dataset: str | None = field(default=None, metadata={
        "help": "The training data's name in the model card (datasets, model-index). Default: --dataset."})
    widget_image: str | None = field(default=None, metadata={
        "help": "An image for the model card's widget on the Hub, copied into the repo. Default: a drawn example "
                "that ships with vision-gpt."})


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
    vision_learning_rate: float | None = field(default=None, metadata={
        "help": "The vision tower's own learning rate, where it trains (default: --learning_rate), as nanoVLM and "
                "LLaVA train a tower apart from the projector."})
    remove_unused_columns: bool = field(default=False)
    prediction_loss_only: bool = field(default=True)
    report_to: None | str | list[str] = field(default="auto", metadata={
        "help": "Where to log: 'auto' is TensorBoard when installed, else none."})

    def __post_init__(self):
        if self.output_dir is None:
            raise ValueError("--output_dir is required.")
        if self.vision_learning_rate is not None and not self.vision_learning_rate > 0:
            raise ValueError(f"--vision_learning_rate must be positive, got {self.vision_learning_rate}.")
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


# What each `--no-*` flag of a field that defaults to true does (HfArgumentParser would repeat the field's own help).
NEGATIVE_HELP = {
    "freeze_vision": "Unfreeze the vision tower: it trains too.",
    "freeze_text": "Unfreeze the decoder: it trains too.",
    "feature_cache": "Run the vision tower at every step instead of reading its features from a disk cache.",
    "caption_metrics": "Evaluate loss and perplexity only, without captioning validation images.",
}
_FLAG = re.compile(r"--[a-z][a-z0-9_]*")


class TrainingArgumentParser(HfArgumentParser):
    """`HfArgumentParser` over the three dataclasses, spoken as the rest of `vision-gpt`: the dashed spelling of each
    flag first (usage and help show it; the underscore spelling still parses), flags named in help texts dashed too,
    and a `--no-*` flag's help that says what it does."""

    def __init__(self, **kwargs):
        super().__init__((ModelArguments, DataArguments, CaptionTrainingArguments), **kwargs)

    def add_argument(self, *names, **kwargs):
        if isinstance(kwargs.get("help"), str):
            kwargs["help"] = _FLAG.sub(lambda match: match.group(0).replace("_", "-"), kwargs["help"])
        if names and names[0].startswith("--no_") and kwargs.get("action") == "store_false":
            dest = kwargs.get("dest", "")
            kwargs["help"] = NEGATIVE_HELP.get(dest, f"The opposite of --{dest.replace('_', '-')}.")
        # argparse names the flag in usage and help by its first spelling.
        names = sorted(names, key=lambda name: "_" in name.lstrip("-"))
        return super().add_argument(*names, **kwargs)


def parse_arguments(argv=None, **parser_kwargs):
    """Flags, or a single JSON/YAML file; unknown keys and bad values fail here, before any data is read.
    `parser_kwargs` go to the `ArgumentParser` (`prog`, `description`, `formatter_class`)."""
    parser = TrainingArgumentParser(**parser_kwargs)
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
    # Read at export, after training: a wrong path must stop the run before it starts, not after.
    if model_args.widget_image and not Path(model_args.widget_image).is_file():
        raise ValueError(f"--widget_image '{model_args.widget_image}' is not a file")
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
    from ..data.shard_splits import SHARD_DATASETS, resolve_data_files

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
    return VisionGPTConfig(vision_config=vision_config, text_config=text_config, **model_overrides(model_args))


def build_model_and_processor(model_args: ModelArguments):
    if model_args.model_name_or_path:
        model = VisionGPTForConditionalGeneration.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
        model.set_frozen(vision=model_args.freeze_vision, text=model_args.freeze_text,
                         text_layers=model_args.freeze_text_layers)
        processor = VisionGPTProcessor.from_pretrained(model_args.model_name_or_path)
        processor.use_image_tokens_of(model.config)  # a processor saved before it knew them
        return model, processor
    return assemble(model_args.vision_model, model_args.text_model, **model_overrides(model_args))
