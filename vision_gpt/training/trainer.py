"""`CaptionTrainer` (transformers' `Trainer` with caption metrics in evaluation) and its callbacks: staged unfreezing
and training plots."""

import logging
import math
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from ..inference.generation import generate_captions
from . import lora
from .arguments import BERTSCORE_KEYS, CAPTION_METRIC_KEYS, ModelArguments, NonFiniteLossError

logger = logging.getLogger("vision_gpt.training")


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
        if self.optimizer is not None:
            return super().create_optimizer(model)
        flags = [p.requires_grad for p in self.later_trainable]
        for parameter in self.later_trainable:
            parameter.requires_grad_(True)
        try:
            optimizer = super().create_optimizer(model)
        finally:
            for parameter, flag in zip(self.later_trainable, flags):
                parameter.requires_grad_(flag)
        if self.args.vision_learning_rate is not None:
            self._give_the_tower_its_learning_rate(optimizer)
        return optimizer

    def _give_the_tower_its_learning_rate(self, optimizer) -> None:
        # Trainer groups parameters by weight decay only; each group's tower parameters move to a group of their own
        # at --vision_learning_rate, before any step, so the scheduler (built after this) scales both groups alike.
        tower = {id(p) for p in self.accelerator.unwrap_model(self.model).vision_model.parameters()}
        for group in list(optimizer.param_groups):
            moved = [p for p in group["params"] if id(p) in tower]
            if moved:
                group["params"] = [p for p in group["params"] if id(p) not in tower]
                optimizer.add_param_group({**{k: v for k, v in group.items() if k != "params"}, "params": moved,
                                           "lr": self.args.vision_learning_rate})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]

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
            from ..evaluation.metrics import compute_caption_metrics
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
