"""
GPT-2, owned by vision-gpt: the decoder with its optional cross-attention over the visual tokens.

Why our own: generation needs control of GPT-2's insides that transformers' `GPT2LMHeadModel` does not offer through
public surfaces: a visual prefix prefilled once per image, and cross-attention keys and values kept once per image and
shared by all of its beams (see `VisionGPTCache`). Reaching into `GPT2Attention` for them broke with every
transformers release that changed its arguments (5.24 renamed `past_key_values` to `cache`). These modules depend only
on torch and on `Cache.update` / `Cache.get_seq_length`, and read the same `GPT2Config`.

Parameter names and shapes below the body are those of `GPT2Model` (`h.0.attn.c_attn.weight`, ..., Conv1D weights
stored `(in, out)`), so GPT-2 checkpoints load through a key map that only moves `GPT2LMHeadModel`'s `transformer.`
prefix, and that `load_gpt2_state_dict` asserts key by key, as nanoGPT's `from_pretrained` does.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Conv1D, GPT2Config, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer


class VisionGPTConv1D(Conv1D):
    """GPT-2's linear layer: `x @ weight + bias` with the weight stored `(in_features, out_features)`. A
    `transformers.Conv1D` (the same parameters), so that tools that know GPT-2's layers, such as PEFT's LoRA, take
    it."""

    def __init__(self, in_features: int, out_features: int):
        # normal(0, 0.02) as GPT-2's; a model re-initialises from its config (init_gpt2_weights)
        super().__init__(out_features, in_features)

    @property
    def in_features(self) -> int:
        return self.nx

    @property
    def out_features(self) -> int:
        return self.nf

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # `reshape` where Conv1D has `view`: a non-contiguous input (e.g. a transposed attention output) is taken too.
        out = torch.addmm(self.bias, hidden_states.reshape(-1, self.in_features), self.weight)
        return out.view(*hidden_states.shape[:-1], self.out_features)


class VisionGPTTokenEmbedding(nn.Embedding):
    """
    GPT-2's token embedding, which also reads the id one past the vocabulary (`num_embeddings`), vision-gpt's image
    placeholder (`VisionGPTConfig.image_token_id`), as a zero vector: the model writes the image's visual tokens over
    those positions, so that `get_input_embeddings()(input_ids)` works on ids that hold them, as transformers' VLMs
    allow. Every other id outside the vocabulary raises as usual.
    """

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        placeholders = input_ids == self.num_embeddings
        if not placeholders.any():
            return super().forward(input_ids)
        embeds = super().forward(input_ids.masked_fill(placeholders, 0))
        return embeds.masked_fill(placeholders[..., None], 0.0)


class VisionGPTCache(DynamicCache):
    """
    GPT-2's self-attention cache (a `DynamicCache`) that, with `fusion="cross_attention"`, also keeps each block's
    cross-attention keys and values over each image's visual tokens, `(images, H, L, hd)`: computed once, read by
    every later step, and returned with the cache, so that decoding can continue from it without the image.

    [`VisionGPTForConditionalGeneration.generate`] fills them once per image before beams are expanded, and all of an
    image's sequences (beams, returned sequences) attend to that one copy: a decoding step reads each image's keys and
    values once, not once per beam. The queries of an image's c sequences attend together as one `(c x T)`-query
    attention, the same arithmetic per query, since cross-attention has no mask between queries. Sequences stay within
    their image under every decoding strategy of `GenerationMixin`, so beam search reorders only the self-attention
    layers.

    On CPU a half-precision model keeps them in float32 (computed in its dtype, then upcast exactly): torch's CPU
    bfloat16 attention kernel is slow for a few queries against 197 keys (1.0 ms per layer at 8 images x 1 query, 0.16 ms
    in float32), and the scores are no less precise.
    """

    # per block: (keys, values), each (images, H, L, hd); None until the first forward with the image
    cross_keys_values: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    # fusion="prefix": how many of the first positions hold the visual prefix where the ids returned with this cache
    # do not show it (image tokens added by `generate`, or the image put before text without them); 0 otherwise
    num_prefix_positions: int = 0


def _split_heads(states: torch.Tensor, num_heads: int) -> torch.Tensor:
    batch_size, seq_len, hidden = states.shape
    return states.view(batch_size, seq_len, num_heads, hidden // num_heads).transpose(1, 2)  # (B, H, T, hd)


def _attention(query, key, value, mask, dropout: float, scale: float, eager: bool):
    """`(B, H, T, hd)` attention; `mask` is boolean (True: attend) and broadcastable to `(B, H, T, S)`, or None."""
    if not eager:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scale), None
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype), p=dropout)
    return torch.matmul(weights, value), weights


def _attention_over_parts(query, keys, values, scale: float):
    """
    `(B, H, T, hd)` attention over keys and values given in parts along the key axis, as over the joined ones: the
    parts' scores are joined, the keys and values are not, so they are never copied. The ONNX decoder attends this way
    to its cross-attention past and to the keys and values it computes in the call (all of them on the first step, an
    empty part after), so a step reads the cross past in place instead of copying it into a new tensor.
    """
    query = query * scale  # before the product, as SDPA's export does: an fp16 graph keeps its headroom
    scores = torch.cat([torch.matmul(query, key.transpose(-1, -2)) for key in keys], dim=-1)  # (B, H, T, S)
    weights = scores.softmax(dim=-1, dtype=torch.float32).to(values[0].dtype)
    pieces = weights.split([key.shape[-2] for key in keys], dim=-1)
    out = torch.matmul(pieces[0], values[0])
    for piece, value in zip(pieces[1:], values[1:]):
        out = out + torch.matmul(piece, value)
    return out


class VisionGPTAttention(nn.Module):
    """GPT-2's causal self-attention (`c_attn` projects to q, k, v) or cross-attention (`q_attn`; `c_attn` to k, v)."""

    def __init__(self, config, layer_idx: int, is_cross_attention: bool = False):
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        if hidden % self.num_heads:
            raise ValueError(f"GPT-2's n_embd={hidden} must be divisible by its n_head={self.num_heads}.")
        self.config, self.layer_idx, self.is_cross_attention = config, layer_idx, is_cross_attention
        self.scaling = (hidden // self.num_heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scaling /= float(layer_idx + 1)
        if is_cross_attention:
            self.q_attn = VisionGPTConv1D(hidden, hidden)
            self.c_attn = VisionGPTConv1D(hidden, 2 * hidden)
        else:
            self.c_attn = VisionGPTConv1D(hidden, 3 * hidden)
        self.c_proj = VisionGPTConv1D(hidden, hidden)
        self.attn_dropout = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def _eager(self) -> bool:
        # The attention implementation transformers set on the config (`attn_implementation=` / set_attn_implementation);
        # eager is the one that returns weights.
        return getattr(self.config, "_attn_implementation", None) == "eager"

    def cross_keys_values(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, L, D)` visual tokens -> keys and values `(B, H, L, hd)`, contiguous (every step reads them whole)."""
        keys, values = self.c_attn(image_embeds).split(image_embeds.shape[-1], dim=2)
        return _split_heads(keys, self.num_heads).contiguous(), _split_heads(values, self.num_heads).contiguous()

    def forward(self, hidden_states, mask=None, cache=None, cache_position=None, cross_keys_values=None,
                num_positions: int = 0):
        """
        Self-attention: `mask` is `(B, 1, T, S)` boolean or None (then causal over T with nothing cached), `cache` a
        transformers `Cache` updated in place, `num_positions` how many positions it holds with the new tokens.
        Cross-attention: `cross_keys_values` are `(images, H, L, hd)` for `B = images x c` sequences, image-major;
        every visual token is attended. Keys and values may also come as tuples of parts along L (the ONNX decoder's
        past and new ones), attended as if joined (`_attention_over_parts`).
        """
        batch_size, seq_len, hidden = hidden_states.shape
        dropout = self.attn_dropout if self.training else 0.0
        eager = self._eager()
        if self.is_cross_attention:
            keys, values = cross_keys_values
            in_parts = isinstance(keys, tuple)
            if in_parts and (eager or dropout):  # weights or dropout: the plain path, over the joined parts
                keys, values, in_parts = torch.cat(keys, dim=2), torch.cat(values, dim=2), False
            first = keys[0] if in_parts else keys
            images, dtype = first.shape[0], first.dtype
            if batch_size % images:
                raise ValueError(f"{batch_size} sequences cannot share the cross-attention keys of {images} images.")
            if eager:  # weights per sequence: attend over per-sequence copies
                keys, values = (states.repeat_interleave(batch_size // images, dim=0) for states in (keys, values))
                images = batch_size
            query = self.q_attn(hidden_states).view(images, -1, self.num_heads, hidden // self.num_heads)
            query = query.transpose(1, 2).to(dtype)  # (images, H, c x T, hd)
            if in_parts:
                out, weights = _attention_over_parts(query, keys, values, self.scaling), None
            else:
                out, weights = _attention(query, keys, values, None, dropout, self.scaling, eager)
        else:
            query, keys, values = (_split_heads(s, self.num_heads) for s in self.c_attn(hidden_states).split(hidden, 2))
            if cache is not None:
                # The 4th argument is `cache_kwargs` where a cache needs positions (static caches before 5.24); later
                # releases take the positions from the cache itself and ignore it.
                keys, values = cache.update(keys, values, self.layer_idx, {"cache_position": cache_position})
                if keys.shape[-2] > num_positions and (mask is None or mask.shape[-1] < keys.shape[-2]):
                    # A static cache returns all its slots, the unfilled ones too: they are never attended.
                    mask = _pad_mask(mask, cache_position, keys.shape[-2])
            if mask is None and seq_len > 1 and not eager:
                out = F.scaled_dot_product_attention(query, keys, values, dropout_p=dropout, is_causal=True,
                                                     scale=self.scaling)
                weights = None
            else:
                if mask is None and seq_len > 1:
                    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=query.device).tril()
                out, weights = _attention(query, keys, values, mask, dropout, self.scaling, eager)
        out = out.to(hidden_states.dtype).transpose(1, 2).reshape(batch_size, seq_len, hidden)
        return self.resid_dropout(self.c_proj(out)), weights


class VisionGPTTextMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        self.c_fc = VisionGPTConv1D(config.hidden_size, inner)
        self.act = ACT2FN[config.activation_function]
        self.c_proj = VisionGPTConv1D(inner, config.hidden_size)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, hidden_states):
        return self.dropout(self.c_proj(self.act(self.c_fc(hidden_states))))


class VisionGPTBlock(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_epsilon
        self.ln_1 = nn.LayerNorm(hidden, eps=eps)
        self.attn = VisionGPTAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(hidden, eps=eps)
        if config.add_cross_attention:
            self.crossattention = VisionGPTAttention(config, layer_idx, is_cross_attention=True)
            self.ln_cross_attn = nn.LayerNorm(hidden, eps=eps)
        self.mlp = VisionGPTTextMLP(config)

    def forward(self, hidden_states, mask=None, cache=None, cache_position=None, cross_keys=None, cross_values=None,
                num_positions: int = 0):
        # Cross keys and values come as separate tensors: reentrant gradient checkpointing detaches only the
        # block's top-level tensor arguments, and they depend on the mapper's graph.
        attn_out, self_weights = self.attn(self.ln_1(hidden_states), mask, cache, cache_position,
                                           num_positions=num_positions)
        hidden_states = hidden_states + attn_out
        cross_weights = None
        if cross_keys is not None:
            cross_out, cross_weights = self.crossattention(self.ln_cross_attn(hidden_states),
                                                           cross_keys_values=(cross_keys, cross_values))
            hidden_states = hidden_states + cross_out
        hidden_states = hidden_states + self.mlp(self.ln_2(hidden_states))
        return hidden_states, self_weights, cross_weights


class VisionGPTTextPreTrainedModel(PreTrainedModel):
    """
    A `PreTrainedModel` for vision-gpt's GPT-2, so that it carries its own config and attention implementation
    (transformers sets `attn_implementation` on each sub-model of a composite model) and initialises its own weights.
    """

    config: GPT2Config
    config_class = GPT2Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionGPTBlock"]
    _supports_sdpa = True

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from this file's source, which has attention modules that do not call its
        # `ALL_ATTENTION_FUNCTIONS`. Ours read `config._attn_implementation` at every call (`VisionGPTAttention._eager`),
        # so switching between eager and SDPA at any time is supported.
        return True

    @torch.no_grad()
    def _init_weights(self, module):
        if not init_gpt2_weights(module, self.config):
            super()._init_weights(module)


class VisionGPTTextModel(VisionGPTTextPreTrainedModel):
    """GPT-2's body: token and position embeddings, the blocks, the final layer norm (`GPT2Model`'s names)."""

    def __init__(self, config: GPT2Config):
        super().__init__(config)
        self.wte = VisionGPTTokenEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList(VisionGPTBlock(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.wte

    def set_input_embeddings(self, value: nn.Embedding):
        self.wte = value

    def cross_keys_values(self, image_embeds: torch.Tensor, dtype: torch.dtype | None = None):
        """Every block's cross-attention keys and values over `image_embeds` `(B, L, D)`, optionally cast to `dtype`."""
        return [
            tuple(states.to(dtype or states.dtype) for states in block.crossattention.cross_keys_values(image_embeds))
            for block in self.h
        ]

    def forward(self, inputs_embeds, position_ids, attention_mask=None, cache=None, cross_keys_values=None,
                output_attentions=False, output_hidden_states=False):
        """
        `inputs_embeds` `(B, T, D)`, `position_ids` `(B, T)`; `attention_mask` is None (every position attended), a 2D
        `(B, past + T)` 0/1 mask over the cached and new positions, or a 4D mask over the cache's full length (a static
        cache's, from GenerationMixin): boolean (True: attend) or additive (0: attend). `cross_keys_values`: per block,
        the cross-attention keys and values (`cross_keys_values()`, or those a `VisionGPTCache` keeps). Returns the
        last hidden states `(B, T, D)` and the hidden states, attentions and cross-attentions asked for (or None).
        """
        # A static cache reports its length as a tensor.
        past_len = int(cache.get_seq_length()) if cache is not None else 0
        seq_len = inputs_embeds.shape[1]
        cache_position = torch.arange(past_len, past_len + seq_len, device=inputs_embeds.device)
        mask = _self_attention_mask(attention_mask, past_len, seq_len, inputs_embeds.device)
        hidden_states = self.drop(inputs_embeds + self.wpe(position_ids))
        all_hidden, all_self, all_cross = (), (), ()
        for block in self.h:
            if output_hidden_states:
                all_hidden += (hidden_states,)
            keys, values = (None, None) if cross_keys_values is None else cross_keys_values[block.attn.layer_idx]
            hidden_states, self_weights, cross_weights = block(hidden_states, mask, cache, cache_position, keys, values,
                                                               num_positions=past_len + seq_len)
            if output_attentions:
                all_self += (self_weights,)
                all_cross += (cross_weights,) if cross_keys_values is not None else ()
        hidden_states = self.ln_f(hidden_states)
        if output_hidden_states:
            all_hidden += (hidden_states,)
        return hidden_states, all_hidden or None, all_self or None, all_cross or None


def _pad_mask(mask, cache_position: torch.Tensor, num_keys: int) -> torch.Tensor:
    """`mask` `(B, 1, T, S)` (None: causal) widened to `num_keys` keys, the keys past S never attended."""
    filled = int(cache_position[-1]) + 1
    if mask is None:
        keys = torch.arange(filled, device=cache_position.device)
        mask = (keys[None, :] <= cache_position[:, None])[None, None]  # (1, 1, T, S)
    return F.pad(mask, (0, num_keys - mask.shape[-1]), value=False)


def _self_attention_mask(attention_mask, past_len: int, seq_len: int, device) -> torch.Tensor | None:
    """The boolean `(B, 1, T, S)` self-attention mask (True: attend), or None where plain causal attention is exact."""
    if attention_mask is not None and attention_mask.dim() == 4:
        return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    if attention_mask is None:
        if past_len == 0 or seq_len == 1:
            return None  # causal with nothing cached, or one query that attends everything
        attention_mask = torch.ones(1, past_len + seq_len, dtype=torch.bool, device=device)
    total = attention_mask.shape[1]
    if total != past_len + seq_len:
        raise ValueError(
            f"`attention_mask` covers {total} positions, but the cache and the new tokens hold {past_len + seq_len}."
        )
    keys = torch.arange(total, device=device)
    queries = torch.arange(past_len, total, device=device)
    causal = keys[None, :] <= queries[:, None]  # (T, S)
    mask = causal[None] & attention_mask[:, None, :].bool()  # (B, T, S)
    # A left-padding query attends nothing else: let it attend itself, so that no softmax row is empty (NaN).
    mask |= keys[None, None, :] == queries[None, :, None]
    return mask[:, None]  # (B, 1, T, S)


def init_gpt2_weights(module: nn.Module, config) -> bool:
    """GPT-2's initialisation for our modules (True if `module` was one): normal(0, initializer_range), and the residual
    projections scaled by 1 / sqrt(2 x n_layer) as in the GPT-2 paper. transformers' `initialization` functions leave
    weights that loading already filled alone."""
    std = config.initializer_range
    if isinstance(module, VisionGPTConv1D):
        init.normal_(module.weight, mean=0.0, std=std)
        init.zeros_(module.bias)
        return True
    if isinstance(module, (VisionGPTAttention, VisionGPTTextMLP)):
        init.normal_(module.c_proj.weight, mean=0.0, std=std / math.sqrt(2 * config.n_layer))
        return True
    return False


def load_gpt2_state_dict(text_model: VisionGPTTextModel, lm_head: nn.Linear, state_dict: dict[str, torch.Tensor]):
    """
    Load a `GPT2LMHeadModel` state dict into our GPT-2 body and LM head. The key map moves the `transformer.` prefix
    and nothing else: every key and shape is asserted, as nanoGPT asserts its port, so that a GPT-2 variant with other
    weights fails here rather than loading half a model. GPT-2's old causal-mask buffers (`attn.bias`,
    `attn.masked_bias`) are not weights and are dropped; a checkpoint without `lm_head.weight` ties it to `wte`.
    """
    buffers = (".attn.bias", ".attn.masked_bias", ".crossattention.bias", ".crossattention.masked_bias")
    theirs = {k: v for k, v in state_dict.items() if not k.endswith(buffers)}
    head = theirs.pop("lm_head.weight", theirs.get("transformer.wte.weight"))
    body = {k.removeprefix("transformer."): v for k, v in theirs.items() if k.startswith("transformer.")}
    ours = text_model.state_dict()
    missing = sorted(set(ours) - set(body))
    unexpected = sorted({k for k in theirs if not k.startswith("transformer.")} | (set(body) - set(ours)))
    if missing or unexpected or head is None:
        raise ValueError(f"Not a GPT-2 state dict for this config: missing {missing[:8]}, unexpected {unexpected[:8]}.")
    for name, tensor in [*body.items(), ("lm_head.weight", head)]:
        expected = lm_head.weight if name == "lm_head.weight" else ours[name]
        if tensor.shape != expected.shape:
            raise ValueError(f"GPT-2 weight {name} has shape {tuple(tensor.shape)}, expected {tuple(expected.shape)}.")
    text_model.load_state_dict(body)
    if lm_head.weight is not text_model.wte.weight:  # untied: the head has its own weights
        with torch.no_grad():
            lm_head.weight.copy_(head)


__all__ = [
    "VisionGPTAttention",
    "VisionGPTBlock",
    "VisionGPTCache",
    "VisionGPTConv1D",
    "VisionGPTTextModel",
    "VisionGPTTextPreTrainedModel",
    "VisionGPTTokenEmbedding",
    "init_gpt2_weights",
    "load_gpt2_state_dict",
]
