"""VisionGPT's `image-to-text` and `image-text-to-text` pipelines, shipped through `custom_pipelines` in the model's
`config.json`."""

import torch
from transformers import GenerationConfig, ImageTextToTextPipeline, Pipeline

from .compat_vision_gpt import pipeline_generate_kwargs


class VisionGPTImageToTextPipeline(Pipeline):
    r"""
    Captions images: `captioner(image)` returns `[{"generated_text": caption}]`; a list of images returns one such
    list per image. Images may be PIL images, paths, URLs (where the network allows), numpy arrays or tensors.
    Generation arguments (`max_new_tokens`, `num_beams`, `do_sample`, `num_return_sequences`, `generate_kwargs`, ...)
    go to `model.generate`; `prompt` makes every caption start with the given text. With `return_caption_scores=True`
    each caption comes with its `confidence` and `grounding` (see `VisionGPTCaptionScores`).

    Example:

    ```python
    >>> from transformers import pipeline
    >>> captioner = pipeline("image-to-text", model="user/vision-gpt-flickr8k", trust_remote_code=True)
    >>> captioner("photo.jpg")
    [{'generated_text': '...'}]
    >>> captioner("photo.jpg", return_caption_scores=True)
    [{'generated_text': '...', 'confidence': 0.61, 'grounding': 1.93}]
    ```"""

    _load_processor = True
    _load_image_processor = False
    _load_tokenizer = False
    _load_feature_extractor = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=32)

    def _sanitize_parameters(self, prompt=None, max_new_tokens=None, generate_kwargs=None, return_caption_scores=None,
                             **kwargs):
        preprocess_params = {} if prompt is None else {"prompt": prompt}
        forward_params = dict(generate_kwargs or {})
        if return_caption_scores:
            forward_params["output_caption_scores"] = True
        if max_new_tokens is not None:
            if "max_new_tokens" in forward_params:
                raise ValueError("`max_new_tokens` was given both directly and in `generate_kwargs`; give it once.")
            forward_params["max_new_tokens"] = max_new_tokens
        forward_params.update(kwargs)
        return preprocess_params, forward_params, {}

    def __call__(self, images, **kwargs):
        return super().__call__(images, **kwargs)

    def preprocess(self, image, prompt=None):
        inputs = self.processor(images=image, text=prompt)
        return inputs.to(self.dtype) if self.dtype is not None else inputs

    def _forward(self, model_inputs, **generate_kwargs):
        generate_kwargs = pipeline_generate_kwargs(self, generate_kwargs)
        output = self.model.generate(**model_inputs, **generate_kwargs)
        # (B * n, L) -> (B, n, L), so that batching splits return sequences by image; scores (B * n,) -> (B, n).
        batch_size = model_inputs["pixel_values"].shape[0]
        if isinstance(output, torch.Tensor):
            return {"sequences": output.view(batch_size, -1, output.shape[-1])}
        scores = output.caption_scores
        return {"sequences": output.sequences.view(batch_size, -1, output.sequences.shape[-1]),
                "confidence": scores.confidence.view(batch_size, -1), "grounding": scores.grounding.view(batch_size, -1)}

    def postprocess(self, model_outputs):
        sequences = model_outputs["sequences"]
        sequences = sequences.reshape(-1, sequences.shape[-1])
        captions = [{"generated_text": caption} for caption in self.processor.batch_decode(sequences)]
        if "confidence" in model_outputs:
            for caption, confidence, grounding in zip(captions, model_outputs["confidence"].reshape(-1).tolist(),
                                                      model_outputs["grounding"].reshape(-1).tolist()):
                caption.update(confidence=confidence, grounding=grounding)
        return captions


class VisionGPTImageTextToTextPipeline(ImageTextToTextPipeline):
    r"""
    transformers' `image-text-to-text` pipeline (a prompt, or chat messages, with images), which can also return each
    answer's trust scores: with `return_caption_scores=True` every output dict has `confidence` and `grounding` next to
    `generated_text`, for the generated tokens only (the prompt is not scored; see `VisionGPTCaptionScores`). Without
    it, it is transformers' pipeline unchanged.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> answerer = pipeline("image-text-to-text", model="user/vision-gpt-flickr8k", trust_remote_code=True)
    >>> answerer(images="photo.jpg", text="a photo of", return_caption_scores=True)
    [{'input_text': 'a photo of', 'generated_text': 'a photo of ...', 'confidence': 0.58, 'grounding': 1.71}]
    ```"""

    def _sanitize_parameters(self, return_caption_scores=None, **kwargs):
        preprocess_params, forward_params, postprocess_params = super()._sanitize_parameters(**kwargs)
        if return_caption_scores:
            forward_params["return_caption_scores"] = True
        return preprocess_params, forward_params, postprocess_params

    def _forward(self, model_inputs, generate_kwargs=None, return_caption_scores=False):
        if not return_caption_scores:
            return super()._forward(model_inputs, generate_kwargs=generate_kwargs)
        prompt_text = model_inputs.pop("text")
        input_ids = model_inputs["input_ids"]
        generate_kwargs = pipeline_generate_kwargs(self, dict(generate_kwargs or {}))
        output = self.model.generate(**model_inputs, **generate_kwargs, output_caption_scores=True)
        sequences, scores = output.sequences, output.caption_scores
        if sequences.shape[0] > input_ids.shape[0]:
            # Several returns per prompt: (B * n, L) -> (B, n, L) and scores (B * n,) -> (B, n), so that batching
            # splits them by prompt, as transformers' own pipeline shapes them.
            batch_size = input_ids.shape[0]
            sequences = sequences.view(batch_size, -1, sequences.shape[-1])
            scores.confidence, scores.grounding = scores.confidence.view(batch_size, -1), scores.grounding.view(
                batch_size, -1)
        return {"generated_sequence": sequences, "prompt_text": prompt_text, "input_ids": input_ids,
                "confidence": scores.confidence, "grounding": scores.grounding}

    def postprocess(self, model_outputs, **postprocess_params):
        confidence, grounding = model_outputs.pop("confidence", None), model_outputs.pop("grounding", None)
        if confidence is None:
            return super().postprocess(model_outputs, **postprocess_params)
        # Flat (n, L) sequences: every transformers release's postprocess reads them, one record per sequence in
        # order (older releases, 5.12 among them, keep only the first of several returns, and so the first score).
        sequences = model_outputs["generated_sequence"]
        model_outputs = {**model_outputs, "generated_sequence": sequences.reshape(-1, sequences.shape[-1])}
        records = super().postprocess(model_outputs, **postprocess_params)
        for record, value, pmi in zip(records, confidence.reshape(-1).tolist(), grounding.reshape(-1).tolist()):
            record.update(confidence=value, grounding=pmi)
        return records


__all__ = ["VisionGPTImageTextToTextPipeline", "VisionGPTImageToTextPipeline"]
