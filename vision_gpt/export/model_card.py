"""The model card (`README.md`) of an exported repo, rendered from the project's `MODEL_CARD.md` template and laid
out as the Hub's model card guide lays one out: YAML metadata (license, language, base models, datasets, a widget, a
`model-index` of the measured metrics), then details, uses, limitations, getting started, training, evaluation and a
citation. Tests read it back with huggingface_hub's own `ModelCard`."""

import logging
import re
import sys
from importlib import metadata
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

logger = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"{{(\w+)}}")
# The first line of the card's body: `push_folder` reads the id the card was written for here, to re-address it.
REPO_ID_MARKER = re.compile(r"<!-- vision-gpt repo id: (\S+) -->")
# Metrics scored without generating (teacher-forced): no decoding settings apply to them.
TEACHER_FORCED_METRICS = ("loss", "perplexity")
# Where the image the Hub's widget shows goes in the repo.
WIDGET_IMAGE_NAME = "example"
DEFAULT_WIDGET_IMAGE = Path(__file__).resolve().parents[1] / "app" / "examples" / "beach.jpg"

# What each known training set teaches a captioner to see and say, for the card's limitations. Keys are lowercased
# `--card-dataset` / `--dataset` names.
DATASET_NOTES = {
    "flickr8k": (
        "Flickr8k (Hodosh et al., 2013): about 8,000 Flickr photos chosen from six groups, mostly people and dogs in "
        "everyday activities, each with five English captions written by crowd workers. Its captions name gender, "
        "age and ethnicity from appearance, and studies of captions collected the same way (van Miltenburg, 2016, "
        "on Flickr30k) found them stereotyped: the model repeats such guesses."),
    "flickr30k": (
        "Flickr30k (Young et al., 2014): about 31,000 Flickr photos of people in everyday activities, five English "
        "crowd-written captions each. Its captions guess gender, age and ethnicity from appearance and were found "
        "stereotyped (van Miltenburg, 2016): the model repeats such guesses."),
    "coco": (
        "COCO Captions (Chen et al., 2015): photos of 80 kinds of everyday objects, mostly from North America and "
        "Europe, five English crowd-written captions each. Captioners trained on it are known to guess gender from "
        "context rather than from the person (Hendricks et al., 2018)."),
    "vision-gpt-shapes": (
        "the vision-gpt shapes corpus, generated images of one to three coloured shapes (four kinds, six colours, "
        "three backgrounds): the model knows nothing else, and describes any other picture as shapes"),
}


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


def hub_model_id(name: str | None) -> str | None:
    """`name` when it names a Hub model (what `base_model` may list), None for a local folder or file, a GGUF file or
    a description such as a ported tower's."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).expanduser().exists() or str(name).lower().endswith(".gguf"):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def declared_license(source: str | None) -> str | None:
    """The license a tower's own model card declares: a local folder's `README.md`, or a Hub model's card (from the
    Hub, or from the cache when offline); None when there is no card or it declares none."""
    if not source:
        return None
    folder = Path(source).expanduser()
    try:
        if folder.is_dir():
            card = folder / "README.md"
            return ModelCard.load(card).data.license if card.is_file() else None
        if hub_model_id(source):
            return ModelCard.load(source).data.license
    except Exception as error:  # noqa: BLE001 - no network, no card, a card that does not parse: the license is unknown
        logger.debug("No license from %s's model card: %s", source, error)
    return None


def resolve_license(license: str | None, declared: dict[str, str | None]) -> str:
    """The card's license: `license` when given; else the one license every tower that declares one declares (towers
    with random weights declare none); else "other", with a warning that names the option to set it."""
    if license:
        return license
    known = {name: value for name, value in declared.items() if value}
    if known and len(set(known.values())) == 1:
        return next(iter(known.values()))
    if known:
        why = "the towers declare different licenses: " + ", ".join(f"{v} ({k})" for k, v in known.items())
    else:
        why = "no tower's model card declares a license"
    logger.warning("The model card's license is 'other': %s. Choose one with --license (license= in Python), "
                   "e.g. --license apache-2.0; the Hub's license ids are listed at "
                   "https://huggingface.co/docs/hub/repositories-licenses", why)
    return "other"


def card_license_for(license: str | None, tower_licenses: dict[str, str | None] | None, vision_model: str,
                     text_model: str) -> str:
    """[`resolve_license`] over `tower_licenses`, or, when it is None, over what the towers' own cards declare."""
    if license is None and tower_licenses is None:
        tower_licenses = {name: declared_license(name) for name in (vision_model, text_model)}
    return resolve_license(license, tower_licenses or {})


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
              else "cross-attention from every decoder block to the visual tokens")
    return fusion, f"{tokens}; {projector}"


def _decoding_name(decoding: dict) -> str:
    beams = decoding.get("num_beams", 1)
    how = "greedy" if beams == 1 and not decoding.get("do_sample") else (
        "sampling" if decoding.get("do_sample") else f"{beams} beams")
    return f"{how}, up to {decoding['max_new_tokens']} new tokens" if "max_new_tokens" in decoding else how


def _eval_results(metrics: dict, dataset: str, split: str, decoding: dict | None, pipeline_tag: str):
    results = []
    for name, value in metrics.items():
        generated = name.lower() not in TEACHER_FORCED_METRICS
        results.append(EvalResult(
            task_type=pipeline_tag, dataset_type=dataset, dataset_name=dataset, dataset_split=split,
            metric_type=name.lower().replace("-", "_"),
            metric_name=f"{name} ({_decoding_name(decoding)})" if generated and decoding else name,
            metric_value=round(float(value), 4), metric_args=dict(decoding) if generated and decoding else None))
    return results


def evaluation_section(metrics: dict | None, *, dataset: str, split: str, num_images: int | None,
                       decoding: dict | None) -> str:
    """The card's Evaluation text: the split, the decoding, and the metrics table (0-100 scores; loss per caption
    token)."""
    if not metrics:
        return "Not evaluated."
    lines = [f"Evaluated on the **{split}** split of {dataset}"
             + (f" ({num_images} images captioned for the caption metrics)" if num_images else "") + "."]
    if decoding:
        lines.append(f"Captions were generated with {_decoding_name(decoding)}: "
                     + ", ".join(f"`{k}={v}`" for k, v in decoding.items()) + ".")
    lines.append("Scores are on the 0-100 scale (pycocoevalcap's, as captioning papers report them); loss and "
                 "perplexity are per caption token, teacher-forced.\n")
    lines += ["| metric | value |", "|---|---:|"] + [f"| {name} | {value:.2f} |" for name, value in metrics.items()]
    return "\n".join(lines)


def render_model_card(
    model,
    repo_id: str,
    *,
    vision_model: str,
    text_model: str,
    pipeline_tag: str = "image-to-text",
    license: str | None = None,
    language: list[str] | tuple[str, ...] = ("en",),
    base_models: list[str] | None = None,
    tower_licenses: dict[str, str | None] | None = None,
    datasets: list[str] | None = None,
    dataset_name: str | None = None,
    dataset_split: str = "validation",
    metrics: dict[str, float] | None = None,
    decoding: dict | None = None,
    num_scored_images: int | None = None,
    training_data: str | None = None,
    training_description: str = "Not trained: assembled from pretrained towers; the projector is randomly "
                                "initialised.",
    compute_description: str = "None: the model has not been trained.",
    data_limitations: str | None = None,
    weights_description: str = "FP32 `model.safetensors`",
    merged_adapters: str | None = None,
    widget_url: str | None = None,
) -> str:
    """
    Fill `MODEL_CARD.md` for `model` as the Hub's model card guide lays a card out.

    `vision_model` / `text_model` describe the towers (a Hub id, a folder's name, or a description); `base_models`
    (default: those of them that are Hub ids) become `base_model`, so the Hub's model tree links them.
    Without `license`, the card's comes from the towers' own (`tower_licenses`, name -> license or None; default:
    what [`declared_license`] finds for `vision_model` and `text_model`), as [`resolve_license`] decides. `metrics` (name -> value, measured on `dataset_split` with `decoding`) become the
    card's `model-index` and Evaluation table. `merged_adapters` says what adapters were trained and merged into the
    weights (e.g. "LoRA rank 16"), which the model cannot show.
    """
    config = model.config
    dataset = dataset_name or (datasets or ["custom"])[0]
    if base_models is None:
        base_models = [name for name in (hub_model_id(vision_model), hub_model_id(text_model)) if name]
    card_license = card_license_for(license, tower_licenses, vision_model, text_model)
    card_data = ModelCardData(
        license=card_license, language=list(language), library_name="transformers", pipeline_tag=pipeline_tag,
        base_model=base_models or None, datasets=datasets or None,
        tags=["image-captioning", "vision-gpt", config.vision_config.model_type, config.text_config.model_type],
        model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(metrics, dataset, dataset_split, decoding, pipeline_tag) if metrics else None,
        widget=[{"src": widget_url, "example_title": "Example image"}] if widget_url else None,
    )
    summary = model.parameter_summary()
    fusion, mapper = _describe_fusion(config)
    generation = model.generation_config
    notes = DATASET_NOTES.get(dataset.lower())
    versions = supported_versions()
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
        "license": card_license,
        "languages": ", ".join(language),
        "base_models": ", ".join(f"[`{name}`](https://huggingface.co/{name})" for name in base_models) or
                       "none from the Hub (local or generated towers)",
        "pipeline_tag": pipeline_tag,
        "generation_defaults": f"`num_beams={generation.num_beams}`, `max_new_tokens={generation.max_new_tokens}`",
        "training_data": training_data or (notes[:1].upper() + notes[1:] if notes else f"{dataset}."),
        "training_description": training_description,
        "compute_description": compute_description,
        "evaluation_description": evaluation_section(metrics, dataset=dataset, split=dataset_split,
                                                     num_images=num_scored_images, decoding=decoding),
        "data_limitations": data_limitations or (f"it was trained on {notes}" if notes else
                                                 f"it was trained on {dataset} only"),
        "image_size": str(config.vision_config.image_size),
        "vision_gpt_version": _version(),
        "transformers_range": versions["transformers"],
        "torch_range": versions["torch"],
    }
    template = template_path().read_text()
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(fields))
    if missing:
        raise KeyError(f"MODEL_CARD.md uses placeholders with no value: {missing}")
    return _PLACEHOLDER.sub(lambda match: fields[match.group(1)], template)


def _version() -> str:
    """vision-gpt's version, from the installed package's metadata (the package's `__init__` sits above this
    module)."""
    try:
        return metadata.version("vision-gpt")
    except metadata.PackageNotFoundError:
        return "(uninstalled source)"


def widget_url(repo_id: str, filename: str) -> str:
    """Where the Hub serves a file of the repo `repo_id` (the widget's example image)."""
    return f"https://huggingface.co/{repo_id}/resolve/main/{filename}"


def readdress_model_card(text: str, repo_id: str) -> str:
    """A card written for one repo id, re-addressed to `repo_id` (where `vision-gpt push` uploads it): its usage
    lines and widget URL. A card without vision-gpt's marker comes back unchanged."""
    match = REPO_ID_MARKER.search(text)
    if match is None or match.group(1) == repo_id:
        return text
    old, old_name, name = match.group(1), match.group(1).split("/")[-1], repo_id.split("/")[-1]
    text = text.replace(match.group(0), f"<!-- vision-gpt repo id: {repo_id} -->")
    text = text.replace(f"huggingface.co/{old}/resolve/", f"huggingface.co/{repo_id}/resolve/")
    # The id as the usage lines write it: quoted in Python, a word in shell commands.
    text = re.sub(rf"(?<![\w./-]){re.escape(old)}(?![\w./-])", repo_id, text)
    # The title and the model-index entry's name.
    text = re.sub(rf"^# {re.escape(old_name)}$", f"# {name}", text, count=1, flags=re.MULTILINE)
    return re.sub(rf"^- name: {re.escape(old_name)}$", f"- name: {name}", text, count=1, flags=re.MULTILINE)
