"""Trust scores for the captions a job writes: each caption's `confidence` and `grounding`
(`VisionGPTCaptionScores`), as the scores of the text written in its row.

`generate(..., output_caption_scores=True)` scores the tokens it generated. A row holds their decoded text, and
tokenizing that text again usually gives the same tokens; where it does not (a word the model spelled in unusual
pieces, whitespace that `one_line` collapsed), the row's text is scored instead, so that scoring a row's caption again
always reproduces its scores. A caption cut at `max_new_tokens` has no end token, and is scored without one: its row
says `truncated`."""

import math

import torch

# What `--rerank` can order a caption's candidates by.
RERANK_SCORES = ("confidence", "grounding", "combined")


def rerank_value(row: dict, score: str) -> float:
    """A caption's value for reranking by `score`. `combined` is log(confidence) + grounding, the mean over its tokens
    of 2 log p(token | image) - log p(token | no image): its likelihood with the image's part counted twice, the
    contrast of visual contrastive decoding (Leng et al., 2024) with alpha = 1."""
    if score == "combined":
        return math.log(max(row["confidence"], 1e-30)) + row["grounding"]
    return row[score]


@torch.no_grad()
def score_texts(model, processor, pixel_values: torch.Tensor, texts: list[str],
                truncated: list[bool] | None = None):
    """`VisionGPTCaptionScores` of `texts`, one per row of `pixel_values` `(N, C, H, W)`: each caption and its end
    token, or without the end token where `truncated` says so."""
    batch = processor(suffix=texts, truncation=False).to(model.device)
    labels = batch["labels"].clone()
    for row, cut in enumerate(truncated or []):
        if cut:  # the end token is the last scored position of a right-padded row
            labels[row, (labels[row] != -100).nonzero().max()] = -100
    return model.score_captions(pixel_values=pixel_values, input_ids=batch["input_ids"],
                                attention_mask=batch["attention_mask"], labels=labels)


def caption_trust(model, processor, pixel_values: torch.Tensor, output, texts: list[str]) -> list[dict]:
    """For each sequence of `output` (generate's, with `output_caption_scores=True` and no prompt) and the text written
    for it: `{"confidence", "grounding", "truncated"}` of that text. `pixel_values` has one row per image; the
    sequences are `len(texts) / images` per image, in order."""
    eos = model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    copies = len(texts) // pixel_values.shape[0]
    encoded = processor(suffix=texts, truncation=False)["labels"].tolist()
    confidence = output.caption_scores.confidence.tolist()
    grounding = output.caption_scores.grounding.tolist()
    rows, again = [], []
    for index, sequence in enumerate(output.sequences.tolist()):
        new = sequence[1:]  # after the start token
        end = next((position for position, token in enumerate(new) if token in eos), None)
        generated = new if end is None else new[:end]
        text_ids = [token for token in encoded[index] if token != -100][:-1]  # the caption, without its end token
        rows.append({"confidence": confidence[index], "grounding": grounding[index], "truncated": end is None})
        if text_ids != generated:
            again.append(index)
    if again:
        rescored = score_texts(model, processor, pixel_values[[index // copies for index in again]],
                               [texts[index] for index in again], [rows[index]["truncated"] for index in again])
        for position, index in enumerate(again):
            rows[index]["confidence"] = float(rescored.confidence[position])
            rows[index]["grounding"] = float(rescored.grounding[position])
    for row in rows:
        row["confidence"], row["grounding"] = round(row["confidence"], 6), round(row["grounding"], 6)
    return rows


def check_confidence_threshold(value: float | None, flag: str) -> None:
    """A confidence threshold outside [0, 1] (or NaN) is an error that names the flag and the range."""
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{flag} {value:g} is outside the range of confidence scores, [0, 1]: confidence is a "
                         "geometric-mean token probability. Pick a threshold such as 0.3.")


__all__ = ["RERANK_SCORES", "caption_trust", "check_confidence_threshold", "rerank_value", "score_texts"]
