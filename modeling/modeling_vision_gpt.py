"""VisionGPT: a vision tower, a trainable mapper and a causal LM decoder (GPT-2 by default), as one transformers model
that generates captions."""

import copy
import inspect
import math
from dataclasses import field, make_dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput

from .compat_vision_gpt import CACHE_NAME, resolve_cache_argument
from .configuration_vision_gpt import VisionGPTConfig
from .generation_vision_gpt import VisionGPTGenerationMixin
from .gpt2_vision_gpt import (
    VisionGPTCache,
    VisionGPTTextModel,
    VisionGPTTextPreTrainedModel,
    VisionGPTTokenEmbedding,
    init_gpt2_weights,
    load_gpt2_state_dict,
)

# Imported so that `save_pretrained` and the Hub's remote-code loader, which follow relative imports, always carry the
# whole published package (processor and pipeline included) with the model.
from .pipeline_vision_gpt import VisionGPTImageToTextPipeline  # noqa: F401
from .processing_vision_gpt import VisionGPTProcessor, text_model_source  # noqa: F401


_OUTPUT_DOC = r"""
    The output of [`VisionGPTForConditionalGeneration`].

    loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `labels` is provided):
        Cross-entropy over the caption tokens (labels of `-100` are ignored).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Next-token scores at each position of `input_ids` (image tokens included): `logits[:, i]` predicts
        `input_ids[:, i + 1]`. A visual prefix put before text without image tokens gets none.
    cache (`Cache`, *optional*; named `past_key_values` on transformers releases before 5.24):
        GPT-2's self-attention key/value cache; with `fusion="prefix"` it holds the visual prefix too.
    hidden_states (`tuple[torch.FloatTensor]`, *optional*, returned with `output_hidden_states=True`):
        GPT-2's input embeddings and each block's output, `(batch_size, positions, hidden_size)`; with a visual prefix
        the positions include it.
    attentions (`tuple[torch.FloatTensor]`, *optional*, returned with `output_attentions=True`):
        Each GPT-2 block's self-attention weights (eager attention only; SDPA computes none).
    image_embeds (`torch.FloatTensor` of shape `(batch_size, num_image_tokens, hidden_size)`, *optional*):
        The mapped visual tokens that GPT-2 saw.
    cross_attentions (`tuple[torch.FloatTensor]`, *optional*, returned with `output_attentions=True`):
        With `fusion="cross_attention"`, each GPT-2 block's attention weights over the visual tokens, `(batch_size,
        num_heads, sequence_length, num_image_tokens)`: where each caption token looked. Like `attentions`, filled
        only by attention implementations that compute weights (`attn_implementation="eager"`); SDPA leaves them empty.
    image_outputs (`BaseModelOutputWithPooling`, *optional*):
        `get_image_features`' output for the images encoded in this call: the vision tower's states (its hidden states
        and attentions with `output_hidden_states` / `output_attentions`) and, as `pooler_output`, `image_embeds`.
"""

_MODEL_OUTPUT_DOC = r"""
    The output of [`VisionGPTModel`]: GPT-2's last hidden states, before the LM head.

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, positions, hidden_size)`):
        GPT-2's final-layer states at every position it read in this call (with `fusion="prefix"` on the first pass,
        the visual prefix first, then the text).
    cache, hidden_states, attentions, image_embeds, cross_attentions, image_outputs:
        As in [`VisionGPTOutput`].
"""


def _output_class(name: str, fields: list[tuple[str, type]], doc: str):
    """A `ModelOutput` dataclass whose cache field takes the name the installed transformers gives it
    (`compat_vision_gpt.py`): GenerationMixin reads it from the output by that name."""
    return make_dataclass(
        name,
        [(field_name, field_type | None, field(default=None)) for field_name, field_type in fields],
        bases=(ModelOutput,),
        namespace={"__doc__": doc, "__module__": __name__},
    )


_SHARED_FIELDS = [
    (CACHE_NAME, Cache),
    ("hidden_states", tuple[torch.FloatTensor, ...]),
    ("attentions", tuple[torch.FloatTensor, ...]),
    ("image_embeds", torch.FloatTensor),
    ("cross_attentions", tuple[torch.FloatTensor, ...]),
    ("image_outputs", BaseModelOutputWithPooling),
]
VisionGPTModelOutput = _output_class(
    "VisionGPTModelOutput", [("last_hidden_state", torch.FloatTensor), *_SHARED_FIELDS], _MODEL_OUTPUT_DOC
)
VisionGPTOutput = _output_class(
    "VisionGPTOutput", [("loss", torch.FloatTensor), ("logits", torch.FloatTensor), *_SHARED_FIELDS], _OUTPUT_DOC
)


class VisionGPTMLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int, hidden_act: str):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = ACT2FN[hidden_act]
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, hidden_states):
        return self.fc2(self.act(self.fc1(hidden_states)))


def _projection(config: VisionGPTConfig, in_features: int, out_features: int) -> nn.Module:
    if config.projector_type == "identity":
        return nn.Identity()
    if config.projector_type == "linear":
        return nn.Linear(in_features, out_features)
    hidden = config.projector_hidden_size or config.text_config.hidden_size
    return VisionGPTMLP(in_features, hidden, out_features, config.projector_hidden_act)


class VisionGPTQueryAttention(nn.Module):
    """Multi-head attention of the learned queries over the projected patch tokens."""

    def __init__(self, config: VisionGPTConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        self.num_heads = config.text_config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.kv_proj = nn.Linear(hidden, 2 * hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, queries, keys_values):
        batch_size, num_queries, hidden = queries.shape
        q = self.q_proj(queries).view(batch_size, num_queries, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(keys_values).view(batch_size, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, K, hd)
        return self.out_proj(out.transpose(1, 2).reshape(batch_size, num_queries, hidden))


class VisionGPTProjector(nn.Module):
    """
    Maps the vision tower's features `(B, N, Dv)` to the visual tokens GPT-2 reads, `(B, num_image_tokens, D)`:
    every patch token projected (`"patches"`), the pooled feature mapped to K tokens as in ClipCap (`"pooled"`, where
    N is 1), K learned queries attending over the projected patches (`"queries"`, a one-block Perceiver resampler), or
    each block of m x m neighbouring patches concatenated and projected (`"merged"`, as Qwen2-VL's patch merger).
    """

    def __init__(self, config: VisionGPTConfig):
        super().__init__()
        self.visual_tokens = config.visual_tokens
        self.num_visual_tokens = config.num_visual_tokens
        self.grid_size, self.merge_size = config.patch_grid_size, config.patch_merge_size
        vision_hidden = config.vision_feature_size
        hidden = config.text_config.hidden_size
        eps = _layer_norm_eps(config.text_config)
        if self.visual_tokens == "pooled":
            self.proj = _projection(config, vision_hidden, hidden * self.num_visual_tokens)
        elif self.visual_tokens == "merged":
            self.proj = _projection(config, vision_hidden * self.merge_size**2, hidden)
        else:
            self.proj = _projection(config, vision_hidden, hidden)
        if self.visual_tokens == "queries":
            self.queries = nn.Parameter(torch.zeros(self.num_visual_tokens, hidden))
            self.ln_queries = nn.LayerNorm(hidden, eps=eps)
            self.ln_patches = nn.LayerNorm(hidden, eps=eps)
            self.attn = VisionGPTQueryAttention(config)
            self.ln_mlp = nn.LayerNorm(hidden, eps=eps)
            self.mlp = VisionGPTMLP(hidden, 4 * hidden, hidden, config.projector_hidden_act)

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        if self.visual_tokens == "pooled":
            pooled = self.proj(vision_features[:, 0])  # (B, K * D)
            return pooled.view(pooled.shape[0], self.num_visual_tokens, -1)  # (B, K, D)
        if self.visual_tokens == "merged":
            return self.proj(self.merge_patches(vision_features))  # (B, ceil(S / m)^2, D)
        patches = self.proj(vision_features)  # (B, N, D)
        if self.visual_tokens == "patches":
            return patches
        queries = self.queries.expand(patches.shape[0], -1, -1)  # (B, K, D)
        queries = queries + self.attn(self.ln_queries(queries), self.ln_patches(patches))
        return queries + self.mlp(self.ln_mlp(queries))

    def merge_patches(self, vision_features: torch.Tensor) -> torch.Tensor:
        """`(B, N, Dv)` tokens, the last S x S of them a patch grid -> `(B, ceil(S / m)^2, m * m * Dv)`."""
        side, m = self.grid_size, self.merge_size
        batch_size, num_tokens, dim = vision_features.shape
        if num_tokens < side * side:
            raise ValueError(
                f"visual_tokens='merged' expects the vision tower's {side}x{side} patch grid, but got {num_tokens} "
                "tokens per image; were the images resized to the tower's image_size?"
            )
        grid = vision_features[:, num_tokens - side * side :].reshape(batch_size, side, side, dim)  # drops CLS
        blocks = math.ceil(side / m)
        if blocks * m != side:
            grid = grid.permute(0, 3, 1, 2)  # (B, Dv, S, S): pad repeats the last row and column
            grid = F.pad(grid, (0, blocks * m - side, 0, blocks * m - side), mode="replicate").permute(0, 2, 3, 1)
        grid = grid.reshape(batch_size, blocks, m, blocks, m, dim).permute(0, 1, 3, 2, 4, 5)  # (B, S/m, S/m, m, m, Dv)
        return grid.reshape(batch_size, blocks * blocks, m * m * dim)


class VisionGPTPreTrainedModel(PreTrainedModel):
    config: VisionGPTConfig
    config_class = VisionGPTConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionGPTBlock", "ViTLayer", "CLIPEncoderLayer", "SiglipEncoderLayer", "Dinov2Layer"]
    _skip_keys_device_placement = [CACHE_NAME]
    # GPT-2 here is ours (`gpt2_vision_gpt.py`) and runs eager or SDPA attention; the towers take what they support.
    _supports_sdpa = True

    # transformers guesses from this file's source, sees the resampler's `VisionGPTQueryAttention` and refuses (with a
    # warning, yet sets the towers). The towers and our GPT-2 hold all the attention an implementation applies to (the
    # resampler always runs SDPA and returns no weights), so switching is supported, as for our GPT-2 alone.
    _can_set_attn_implementation = VisionGPTTextPreTrainedModel._can_set_attn_implementation

    @torch.no_grad()
    def _init_weights(self, module):
        if self.config.is_gpt2 and init_gpt2_weights(module, self.config.text_config):
            return
        super()._init_weights(module)
        if isinstance(module, VisionGPTProjector) and module.visual_tokens == "queries":
            init.normal_(module.queries, mean=0.0, std=getattr(self.config.text_config, "initializer_range", 0.02))


class VisionGPTModel(VisionGPTPreTrainedModel):
    r"""
    The base model, as LLaVA's `LlavaModel`: the vision tower (`vision_model`), the [`VisionGPTProjector`]
    (`projector`) and the decoder's body (`language_model`: a [`VisionGPTTextModel`] for GPT-2, the decoder's own base
    model, e.g. `LlamaModel`, for any other), without the LM head. Returns the decoder's last hidden states;
    [`VisionGPTForConditionalGeneration`] holds it as `model` and adds the head.
    """

    def __init__(self, config: VisionGPTConfig):
        super().__init__(config)
        self.vision_model = AutoModel.from_config(config.vision_config, **_vision_model_kwargs(config))
        self.projector = VisionGPTProjector(config)
        if config.is_gpt2:
            self.language_model = VisionGPTTextModel(config.text_config)
        else:
            self.language_model = AutoModel.from_config(config.text_config)
            embedding = self.language_model.get_input_embeddings()
            if type(embedding) is nn.Embedding and config.image_token_id == embedding.num_embeddings:
                # The same weight in an embedding that also reads the image token (one past the vocabulary) as zeros,
                # as our GPT-2's does, so that `get_input_embeddings()(input_ids)` takes ids holding image tokens.
                placeholder_embedding = VisionGPTTokenEmbedding(
                    embedding.num_embeddings, embedding.embedding_dim, padding_idx=embedding.padding_idx
                )
                placeholder_embedding.weight = embedding.weight
                self.language_model.set_input_embeddings(placeholder_embedding)
        # Decoders differ in what they take; positions are passed to those that take them (RoPE, learned positions).
        self._decoder_takes_position_ids = "position_ids" in inspect.signature(self.language_model.forward).parameters
        # Where the blocks are (GPT-2's `h`, Llama's `layers`, OPT's `decoder.layers`): the first module list with one
        # entry per hidden layer, found once.
        num_layers = config.text_config.num_hidden_layers
        self._decoder_layers_path = next(
            (name for name, module in self.language_model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == num_layers), None
        )
        if self._decoder_layers_path is None:
            raise ValueError(f"Found no list of {num_layers} blocks in {type(self.language_model).__name__}.")
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    def decoder_layers(self) -> nn.ModuleList:
        """The decoder's blocks in order (GPT-2's `h`, Llama's `layers`, OPT's `decoder.layers`, ...)."""
        return self.language_model.get_submodule(self._decoder_layers_path)

    def run_decoder(self, inputs_embeds, position_ids, attention_mask=None, cache=None, cross_keys_values=None,
                    output_attentions=False, output_hidden_states=False):
        """
        The decoder's body on `inputs_embeds` `(B, T, D)` at `position_ids` `(B, T)`, with `attention_mask` over the
        cached and new positions (see [`VisionGPTTextModel.forward`]), filling `cache` if given. Returns the last hidden
        states `(B, T, D)` and the hidden states, attentions and cross-attentions asked for (or None). Our GPT-2 takes
        them as it defines them; any other decoder gets its public inputs by name (`inputs_embeds`, `attention_mask`,
        `position_ids` where it takes them, the cache) and adds its own RoPE, masks and sliding windows.
        """
        if self.config.is_gpt2:
            return self.language_model(inputs_embeds, position_ids, attention_mask, cache, cross_keys_values,
                                       output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        inputs = {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask, CACHE_NAME: cache,
                  "use_cache": cache is not None, "output_attentions": output_attentions,
                  "output_hidden_states": output_hidden_states, "return_dict": True}
        if self._decoder_takes_position_ids:
            inputs["position_ids"] = position_ids
        outputs = self.language_model(**inputs)
        return outputs.last_hidden_state, outputs.hidden_states, outputs.attentions, None

    # ----- images --------------------------------------------------------------------------------------------------

    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """
        The vision tower's output that the projector reads, `(B, N, Dv)`: the tokens of `config.vision_feature_layer`
        (`Dv` times the number of layers where it lists several),
        or for `visual_tokens="pooled"` the pooled feature as `(B, 1, Dv)`. With a frozen tower these are what a
        training feature cache stores.
        """
        return self._run_vision_tower(pixel_values)[0]

    def _run_vision_tower(self, pixel_values, output_hidden_states=False, output_attentions=False):
        """(the features the projector reads, the tower's `BaseModelOutputWithPooling`)."""
        config = self.config
        pooled = config.visual_tokens == "pooled"
        layers = config.vision_feature_layer
        use_hidden_states = not pooled and layers != -1
        vision_dtype = next(self.vision_model.parameters()).dtype
        outputs = self.vision_model(
            pixel_values=pixel_values.to(vision_dtype), output_hidden_states=use_hidden_states or output_hidden_states,
            output_attentions=output_attentions, return_dict=True,
        )
        if pooled:
            features = getattr(outputs, "pooler_output", None)
            if features is None:
                features = outputs.last_hidden_state.mean(dim=1)
            features = features[:, None]  # (B, 1, Dv)
        elif isinstance(layers, (list, tuple)):
            # As LLaVA: each listed layer's hidden states (before the tower's final norm), side by side.
            features = torch.cat([outputs.hidden_states[layer] for layer in layers], dim=-1)  # (B, N, Dv * L)
        elif use_hidden_states:
            features = outputs.hidden_states[layers]
        else:
            features = outputs.last_hidden_state  # (B, N, Dv)
        if use_hidden_states and not output_hidden_states:
            outputs.hidden_states = None  # taken only for the feature layer
        return features, outputs

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor | None = None,
        vision_features: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPooling | tuple:
        """
        The images encoded as transformers 5's vision-language models return them: a `BaseModelOutputWithPooling`
        whose `pooler_output` is the visual tokens GPT-2 reads, `(B, num_image_tokens, D)`, and whose
        `last_hidden_state`, `hidden_states` and `attentions` are the vision tower's (the latter two when asked). From
        pixels, or from cached `vision_features` (then `last_hidden_state` is those features). A tuple with
        `return_dict=False`.
        """
        config = self.config
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        if vision_features is None:
            if pixel_values is None:
                raise ValueError("get_image_features needs `pixel_values` or precomputed `vision_features`.")
            vision_features, outputs = self._run_vision_tower(
                pixel_values,
                output_hidden_states=bool(output_hidden_states if output_hidden_states is not None
                                          else config.vision_config.output_hidden_states),
                output_attentions=bool(output_attentions if output_attentions is not None
                                       else config.vision_config.output_attentions),
            )
        else:
            outputs = BaseModelOutputWithPooling(last_hidden_state=vision_features)
        projector_dtype = self.get_input_embeddings().weight.dtype
        outputs.pooler_output = self.projector(vision_features.to(projector_dtype))  # (B, K, D)
        return outputs if return_dict else outputs.to_tuple()

    def _image_embeds(self, pixel_values=None, vision_features=None) -> torch.FloatTensor:
        """The visual tokens GPT-2 reads, `(B, num_image_tokens, D)`."""
        return self.get_image_features(pixel_values, vision_features, return_dict=True).pooler_output

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        vision_features: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        require_image: bool = False,
        **kwargs,
    ) -> VisionGPTModelOutput:
        r"""
        The arguments of [`VisionGPTForConditionalGeneration.forward`] but `labels` and `logits_to_keep`;
        `require_image=True` raises where the call has no image to read (training on captions needs one).
        """
        cache = resolve_cache_argument(cache, past_key_values, f"{type(self).__name__}.forward")
        # GenerationMixin before 5.24 passes the new tokens' `cache_position`; positions come from the cache here.
        kwargs.pop("cache_position", None)
        if kwargs:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected arguments {sorted(kwargs)}.")
        config = self.config
        return_dict = return_dict if return_dict is not None else getattr(config, "return_dict", True)
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        )
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError(
                "VisionGPT needs exactly one of `input_ids` (at least the start token) and `inputs_embeds`. Use the "
                "processor, or `generate(pixel_values)`."
            )
        image_positions = None
        if config.fusion == "prefix":
            image_positions = self._image_token_positions(input_ids, inputs_embeds)  # (B, T)
        has_image_tokens = image_positions is not None and bool(image_positions.any())
        if inputs_embeds is None:
            # Image tokens get the image's visual tokens below; whatever their id embeds to is overwritten.
            token_ids = input_ids.masked_fill(image_positions, 0) if has_image_tokens else input_ids
            inputs_embeds = self.get_input_embeddings()(token_ids)  # (B, T, D)
        use_cache, cache = self._cache_for_call(use_cache, cache)
        past_len = int(cache.get_seq_length()) if cache is not None else 0

        image = {"pixel_values": pixel_values, "vision_features": vision_features, "image_embeds": image_embeds,
                 "require_image": require_image, "output_hidden_states": bool(output_hidden_states),
                 "output_attentions": output_attentions}
        cross_keys_values, prefilled = None, False
        if config.fusion == "prefix":
            inputs_embeds, image_embeds, image_outputs, prefilled = self._fuse_prefix(
                inputs_embeds, image_positions if has_image_tokens else None, cache, past_len, **image)
        else:
            cross_keys_values, image_embeds, image_outputs = self._fuse_cross_attention(
                inputs_embeds, cache, past_len, **image)
        full_mask, position_ids = self._mask_and_positions(attention_mask, inputs_embeds, past_len, prefilled)

        # `output_hidden_states` may name layers, as transformers 5's models take it: a list of indices into the
        # hidden states (negative ones count from the end); the others come back as None.
        selected = output_hidden_states if isinstance(output_hidden_states, (list, tuple)) else None
        hidden, all_hidden, all_attentions, all_cross = self.run_decoder(
            inputs_embeds, position_ids, full_mask, cache, cross_keys_values, output_attentions=output_attentions,
            output_hidden_states=bool(output_hidden_states),
        )
        if selected is not None and all_hidden is not None:
            kept = {index % len(all_hidden) for index in selected}
            all_hidden = tuple(states if i in kept else None for i, states in enumerate(all_hidden))
        output = VisionGPTModelOutput(
            last_hidden_state=hidden,
            hidden_states=all_hidden,
            attentions=all_attentions,
            image_embeds=image_embeds,
            cross_attentions=all_cross,
            image_outputs=image_outputs,
            **{CACHE_NAME: cache if use_cache else None},
        )
        return output if return_dict else output.to_tuple()

    def _cache_for_call(self, use_cache, cache):
        """`(use_cache, cache)`: a new `VisionGPTCache` where one is wanted and none was given."""
        if use_cache is None:
            # Training keeps no cache unless asked (nothing would read it).
            use_cache = cache is not None or (self.config.text_config.use_cache and not self.training)
        if use_cache and self.training and any(
            getattr(block, "gradient_checkpointing", False) for block in self.decoder_layers()
        ):
            # Recomputing a block in the backward pass would append its keys and values to the cache a second time.
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = VisionGPTCache(config=self.config.text_config)
        return use_cache, cache

    def _encode_image(self, needs_image, batch_size, past_len, *, pixel_values, vision_features, image_embeds,
                      require_image, output_hidden_states, output_attentions, image_tokens=False):
        """`(image_embeds, image_outputs)` where this call reads an image (`needs_image`): encoded here from pixels or
        tower features unless `image_embeds` are given. Raises where the image the call needs is missing."""
        has_image = image_embeds is not None or pixel_values is not None or vision_features is not None
        if needs_image and not has_image and require_image:
            raise ValueError(
                "`labels` were given without an image: training the captioner needs `pixel_values` (or "
                "`vision_features` / `image_embeds`) with every caption."
            )
        if needs_image and not has_image and past_len > 0:
            raise ValueError(
                "Cross-attention fusion needs the image (`pixel_values`, `vision_features` or `image_embeds`) at every "
                "step unless the cache is the VisionGPTCache this model returned, which keeps it."
            )
        image_outputs = None
        if image_embeds is None and needs_image and has_image:
            image_outputs = self.get_image_features(
                pixel_values=pixel_values, vision_features=vision_features, return_dict=True,
                output_hidden_states=output_hidden_states, output_attentions=output_attentions,
            )
            image_embeds = image_outputs.pooler_output
        if image_embeds is not None and needs_image and not image_tokens and image_embeds.shape[0] != batch_size:
            raise ValueError(f"Got {image_embeds.shape[0]} images for {batch_size} token sequences.")
        return image_embeds, image_outputs

    def _fuse_prefix(self, inputs_embeds, image_positions, cache, past_len, **image):
        """
        `fusion="prefix"`: the image's visual tokens go where `input_ids` holds its image tokens (LLaVA's convention)
        or, in text without them (the convention before image tokens, which training batches still use), before the
        text on the first pass. Returns `(inputs_embeds (B, T or K+T, D), image_embeds, image_outputs, prefilled)`;
        `prefilled` says the prefix was put in front here. `image_positions` `(B, T)` is None where the text holds no
        image tokens.
        """
        config = self.config
        has_image_tokens = image_positions is not None
        has_image = any(image[name] is not None for name in ("pixel_values", "vision_features", "image_embeds"))
        if has_image_tokens and not has_image:
            raise ValueError(
                f"`input_ids` hold image tokens ({config.image_token_id}) but no image was given: pass `pixel_values` "
                "(or `vision_features` / `image_embeds`)."
            )
        image_embeds, image_outputs = self._encode_image(has_image_tokens or past_len == 0, inputs_embeds.shape[0],
                                                         past_len, image_tokens=has_image_tokens, **image)
        if has_image_tokens:
            # As in LLaVA, the images fill the image tokens in order, row by row: each image's visual tokens go to the
            # next num_image_tokens places (a sequence without image tokens reads text alone).
            visual = image_embeds.to(inputs_embeds.dtype).reshape(-1, inputs_embeds.shape[-1])  # (images x K, D)
            num_placeholders = int(image_positions.sum())
            if num_placeholders != visual.shape[0]:
                raise ValueError(
                    f"`input_ids` hold {num_placeholders} image tokens ({config.image_token_id}), but the "
                    f"{image_embeds.shape[0]} images give {visual.shape[0]} visual tokens "
                    f"({config.num_prefix_tokens} each): each image needs that many image tokens."
                )
            return inputs_embeds.masked_scatter(image_positions[..., None], visual), image_embeds, image_outputs, False
        if past_len > 0 or image_embeds is None:
            return inputs_embeds, image_embeds, image_outputs, False
        inputs_embeds = torch.cat([image_embeds.to(inputs_embeds.dtype), inputs_embeds], dim=1)  # (B, K+T, D)
        if isinstance(cache, VisionGPTCache):
            cache.num_prefix_positions = image_embeds.shape[1]  # positions the text's ids do not show
        return inputs_embeds, image_embeds, image_outputs, True

    def _fuse_cross_attention(self, inputs_embeds, cache, past_len, **image):
        """
        `fusion="cross_attention"`: every decoder block attends to the visual tokens through its cross-attention
        keys and values, computed here once per image, or read from a `VisionGPTCache` that holds them. Returns
        `(cross_keys_values or None, image_embeds, image_outputs)`.
        """
        cached_cross = getattr(cache, "cross_keys_values", None)
        image_embeds, image_outputs = self._encode_image(cached_cross is None, inputs_embeds.shape[0], past_len,
                                                         **image)
        if cached_cross is not None:
            return cached_cross or None, image_embeds, image_outputs  # [] in a cache: text without an image
        cross_keys_values = None
        if image_embeds is not None:
            cross_keys_values = self.language_model.cross_keys_values(image_embeds.to(inputs_embeds.dtype))
        if isinstance(cache, VisionGPTCache) and not (self.training and torch.is_grad_enabled()):
            cache.cross_keys_values = cross_keys_values or []  # one copy per sequence here
        return cross_keys_values, image_embeds, image_outputs

    def _mask_and_positions(self, attention_mask, inputs_embeds, past_len, prefilled):
        """The attention mask over everything the decoder attends to, and the new tokens' positions `(B, T)`."""
        if attention_mask is not None and attention_mask.dim() == 4:
            # The `(B, 1, T, kv_len)` mask GenerationMixin prepares for a static (compileable) cache, which already
            # covers the cached prefix. Causally, each query attends every earlier real token and itself, so its
            # position is the number of keys it attends, minus one.
            if prefilled:
                raise ValueError("A 4D `attention_mask` is only accepted once the visual prefix is in the cache.")
            attended = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
            return attention_mask, (attended[:, 0].sum(-1) - 1).clamp(min=0)
        full_mask = self._full_attention_mask(attention_mask, inputs_embeds, past_len)
        # Positions count attended tokens only, so a left-padded row gets the positions it would have alone.
        return full_mask, (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -inputs_embeds.shape[1] :]

    def _image_token_positions(self, input_ids, inputs_embeds) -> torch.Tensor:
        """Where the image tokens are, `(B, T)`: by id, or in embeddings by the placeholder's embedding (zeros for the
        default id, one past the vocabulary: see `VisionGPTTokenEmbedding`), as LLaVA finds them in `inputs_embeds`."""
        image_token_id = self.config.image_token_id
        if input_ids is not None:
            return input_ids == image_token_id
        embedding = self.get_input_embeddings()
        if image_token_id < embedding.num_embeddings:
            placeholder = embedding.weight[image_token_id].to(inputs_embeds.dtype)
        else:
            placeholder = inputs_embeds.new_zeros(inputs_embeds.shape[-1])
        return (inputs_embeds == placeholder).all(-1)

    @staticmethod
    def _full_attention_mask(attention_mask, inputs_embeds, past_len):
        """The 2D mask over everything GPT-2 attends to: cached positions, the visual prefix and the new tokens."""
        batch_size, new_len = inputs_embeds.shape[:2]
        total_len = past_len + new_len
        if attention_mask is None:
            return torch.ones(batch_size, total_len, dtype=torch.long, device=inputs_embeds.device)
        num_visual = total_len - attention_mask.shape[1]
        if num_visual < 0:
            raise ValueError(
                f"`attention_mask` covers {attention_mask.shape[1]} positions, more than the {total_len} that the "
                "cache and the new tokens hold."
            )
        if num_visual == 0:
            return attention_mask
        visual = attention_mask.new_ones(batch_size, num_visual)
        return torch.cat([visual, attention_mask], dim=1)


class VisionGPTForConditionalGeneration(VisionGPTPreTrainedModel, VisionGPTGenerationMixin):
    r"""
    An image captioner: a [`VisionGPTModel`] (a vision tower, a [`VisionGPTProjector`] and GPT-2's body, fused either
    as a visual prefix or through cross-attention; see [`VisionGPTConfig`]) and GPT-2's LM head. Captions are generated
    with `generate(pixel_values)`, which encodes each image once per call and supports every decoding strategy of
    `GenerationMixin`.

    Example:

    ```python
    >>> from transformers import AutoModel, AutoProcessor
    >>> model = AutoModel.from_pretrained("user/vision-gpt-flickr8k", trust_remote_code=True)
    >>> processor = AutoProcessor.from_pretrained("user/vision-gpt-flickr8k", trust_remote_code=True)
    >>> inputs = processor(images="photo.jpg")
    >>> processor.batch_decode(model.generate(**inputs))
    ['a dog runs through the grass']
    ```"""

    # GPT-2's; a model with another decoder names its own embedding in `__init__` (applied where
    # `config.tie_word_embeddings` says the decoder ties them).
    _tied_weights_keys = {"lm_head.weight": "model.language_model.wte.weight"}
    # Set here rather than by registration, so that every save writes the remote code next to the weights.
    _auto_class = "AutoModel"

    def __init__(self, config: VisionGPTConfig):
        super().__init__(config)
        self.model = VisionGPTModel(config)
        self.lm_head = _lm_head(config.text_config)
        embedding_name = "model.language_model.wte"
        if not config.is_gpt2:
            embedding = self.model.get_input_embeddings()
            embedding_name = "model.language_model." + next(
                name for name, module in self.model.language_model.named_modules() if module is embedding
            )
            self._tied_weights_keys = {"lm_head.weight": f"{embedding_name}.weight"}
        self.post_init()
        if embedding_name in (self._tp_plan or {}):
            # As LLaVA's: where the decoder's tensor-parallel plan shards the embedding over the vocabulary, the head
            # (tied to it or not) is sharded the same way, and its logits gathered.
            self._tp_plan["lm_head"] = "colwise_gather_output"
        self.apply_freezing()
        # Caption defaults for a model that has no saved generation_config.json yet.
        self.generation_config.max_new_tokens = self.generation_config.max_new_tokens or 32
        if self.generation_config.num_beams in (None, 1):
            self.generation_config.num_beams = 3

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Checkpoints saved before the base model existed (vision-gpt 0.x) name the parts at the top level.
        kwargs["key_mapping"] = {**LEGACY_KEY_MAPPING, **(kwargs.get("key_mapping") or {})}
        loaded = super().from_pretrained(*args, **kwargs)
        # Loading replaces the parameters, and with them their `requires_grad`.
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, info) with output_loading_info=True
        model.apply_freezing()
        return loaded

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """
        `nn.Module.load_state_dict`, that also takes a checkpoint file's weights as `save_pretrained` wrote them. Their
        names can differ from the model's: transformers renames some weights back on save (ViT's attention since 5.24,
        ...), and checkpoints saved before `VisionGPTModel` existed name the parts at the top level. Trainer's resume
        and `load_best_model_at_end` read such a file with this method, not with `from_pretrained`, so names this model
        does not have are converted by `from_pretrained`'s own conversions; weights it finds no source for stay missing.
        """
        unexpected = []
        if set(state_dict) - set(self.state_dict()):
            converted, info = type(self).from_pretrained(
                None, config=self.config, state_dict=dict(state_dict), output_loading_info=True
            )
            missing, unexpected = set(info["missing_keys"]), sorted(info["unexpected_keys"])
            if unexpected and strict:
                raise RuntimeError(f"Unexpected key(s) in the state dict, which this model has no place for: "
                                   f"{unexpected[:8]}.")
            state_dict = {key: value for key, value in converted.state_dict().items() if key not in missing}
        result = super().load_state_dict(state_dict, strict, assign)
        result.unexpected_keys.extend(unexpected)
        return result

    # The parts, by the names they had before the base model existed (as LLaVA keeps `language_model` on its head).
    @property
    def vision_model(self) -> nn.Module:
        return self.model.vision_model

    @property
    def projector(self) -> VisionGPTProjector:
        return self.model.projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    # ----- parameters --------------------------------------------------------------------------------------------

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def apply_freezing(self):
        """Set `requires_grad` from the config's `freeze_vision`, `freeze_text` and `freeze_text_layers`. LoRA adapters
        that PEFT injected for training (`vision_gpt.lora`) always train."""
        config = self.config
        self.vision_model.requires_grad_(not config.freeze_vision)
        self.projector.requires_grad_(True)
        self.language_model.requires_grad_(not config.freeze_text)
        self.lm_head.requires_grad_(not config.freeze_text)
        blocks = self.model.decoder_layers()
        for block in blocks[: config.freeze_text_layers]:
            block.requires_grad_(False)
        for block in blocks:
            # Cross-attention layers are new: they are trained whatever is frozen around them.
            for name in ("crossattention", "ln_cross_attn"):
                if hasattr(block, name):
                    getattr(block, name).requires_grad_(True)
        for parameter in self._adapter_parameters().values():
            parameter.requires_grad_(True)

    def _adapter_parameters(self) -> dict[int, nn.Parameter]:
        """PEFT's LoRA weights (`...lora_A.default.weight`), where adapters were injected; by `id`."""
        return {id(p): p for name, p in self.named_parameters() if ".lora_" in name}

    def set_frozen(self, vision: bool | None = None, text: bool | None = None, text_layers: int | None = None):
        """Change what is frozen (e.g. at a stage boundary of staged unfreezing); validated like the config."""
        updates = {"freeze_vision": vision, "freeze_text": text, "freeze_text_layers": text_layers}
        previous = {name: getattr(self.config, name) for name in updates}
        for name, value in updates.items():
            if value is not None:
                setattr(self.config, name, value)
        try:
            self.config._validate()
        except ValueError:
            for name, value in previous.items():
                setattr(self.config, name, value)
            raise
        self.apply_freezing()

    def parameter_summary(self) -> dict[str, dict[str, int]]:
        """Trainable and total parameter counts per part (`vision_model`, `projector`, `language_model` with its LM
        head, `adapters` where LoRA adapters were injected, `total`)."""
        adapters = self._adapter_parameters()
        parts = {
            "vision_model": [self.vision_model],
            "projector": [self.projector],
            "language_model": [self.language_model, self.lm_head],
        }
        summary = {}
        for name, modules in parts.items():
            # Count the tied embedding once, as `num_parameters` does; adapters in a row of their own.
            params = {id(p): p for module in modules for p in module.parameters() if id(p) not in adapters}.values()
            summary[name] = {
                "trainable": sum(p.numel() for p in params if p.requires_grad),
                "total": sum(p.numel() for p in params),
            }
        if adapters:
            summary["adapters"] = {"trainable": sum(p.numel() for p in adapters.values() if p.requires_grad),
                                   "total": sum(p.numel() for p in adapters.values())}
        summary["total"] = {key: sum(part[key] for part in summary.values()) for key in ("trainable", "total")}
        return summary

    # ----- images --------------------------------------------------------------------------------------------------

    def get_vision_features(self, pixel_values: torch.FloatTensor) -> torch.FloatTensor:
        """The vision tower's output that the projector reads (see [`VisionGPTModel.get_vision_features`])."""
        return self.model.get_vision_features(pixel_values)

    def get_image_features(self, pixel_values=None, vision_features=None, output_hidden_states=None,
                           output_attentions=None, return_dict=None) -> BaseModelOutputWithPooling | tuple:
        """The images encoded, visual tokens in `pooler_output` (see [`VisionGPTModel.get_image_features`])."""
        return self.model.get_image_features(pixel_values, vision_features, output_hidden_states, output_attentions,
                                             return_dict)

    def _image_embeds(self, pixel_values=None, vision_features=None) -> torch.FloatTensor:
        return self.model._image_embeds(pixel_values, vision_features)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        cache: Cache | None = None,
        vision_features: torch.FloatTensor | None = None,
        image_embeds: torch.FloatTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> VisionGPTOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Caption tokens, starting with GPT-2's `<|endoftext|>` as the start token. Or `inputs_embeds`, their
            embeddings. With `fusion="prefix"` they may hold each image's `num_image_tokens` image tokens
            (`config.image_token_id`) before its text, as LLaVA's do; text without them gets the image before it.
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Images from [`VisionGPTProcessor`]. Needed on the first pass; alternatively `vision_features` (the frozen
            tower's cached output) or `image_embeds` (already mapped visual tokens).
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`):
            1 for tokens (image tokens included), 0 for padding. A visual prefix put before text without image tokens
            is always attended and is not part of this mask.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
            Targets aligned with `input_ids` (the model shifts them); `-100` is ignored. Padding must be `-100`.
        cache (`Cache`, *optional*):
            GPT-2's key/value cache from an earlier call (`past_key_values` before transformers 5.24). A
            [`VisionGPTCache`] (what this model creates) also keeps the cross-attention keys and values, so that later
            calls need no image; any other `Cache` gets them recomputed from the image at every call.

        Without any image (no `pixel_values`, `vision_features`, `image_embeds`, nor a cache that holds the image),
        GPT-2 alone reads the text.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        text = input_ids if input_ids is not None else inputs_embeds
        if labels is not None and text is not None and labels.shape != text.shape[:2]:
            raise ValueError(f"`labels` has shape {tuple(labels.shape)} but the text has {tuple(text.shape[:2])}.")
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask, cache=cache,
            vision_features=vision_features, image_embeds=image_embeds, inputs_embeds=inputs_embeds,
            use_cache=use_cache, output_attentions=output_attentions, output_hidden_states=output_hidden_states,
            return_dict=True, past_key_values=past_key_values, require_image=labels is not None, **kwargs,
        )
        # Only text positions get logits: the visual prefix is never predicted, and GPT-2's LM head is the costliest
        # layer per position.
        keep = logits_to_keep if not _is_zero(logits_to_keep) else text.shape[1]
        hidden = outputs.last_hidden_state
        logits = self.lm_head(hidden[:, -keep:] if isinstance(keep, int) else hidden[:, keep])  # (B, T, V)

        loss = None
        if labels is not None:
            # Image tokens are never predicted (LLaVA-style labels copy input_ids, image tokens included).
            labels = labels.masked_fill(labels == self.config.image_token_id, -100)
            loss = _caption_loss(logits, labels, num_items_in_batch)
        output = VisionGPTOutput(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_embeds=outputs.image_embeds,
            cross_attentions=outputs.cross_attentions,
            image_outputs=outputs.image_outputs,
            **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return output if return_dict else output.to_tuple()

    # ----- assembly --------------------------------------------------------------------------------------------------

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model: str, text_model: str, **config_overrides
    ) -> "VisionGPTForConditionalGeneration":
        r"""
        Assemble a captioner from a pretrained vision tower and a pretrained decoder (Hub ids or local folders; the
        decoder may also be a local `.gguf` file, which transformers dequantizes with the `gguf` package), as
        `VisionEncoderDecoderModel.from_encoder_decoder_pretrained` does. The projector (and any cross-attention
        layers) start from random weights; `config_overrides` are [`VisionGPTConfig`] fields.

        Example:

        ```python
        >>> model = VisionGPTForConditionalGeneration.from_vision_text_pretrained(
        ...     "google/vit-base-patch16-224-in21k", "gpt2", fusion="cross_attention"
        ... )
        ```"""
        text_source, text_kwargs = text_model_source(text_model)
        vision_config = AutoConfig.from_pretrained(vision_model)
        # A full CLIP or SigLIP checkpoint: keep its vision tower only.
        vision_config = getattr(vision_config, "vision_config", None) or vision_config
        text_config = AutoConfig.from_pretrained(text_source, **text_kwargs)
        config = VisionGPTConfig(vision_config=vision_config, text_config=text_config, **config_overrides)
        model = cls(config)

        vision = AutoModel.from_pretrained(
            vision_model, config=config.vision_config, dtype=torch.float32, **_vision_model_kwargs(config)
        )
        model.vision_model.load_state_dict(vision.state_dict())
        text = AutoModelForCausalLM.from_pretrained(
            text_source, config=config.text_config, dtype=torch.float32, **text_kwargs
        )
        if config.is_gpt2:
            load_gpt2_state_dict(model.language_model, model.lm_head, text.state_dict())
        else:
            # The causal LM's base model and its head (`base_model`, `get_output_embeddings`); a tied head is filled
            # with the embedding it shares.
            model.language_model.load_state_dict(text.base_model.state_dict())
            model.lm_head.load_state_dict(text.get_output_embeddings().state_dict())
        model.apply_freezing()
        return model


# Key names of checkpoints saved before `VisionGPTModel` existed -> today's (`from_pretrained`'s `key_mapping`, regular
# expressions). Keys saved today match none of them.
LEGACY_KEY_MAPPING = {
    r"^vision_model\.": "model.vision_model.",
    r"^projector\.": "model.projector.",
    r"^language_model\.transformer\.": "model.language_model.",
    r"^language_model\.lm_head\.": "lm_head.",
}


def _vision_model_kwargs(config: VisionGPTConfig) -> dict:
    if config.vision_config.model_type == "vit":
        # ViT's pooler is a trained dense+tanh over CLS: keep it only where it is used.
        return {"add_pooling_layer": config.visual_tokens == "pooled"}
    return {}


def _layer_norm_eps(text_config) -> float:
    """The decoder's normalisation epsilon (GPT-2's `layer_norm_epsilon`, Llama's `rms_norm_eps`, ...), for the
    resampler's layer norms."""
    for name in ("layer_norm_epsilon", "layer_norm_eps", "rms_norm_eps", "norm_eps"):
        value = getattr(text_config, name, None)
        if value is not None:
            return value
    return 1e-5


def _lm_head(text_config) -> nn.Linear:
    """An LM head shaped as the decoder's own: `AutoModelForCausalLM`'s output layer, read from a one-block copy built on
    the meta device (its shape, and whether it has a bias: Phi's does). One block: the whole decoder would take as
    long to build as the model itself (1.3 s for SmolLM2's 30 blocks)."""
    if text_config.model_type == "gpt2":
        return nn.Linear(text_config.hidden_size, text_config.vocab_size, bias=False)
    one_block = copy.deepcopy(text_config)
    one_block.num_hidden_layers = 1
    if isinstance(getattr(one_block, "layer_types", None), list):  # per-block attention kinds, validated by length
        one_block.layer_types = one_block.layer_types[:1]
    with torch.device("meta"):
        template = AutoModelForCausalLM.from_config(one_block).get_output_embeddings()
    if not isinstance(template, nn.Linear):
        raise ValueError(f"The {text_config.model_type} decoder's LM head is a {type(template).__name__}, not a linear "
                         "layer; vision-gpt supports decoders with a linear LM head.")
    return nn.Linear(template.in_features, template.out_features, bias=template.bias is not None)


def _is_zero(logits_to_keep) -> bool:
    return isinstance(logits_to_keep, int) and logits_to_keep == 0


def _caption_loss(logits, labels, num_items_in_batch=None):
    """Next-token cross-entropy over the caption; `-100` labels (padding, the start token) are ignored."""
    shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # fp32 for a stable log-softmax
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
    if num_items_in_batch is None:
        return F.cross_entropy(shift_logits, shift_labels, ignore_index=-100)
    loss = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
    return loss / num_items_in_batch


__all__ = [
    "VisionGPTForConditionalGeneration",
    "VisionGPTModel",
    "VisionGPTModelOutput",
    "VisionGPTOutput",
    "VisionGPTPreTrainedModel",
    "VisionGPTProjector",
]
