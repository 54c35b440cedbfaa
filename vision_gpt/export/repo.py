"""Write a model and its processor as Hub-ready repos: FP32 at the top, FP16 in `fp16/`, each with its model card."""

import copy
from pathlib import Path

import torch

from .model_card import render_model_card

FP16_SUBFOLDER = "fp16"


def export_repo(model, processor, output_dir, *, repo_id: str, fp16: bool = True, **card_fields) -> dict[str, Path]:
    """
    Save `model` and `processor` to `output_dir` as a complete Hub repo (FP32 safetensors, remote code, processor
    files, generation config, `README.md` model card) and, with `fp16=True`, the same repo in FP16 under
    `output_dir/fp16` (half the bytes; load it with `from_pretrained(repo, subfolder="fp16")` or from that folder).
    `card_fields` go to [`render_model_card`]. Returns the written folders by precision.
    """
    output_dir = Path(output_dir)
    if model.dtype != torch.float32:
        raise ValueError(f"export_repo expects an FP32 model (got {model.dtype}); it writes the FP16 copy itself.")
    folders = {"fp32": output_dir}
    if fp16:
        folders["fp16"] = output_dir / FP16_SUBFOLDER
    weights = {
        "fp32": "FP32 `model.safetensors`" + (f"; an FP16 copy in `{FP16_SUBFOLDER}/`" if fp16 else ""),
        "fp16": "FP16 `model.safetensors` (half the size of the FP32 repo's)",
    }
    # The repo's processor expands "<image>" as this model reads it, whatever the caller's was built for.
    processor = copy.copy(processor)
    processor.use_image_tokens_of(model.config)
    for precision, folder in folders.items():
        exported = model if precision == "fp32" else copy.deepcopy(model).to(torch.float16)
        exported.save_pretrained(folder)
        processor.save_pretrained(folder)
        card = render_model_card(exported, repo_id, weights_description=weights[precision], **card_fields)
        (folder / "README.md").write_text(card)
    return folders
