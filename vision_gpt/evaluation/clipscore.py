"""CLIPScore and RefCLIPScore (Hessel et al., 2021, https://arxiv.org/abs/2104.08718): how well a caption fits its
image in CLIP's embedding space, with no references needed (CLIPScore), or combined with the references
(RefCLIPScore).

    CLIPScore(c, v)       = w * max(cos(E_c, E_v), 0),                   w = 2.5
    RefCLIPScore(c, R, v) = H-mean(CLIPScore(c, v), max(max_r cos(E_c, E_r), 0))

as the paper defines them (w is its rescaling, which changes no ranking), with each caption prefixed by "A photo
depicts", as in the paper's code (CLIP learnt from alt-text). Scores are means over images, on the 0-100 scale of the
other caption metrics. Scores from different CLIP models are not comparable.
"""

from dataclasses import dataclass

import torch

DEFAULT_MODEL = "openai/clip-vit-base-patch32"  # the paper's model
CLIP_WEIGHT = 2.5
PROMPT = "A photo depicts "


@dataclass(frozen=True)
class CLIPScoreSettings:
    model: str = DEFAULT_MODEL
    prompt: str = PROMPT
    batch_size: int = 32
    flag: str = "--clipscore-model"  # how the user named the model, for error messages


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older releases, a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScorer:
    """
    A loaded CLIP model that scores captions against their images (and references).

    Example:

    ```python
    >>> scorer = CLIPScorer(CLIPScoreSettings())
    >>> scorer.per_image([image], ["a dog runs on the grass"])
    [{'clipscore': 78.1}]
    ```"""

    def __init__(self, settings: CLIPScoreSettings, device: str | None = None):
        from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, CLIPConfig

        try:
            config = AutoConfig.from_pretrained(settings.model)
        except (OSError, ValueError) as error:
            raise ValueError(f"{settings.flag} {settings.model!r} could not be loaded: {str(error).splitlines()[0]} "
                             "Pass a CLIP model's folder or Hub id (e.g. openai/clip-vit-base-patch32); offline, a Hub "
                             "model must already be in the cache.") from None
        if not isinstance(config, CLIPConfig):
            raise ValueError(f"{settings.flag} {settings.model!r} is a {config.model_type} model, not a CLIP model "
                             "(CLIPScore is defined on CLIP's image and text embeddings).")
        self.settings = settings
        self.device = torch.device(device or "cpu")
        self.model = AutoModel.from_pretrained(settings.model).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(settings.model)
        except ImportError:  # the torchvision-backed default without torchvision: CLIP's PIL implementation
            from transformers import CLIPImageProcessorPil

            self.image_processor = CLIPImageProcessorPil.from_pretrained(settings.model)
        self.max_length = config.text_config.max_position_embeddings
        self.description = (f"CLIPScore: {settings.model}, w = {CLIP_WEIGHT}, captions prefixed with "
                            f"{settings.prompt.strip()!r}; scores from other CLIP models are not comparable")

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """`(N, D)` unit-norm text embeddings."""
        chunks = []
        for start in range(0, len(texts), self.settings.batch_size):
            tokens = self.tokenizer(texts[start : start + self.settings.batch_size], padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt").to(self.device)
            chunks.append(_features(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                                 attention_mask=tokens["attention_mask"])))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: list) -> torch.Tensor:
        """`(N, D)` unit-norm image embeddings for PIL images."""
        chunks = []
        for start in range(0, len(images), self.settings.batch_size):
            pixels = self.image_processor(images=images[start : start + self.settings.batch_size],
                                          return_tensors="pt")["pixel_values"].to(self.device, self.model.dtype)
            chunks.append(_features(self.model.get_image_features(pixel_values=pixels)))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)

    @torch.no_grad()
    def score_pixels(self, pixel_values: torch.Tensor, captions: list[str]) -> list[float]:
        """CLIPScore (0-100) of each caption for its image, from pixels `(N, C, H, W)` made by `image_processor`."""
        text = self.embed_texts([self.settings.prompt + caption.strip() for caption in captions])  # (N, D)
        image = _features(self.model.get_image_features(pixel_values=pixel_values.to(self.device, self.model.dtype)))
        cosines = (text * torch.nn.functional.normalize(image.float(), dim=-1)).sum(-1)  # (N,)
        return [100.0 * CLIP_WEIGHT * max(float(cos), 0.0) if caption.strip() else 0.0
                for cos, caption in zip(cosines, captions)]

    def per_image(self, images: list, captions: list[str], references: list[list[str]] | None = None) -> list[dict]:
        """`{"clipscore"}` (and `{"refclipscore"}` with references) for each image, 0-100."""
        if len(images) != len(captions):
            raise ValueError(f"Got {len(images)} images but {len(captions)} captions.")
        if references is not None and len(references) != len(captions):
            raise ValueError(f"Got {len(captions)} captions but {len(references)} reference lists.")
        text = self.embed_texts([self.settings.prompt + caption.strip() for caption in captions])  # (N, D)
        clip = CLIP_WEIGHT * (text * self.embed_images(images)).sum(-1).clamp(min=0)  # (N,)
        # An empty caption says nothing about its image: 0, not the score of the bare prompt.
        clip = torch.where(torch.tensor([bool(c.strip()) for c in captions]), clip, torch.zeros_like(clip))
        rows = [{"clipscore": 100.0 * float(value)} for value in clip]
        if references is None:
            return rows
        flat = [ref.strip() for refs in references for ref in refs if isinstance(ref, str) and ref.strip()]
        counts = [sum(1 for ref in refs if isinstance(ref, str) and ref.strip()) for refs in references]
        if 0 in counts:
            raise ValueError(f"Image {counts.index(0)} has no non-empty reference caption; RefCLIPScore needs one.")
        # References get the same prompt as the captions, so that the two are compared alike.
        ref_embeddings = self.embed_texts([self.settings.prompt + ref for ref in flat]).split(counts)
        for row, caption_embedding, refs, score in zip(rows, text, ref_embeddings, clip):
            best = (refs @ caption_embedding).max().clamp(min=0)
            harmonic = 2 * score * best / (score + best) if score + best > 0 else torch.tensor(0.0)
            row["refclipscore"] = 100.0 * float(harmonic)
        return rows

    def __call__(self, images: list, captions: list[str], references: list[list[str]] | None = None) -> dict:
        """Mean CLIPScore (and RefCLIPScore) over images, 0-100, with the model named."""
        if not captions:
            raise ValueError("There are no captions to score.")
        rows = self.per_image(images, captions, references)
        means = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
        return {**means, "clipscore_model": self.description}


__all__ = ["CLIP_WEIGHT", "DEFAULT_MODEL", "CLIPScoreSettings", "CLIPScorer"]
