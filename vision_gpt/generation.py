"""Captions from a model for dataset records, shared by training's evaluations and `vision-gpt evaluate` (which
would otherwise import each other)."""

import torch


@torch.no_grad()
def generate_captions(model, processor, images, batch_size: int = 16, **generate_kwargs):
    """Captions for `CaptionedImage` records: `({image_id: caption}, {image_id: references})`."""
    from .data import pixel_values_for

    was_training = model.training
    model.eval()
    predictions, references = {}, {}
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            pixels = torch.cat([pixel_values_for(r.image, processor.image_processor) for r in chunk])
            sequences = model.generate(pixel_values=pixels.to(model.device, model.dtype), **generate_kwargs)
            for record, caption in zip(chunk, processor.batch_decode(sequences)):
                predictions[record.image_id] = caption
                references[record.image_id] = record.captions
    finally:
        model.train(was_training)
    return predictions, references


__all__ = ["generate_captions"]
