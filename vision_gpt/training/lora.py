"""
LoRA adapters (PEFT) on the decoder and, optionally, the vision tower, for `scripts/train.py --lora_r`.

The adapters are injected into the captioner itself (`peft.inject_adapter_in_model`), so that training, evaluation,
generation and the projector stay those of the plain model. Checkpoints keep the plain model's weight names, loadable
by `from_pretrained`, with the adapters in PEFT's own files in their `adapters/` subfolder; resuming reads both. The
exported repo has the adapters merged into the weights, so it loads wherever `peft` is not installed; `--save_adapters`
also writes the unmerged model and the adapters as PEFT writes them.
"""

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Conv1D

ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A checkpoint's adapters are in this subfolder: transformers' `from_pretrained` would read PEFT files found next to the
# weights as adapters to inject.
CHECKPOINT_ADAPTERS = "adapters"
# PeftModel's prefix for the wrapped model's keys in `adapter_model.safetensors`
PEFT_PREFIX = "base_model.model."


@dataclass
class LoraSettings:
    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None  # layer names (`q_proj`, `c_attn`); None: every linear layer
    vision: bool = False


def _require_peft():
    try:
        import peft
    except ImportError:
        raise ImportError("LoRA training needs the `peft` package: pip install 'vision-gpt[lora]'.") from None
    return peft


def target_module_names(model, settings: LoraSettings) -> list[str]:
    """Full names of the linear layers (`nn.Linear`, GPT-2's `Conv1D`) to adapt: those of the decoder (and, with
    `settings.vision`, of the vision tower) whose own name is in `settings.target_modules`, or all of them."""
    parts = {"model.language_model": model.model.language_model}
    if settings.vision:
        parts["model.vision_model"] = model.model.vision_model
    # Not GPT-2's cross-attention layers: they are new and train whole already.
    layers = {f"{prefix}.{name}": name.rsplit(".", 1)[-1]
              for prefix, part in parts.items()
              for name, module in part.named_modules()
              if isinstance(module, (nn.Linear, Conv1D)) and ".crossattention." not in f".{name}."}
    if settings.target_modules is None:
        return sorted(layers)
    unknown = sorted(set(settings.target_modules) - set(layers.values()))
    if unknown:
        where = "the decoder or the vision tower" if settings.vision else "the decoder"
        raise ValueError(f"--lora_target_modules {unknown} name no linear layer of {where}; its linear layers are "
                         f"{sorted(set(layers.values()))}.")
    return sorted(name for name, short in layers.items() if short in settings.target_modules)


def add_adapters(model, settings: LoraSettings):
    """Inject LoRA adapters into `model` in place; returns their `peft.LoraConfig`. The model's own freezing stays as
    its config says (the projector trains), and the adapters train."""
    peft = _require_peft()
    if settings.r < 1 or settings.alpha <= 0 or not 0 <= settings.dropout < 1:
        raise ValueError(f"LoRA needs r >= 1, alpha > 0 and dropout in [0, 1); got r={settings.r}, "
                         f"alpha={settings.alpha}, dropout={settings.dropout}.")
    config = peft.LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=target_module_names(model, settings),
        # GPT-2's Conv1D stores its weight (in, out); PEFT flips the flag back for nn.Linear layers of the tower.
        fan_in_fan_out=model.config.is_gpt2 and not settings.vision,
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    model.apply_freezing()  # PEFT froze everything but the adapters
    return config


def has_adapters(model) -> bool:
    return any(is_adapter_key(name) for name, _ in model.named_parameters())


def is_adapter_key(name: str) -> bool:
    # PEFT's LoRA weights (`...q_proj.lora_A.default.weight`); the model's `apply_freezing` knows them by this name too.
    return ".lora_" in name


def base_key(name: str) -> str:
    """A wrapped layer's weight name as the plain model names it (`q_proj.base_layer.weight` -> `q_proj.weight`)."""
    return name.replace(".base_layer.", ".")


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """The plain model's weights, unmerged, under the plain model's names."""
    return {base_key(name): value for name, value in model.state_dict().items() if not is_adapter_key(name)}


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """The adapter weights as `PeftModel.save_pretrained` names them."""
    peft = _require_peft()
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    return {PEFT_PREFIX + name: value.detach().contiguous() for name, value in state.items()}


def save_adapters(model, folder, base_model_name_or_path: str | None = None) -> None:
    """`adapter_config.json` and `adapter_model.safetensors`, PEFT's files, in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    config.base_model_name_or_path = base_model_name_or_path
    config.save_pretrained(str(folder))


def load_checkpoint(model, folder) -> None:
    """Read a checkpoint written during a LoRA run into `model` (which has the same adapters): the plain weights
    through `from_pretrained` (whose conversions map names that transformers changes on save), then the adapters."""
    peft = _require_peft()
    folder = Path(folder)
    adapter_file = folder / CHECKPOINT_ADAPTERS / ADAPTER_WEIGHTS
    if not adapter_file.is_file():
        raise FileNotFoundError(f"Checkpoint {folder} has no {ADAPTER_WEIGHTS}: it was not written by a LoRA run, or "
                                "its adapters were lost.")
    reference = type(model).from_pretrained(folder, dtype=torch.float32).state_dict()
    plain = {name: reference[base_key(name)] for name in model.state_dict() if not is_adapter_key(name)}
    result = model.load_state_dict(plain, strict=False)
    missing = [name for name in result.missing_keys if not is_adapter_key(name)]
    if missing:
        raise RuntimeError(f"Checkpoint {folder} lacks weights {missing[:8]}.")
    adapters = {name.removeprefix(PEFT_PREFIX): value for name, value in load_file(str(adapter_file)).items()}
    result = peft.set_peft_model_state_dict(model, adapters, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise RuntimeError(f"Checkpoint {folder}'s adapters do not fit this model: {unexpected[:8]}.")


def merge_adapters(model):
    """Merge every adapter into the weight it adapts and put the plain layer back: `model` becomes the plain model,
    computing what the adapted one did (up to float rounding)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            # safe_merge writes a new weight tensor: an in-place `.data` update would leave the packed copy that
            # `generate` keeps of the old weight (packed_linear_vision_gpt.py keys it on the tensor) in use.
            module.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def describe(model, settings: LoraSettings) -> str:
    """One line for the log: the adapters' size and where they are."""
    count = sum(p.numel() for name, p in model.named_parameters() if is_adapter_key(name))
    layers = json.dumps(sorted({name.rsplit(".", 1)[-1] for name in model.peft_config[ADAPTER_NAME].target_modules}))
    where = "decoder and vision tower" if settings.vision else "decoder"
    return (f"LoRA r={settings.r}, alpha={settings.alpha:g}, dropout={settings.dropout:g} on the {where}'s {layers} "
            f"layers: {count:,} adapter parameters")
