"""
Cross-attention during generation over one copy of each image's keys and values, shared by all its sequences.

Why: beam search and `num_return_sequences` decode several sequences per image. GenerationMixin gives each sequence
its own copy of the image's cross-attention keys and values, and every decoding step then attends over every copy:
at 8 images x 5 beams x ViT-B/16's 197 tokens, 5x the memory traffic. Here the cache holds one copy per image
(`(B, H, L, hd)`), and the queries of an image's c sequences attend to it together as one `(c x T)`-query attention,
the same arithmetic per query, since cross-attention has no mask between queries.

On CPU, a bfloat16 model's cross keys and values are kept in float32 (computed in bfloat16, then upcast exactly): the
scaled-dot-product kernel that CPU bfloat16 takes is slow for a few queries against 197 keys (1.0 ms per layer at 8
images x 1 query; 0.16 ms for the same attention in float32; `benchmarks/bench_generate.py` has the end-to-end effect),
and the scores come out no less precise than in bfloat16.

`shared_cross_attention(model)` swaps GPT-2's cross-attention forward for the one here inside a `generate` call; it
takes the shared path only for caches that `VisionGPTForConditionalGeneration` prefilled (they carry
`vision_gpt_copies_per_image`), and everything else runs GPT-2's own forward.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, EncoderDecoderCache
from transformers.models.gpt2.modeling_gpt2 import GPT2Attention


def shared_cross_attention_cache(language_model: nn.Module, image_embeds: torch.Tensor,
                                 copies_per_image: int) -> EncoderDecoderCache:
    """
    A GPT-2 cache whose cross-attention holds each layer's keys and values over `image_embeds` `(B, L, D)` once per
    image, `(B, H, L, hd)`, for `copies_per_image` sequences per image; empty self-attention. On CPU they are kept in
    float32 whatever the model's dtype (computed in it, then upcast exactly).
    """
    config = language_model.config
    cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
    dtype = torch.float32 if image_embeds.device.type == "cpu" else image_embeds.dtype
    for block in language_model.transformer.h:
        attention = block.crossattention
        keys, values = attention.c_attn(image_embeds).split(attention.split_size, dim=2)  # (B, L, D) each
        shape = (*keys.shape[:2], attention.num_heads, attention.head_dim)
        # Contiguous: every decoding step reads them whole.
        keys, values = (
            states.view(shape).transpose(1, 2).to(dtype, memory_format=torch.contiguous_format)  # (B, H, L, hd)
            for states in (keys, values)
        )
        cache.cross_attention_cache.update(keys, values, attention.layer_idx)
        cache.is_updated[attention.layer_idx] = True
    cache.vision_gpt_copies_per_image = copies_per_image
    return cache


def unshare_cross_attention_cache(cache: EncoderDecoderCache, num_sequences: int) -> None:
    """Give each of the `num_sequences` sequences its own copy of its image's cross keys and values, laid out as
    GenerationMixin lays them out (image-major): needed when sequences move to another image's rows."""
    for layer in cache.cross_attention_cache.layers:
        copies = num_sequences // layer.keys.shape[0]
        if copies > 1:
            layer.keys = layer.keys.repeat_interleave(copies, dim=0)
            layer.values = layer.values.repeat_interleave(copies, dim=0)
    cache.vision_gpt_copies_per_image = 1


def _shared_layer(past_key_values, layer_idx: int):
    """The cross-attention cache layer of a cache prefilled by VisionGPT, or None (then GPT-2's own forward runs)."""
    if getattr(past_key_values, "vision_gpt_copies_per_image", None) is None:
        return None
    if not past_key_values.is_updated.get(layer_idx):
        return None
    return past_key_values.cross_attention_cache.layers[layer_idx]


def _shared_forward(attention: GPT2Attention):
    plain_forward = attention.forward

    def forward(hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                encoder_attention_mask=None, **kwargs):
        layer = _shared_layer(past_key_values, attention.layer_idx)
        if layer is None:
            return plain_forward(hidden_states, past_key_values=past_key_values, attention_mask=attention_mask,
                                 encoder_hidden_states=encoder_hidden_states,
                                 encoder_attention_mask=encoder_attention_mask, **kwargs)
        keys, values = layer.keys, layer.values  # (B, H, L, hd), one copy per image
        batch_size, seq_len, hidden = hidden_states.shape  # batch_size = B x copies, image-major
        images, heads, _, head_dim = keys.shape
        if batch_size % images:
            raise ValueError(f"{batch_size} sequences cannot share the cross-attention cache of {images} images.")
        mask = encoder_attention_mask
        if mask is not None:  # a mask per sequence: attend over per-sequence copies
            keys = keys.repeat_interleave(batch_size // images, dim=0)
            values = values.repeat_interleave(batch_size // images, dim=0)
            images = batch_size
            mask = mask if mask.dtype == torch.bool else mask.to(keys.dtype)
        query = attention.q_attn(hidden_states).view(images, -1, heads, head_dim).transpose(1, 2)  # (B, H, c*T, hd)
        out = F.scaled_dot_product_attention(query.to(keys.dtype), keys, values, attn_mask=mask,
                                             scale=attention.scaling)  # (B, H, c*T, hd)
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch_size, seq_len, hidden)
        return attention.resid_dropout(attention.c_proj(out)), None

    return forward


@contextmanager
def shared_cross_attention(model: nn.Module, enabled: bool = True):
    """Inside the block, GPT-2's cross-attention layers in `model` attend over shared per-image caches (see above)."""
    if not enabled:
        yield
        return
    layers = [
        module for module in model.modules()
        if isinstance(module, GPT2Attention) and module.is_cross_attention and "forward" not in module.__dict__
    ]
    for module in layers:
        module.forward = _shared_forward(module)
    try:
        yield
    finally:
        for module in layers:
            del module.forward
