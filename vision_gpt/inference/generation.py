"""Captions from a model for dataset records, shared by training's evaluations and `vision-gpt evaluate`, and the
caption scores the app and the engine captioner report."""

import torch


@torch.no_grad()
def generate_captions(model, processor, images, batch_size: int = 16, progress: bool = False, **generate_kwargs):
    """Captions for `CaptionedImage` records: `({image_id: caption}, {image_id: references})`. `model` is a PyTorch
    model (put in eval mode for the run) or an `ONNXCaptioner`; `progress` shows a progress bar."""
    from tqdm.auto import tqdm

    from ..data.torch_datasets import pixel_values_for

    is_module = isinstance(model, torch.nn.Module)
    was_training = is_module and model.training
    if is_module:
        model.eval()
    predictions, references = {}, {}
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="captioning", unit=" batches", disable=not progress):
            chunk = images[start : start + batch_size]
            pixels = torch.cat([pixel_values_for(r.image, processor.image_processor) for r in chunk])
            sequences = model.generate(pixel_values=pixels.to(model.device, model.dtype), **generate_kwargs)
            for record, caption in zip(chunk, processor.batch_decode(sequences)):
                predictions[record.image_id] = caption
                references[record.image_id] = record.captions
    finally:
        if is_module:
            model.train(was_training)
    return predictions, references


def average_log_probs(output, eos_token_ids):
    """
    Average log-probability per generated token, up to and including the first end token, under the model's own
    next-token distribution (raw logits: before temperature or top-p). With the default `length_penalty=1.0` this is
    the quantity beam search reports as `sequences_scores`, so scores compare across decoding modes.
    """
    logits = torch.stack(output.logits, dim=1).float()  # (N, T, V)
    new_tokens = output.sequences[:, -logits.shape[1]:]  # (N, T)
    log_probs = logits.log_softmax(-1).gather(-1, new_tokens[..., None])[..., 0]  # (N, T)
    # GPT-2 pads with its end token, so "after the first end token" is what marks padding, not the id itself.
    is_end = torch.isin(new_tokens, torch.tensor(eos_token_ids, device=new_tokens.device)).long()
    keep = (is_end.cumsum(1) - is_end) == 0  # (N, T)
    return (log_probs * keep).sum(1) / keep.sum(1)



def one_line(text) -> str:
    """`text` on one line, its runs of whitespace (newlines included) collapsed to one space."""
    # Every output row is one line, which is what lets a resumed run find and drop a half-written last row.
    return " ".join(str(text).split())


__all__ = ["average_log_probs", "generate_captions", "one_line"]
