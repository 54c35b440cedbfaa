"""Write a model and its processor as Hub-ready repos: FP32 at the top, FP16 in `fp16/`, each with its model card."""

import copy
import shutil
from pathlib import Path

import torch

from .model_card import DEFAULT_WIDGET_IMAGE, WIDGET_IMAGE_NAME, card_license_for, render_model_card, widget_url

FP16_SUBFOLDER = "fp16"


def export_repo(model, processor, output_dir, *, repo_id: str, fp16: bool = True,
                widget_image: str | Path | None = DEFAULT_WIDGET_IMAGE, **card_fields) -> dict[str, Path]:
    """
    Save `model` and `processor` to `output_dir` as a complete Hub repo (FP32 safetensors, remote code, processor
    files, generation config, `README.md` model card) and, with `fp16=True`, the same repo in FP16 under
    `output_dir/fp16` (half the bytes; load it with `from_pretrained(repo, subfolder="fp16")` or from that folder).
    `widget_image` (default: a drawn example that ships with vision-gpt; None for none) is copied into the repo as
    `example.*` for the Hub's widget. `card_fields` go to [`render_model_card`] through [`write_model_card`]. Returns
    the written folders by precision.
    """
    output_dir = Path(output_dir)
    if model.dtype != torch.float32:
        raise ValueError(f"export_repo expects an FP32 model (got {model.dtype}); it writes the FP16 copy itself.")
    _check_widget_image(widget_image)  # before anything is written
    # Resolved once for both cards (a warning, where it is "other", once).
    card_fields["license"] = card_license_for(card_fields.get("license"), card_fields.pop("tower_licenses", None),
                                              card_fields["vision_model"], card_fields["text_model"])
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
        write_model_card(exported, processor, folder, repo_id=repo_id, widget_image=widget_image,
                         weights_description=weights[precision], **card_fields)
    return folders


def write_model_card(model, processor, folder, *, repo_id: str,
                     widget_image: str | Path | None = DEFAULT_WIDGET_IMAGE, **card_fields) -> Path:
    """
    Write `folder/README.md`, the model card of the saved repo in `folder` ([`render_model_card`] with
    `card_fields`), and copy `widget_image` next to it as `example.*` for the Hub's widget (None: no widget). The
    pipeline tag is `image-text-to-text` where the decoder is an instruct model (its tokenizer has a chat template),
    else `image-to-text`. Returns the card's path.
    """
    folder = Path(folder)
    _check_widget_image(widget_image)
    example = None
    if widget_image is not None:
        example = f"{WIDGET_IMAGE_NAME}{Path(widget_image).suffix.lower()}"
        shutil.copyfile(widget_image, folder / example)
    chat = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)
    card_fields.setdefault("pipeline_tag", "image-text-to-text" if chat else "image-to-text")
    card = render_model_card(model, repo_id, widget_url=widget_url(repo_id, example) if example else None,
                             **card_fields)
    (folder / "README.md").write_text(card)
    return folder / "README.md"


def _check_widget_image(widget_image) -> None:
    if widget_image is not None and not Path(widget_image).is_file():
        raise ValueError(f"The model card's widget image '{widget_image}' is not a file.")
