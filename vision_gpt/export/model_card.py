"""The model card (`README.md`) of an exported repo, rendered from the project's `MODEL_CARD.md` template."""

import re
import sys
from importlib import metadata
from pathlib import Path

from huggingface_hub import EvalResult, ModelCardData

_PLACEHOLDER = re.compile(r"{{(\w+)}}")


def template_path() -> Path:
    """`MODEL_CARD.md` of a source checkout, or the copy a wheel installs under `share/vision-gpt/`."""
    candidates = [Path(__file__).resolve().parents[2] / "MODEL_CARD.md",
                  Path(sys.prefix) / "share" / "vision-gpt" / "MODEL_CARD.md"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"MODEL_CARD.md not found in {[str(c) for c in candidates]}; reinstall vision-gpt.")


def supported_versions() -> dict[str, str]:
    """The transformers and torch ranges vision-gpt declares (and CI tests at both ends), e.g. {"transformers":
    ">=5.20,<6", "torch": ">=2.4"}: from the installed package's metadata, or a source checkout's setup.cfg."""
    try:
        requirements = metadata.requires("vision-gpt") or []
    except metadata.PackageNotFoundError:
        setup_cfg = Path(__file__).resolve().parents[2] / "setup.cfg"
        requirements = setup_cfg.read_text().splitlines() if setup_cfg.is_file() else []
    ranges = {}
    for requirement in requirements:
        match = re.match(r"\s*(transformers|torch)\s*([<>=!~][^;]*)", requirement)
        if match:
            ranges[match.group(1)] = ",".join(sorted(part.strip() for part in match.group(2).split(","))[::-1])
    missing = {"transformers", "torch"} - set(ranges)
    if missing:
        raise RuntimeError(f"vision-gpt's requirements name no {sorted(missing)} range; reinstall vision-gpt.")
    return ranges


def _describe_fusion(config) -> tuple[str, str]:
    tokens = {
        "patches": f"all {config.num_image_tokens} patch tokens, projected",
        "pooled": f"the pooled image feature mapped to {config.num_visual_tokens} tokens (ClipCap-style)",
        "queries": f"{config.num_visual_tokens} learned queries attending over the patch tokens",
        "merged": f"{config.num_image_tokens} tokens, each a block of {config.patch_merge_size}x"
                  f"{config.patch_merge_size} neighbouring patch tokens concatenated and projected",
    }[config.visual_tokens]
    projector = {"linear": "a linear projection", "mlp": f"a 2-layer MLP ({config.projector_hidden_act})",
                 "identity": "no projection"}[config.projector_type]
    fusion = ("a visual prefix before the caption tokens" if config.fusion == "prefix"
              else "cross-attention from every GPT-2 block to the visual tokens")
    return fusion, f"{tokens}; {projector}"


def render_model_card(
    model,
    repo_id: str,
    *,
    vision_model: str,
    text_model: str,
    license: str = "mit",
    datasets: list[str] | None = None,
    dataset_name: str | None = None,
    metrics: dict[str, float] | None = None,
    training_description: str = "Not trained: assembled from pretrained encoders; the mapper is randomly initialised.",
    evaluation_description: str = "Not evaluated.",
    data_limitations: str = "the model has not been trained on captions yet",
    weights_description: str = "FP32 `model.safetensors`",
    merged_adapters: str | None = None,
) -> str:
    """Fill `MODEL_CARD.md` for `model`; `metrics` (name -> value) become the card's `model-index`. `merged_adapters`
    says what adapters were trained and merged into the weights (e.g. "LoRA rank 16"), which the model cannot show."""
    config = model.config
    eval_results = None
    if metrics:
        eval_results = [
            EvalResult(task_type="image-to-text", dataset_type=dataset_name or (datasets or ["custom"])[0],
                       dataset_name=dataset_name or (datasets or ["custom"])[0], metric_type=name.lower(),
                       metric_name=name, metric_value=round(float(value), 4))
            for name, value in metrics.items()
        ]
    card_data = ModelCardData(
        license=license, library_name="transformers", pipeline_tag="image-to-text", datasets=datasets or None,
        tags=["image-captioning", "vision-gpt", config.vision_config.model_type, config.text_config.model_type],
        model_name=repo_id.split("/")[-1], eval_results=eval_results,
    )
    summary = model.parameter_summary()
    fusion, mapper = _describe_fusion(config)
    generation = model.generation_config
    fields = {
        "card_data": card_data.to_yaml(),
        "model_name": repo_id.split("/")[-1],
        "repo_id": repo_id,
        "vision_model": vision_model,
        "text_model": text_model,
        "fusion_description": fusion,
        "mapper_description": mapper,
        "vision_status": "frozen" if config.freeze_vision else "fine-tuned",
        "text_status": ("frozen" if config.freeze_text else
                        f"fine-tuned, first {config.freeze_text_layers} blocks frozen" if config.freeze_text_layers
                        else "fine-tuned") + (f", with {merged_adapters} adapters merged" if merged_adapters else ""),
        "total_parameters": f"{summary['total']['total'] / 1e6:.1f}M",
        "trainable_parameters": f"{summary['total']['trainable'] / 1e6:.1f}M",
        "weights_description": weights_description,
        "generation_defaults": f"`num_beams={generation.num_beams}`, `max_new_tokens={generation.max_new_tokens}`",
        "training_description": training_description,
        "evaluation_description": evaluation_description,
        "data_limitations": data_limitations,
        "image_size": str(config.vision_config.image_size),
        "transformers_range": supported_versions()["transformers"],
        "torch_range": supported_versions()["torch"],
    }
    template = template_path().read_text()
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(fields))
    if missing:
        raise KeyError(f"MODEL_CARD.md uses placeholders with no value: {missing}")
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], template)
