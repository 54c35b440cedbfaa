"""VisionGPT configuration: a vision tower, a mapper into the decoder's embedding space, and a causal LM decoder."""

import math

from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

from .compat_vision_gpt import SubConfigSpec, build_sub_configs

FUSIONS = ("prefix", "cross_attention")
VISUAL_TOKENS = ("patches", "pooled", "queries", "merged")
PROJECTOR_TYPES = ("linear", "mlp", "identity")
# Towers whose outputs and image processors have been checked with this model.
VISION_MODEL_TYPES = ("vit", "clip_vision_model", "siglip_vision_model", "dinov2")
# Decoders that `fusion="cross_attention"` can add cross-attention layers to (vision-gpt's own GPT-2).
CROSS_ATTENTION_TEXT_MODEL_TYPES = ("gpt2",)
# Decoder-only causal LMs that `fusion="prefix"` takes: those whose causal LM is their base model and one linear head,
# as the tests check against transformers' own (docs/guides/decoders.md). Others are refused rather than run wrongly: some
# scale their logits after the head (Cohere, Granite), soft-cap them (Gemma 2), or keep no attention cache (Mamba).
TEXT_MODEL_TYPES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma", "opt", "gpt_neox", "phi")


class VisionGPTConfig(PretrainedConfig):
    r"""
    Configuration of a [`VisionGPTForConditionalGeneration`]: a vision tower (ViT-B/16 at 224 px by default; CLIP
    vision, SigLIP vision and DINOv2 work too), a trainable mapper and a decoder (GPT-2 by default; with
    `fusion="prefix"` a decoder-only causal LM: Llama and SmolLM2, Mistral, Qwen2/3, Gemma, OPT, GPT-NeoX, Phi). Below,
    "GPT-2" stands for whichever decoder `text_config` describes.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the vision tower. Defaults to `ViTConfig()` (ViT-B/16, 224 px).
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Config of the decoder, a decoder-only causal LM of a family in `TEXT_MODEL_TYPES`. Defaults to
            `GPT2Config()` (GPT-2 small, 124M). GPT-2 runs as vision-gpt's own port (`gpt2_vision_gpt.py`); every other
            decoder as transformers builds it (`AutoModel.from_config`), through its public inputs only.
        fusion (`str`, defaults to `"cross_attention"`):
            `"prefix"`: the mapped visual tokens are placed before the caption tokens in GPT-2's input.
            `"cross_attention"`: every GPT-2 block gets a cross-attention layer over the mapped visual tokens (GPT-2
            decoders only).
        visual_tokens (`str`, defaults to `"patches"`):
            Which visual tokens reach GPT-2. `"patches"`: every token of the vision tower (197 for ViT-B/16 at 224 px).
            `"pooled"`: the tower's pooled feature mapped to `num_visual_tokens` tokens (ClipCap's MLP mapper).
            `"queries"`: `num_visual_tokens` learned queries attend over the patch tokens.
            `"merged"`: each block of `patch_merge_size` x `patch_merge_size` neighbouring patch tokens, concatenated
            and projected to one token (49 tokens for ViT-B/16 at 224 px with blocks of 2 x 2; the CLS token is not
            used).
        num_visual_tokens (`int`, defaults to 32):
            K, the number of visual tokens for `"pooled"` and `"queries"`.
        patch_merge_size (`int`, defaults to 2):
            The side of the blocks of patches that `"merged"` turns into one token. A patch grid whose side it does not
            divide is padded by repeating its last row and column.
        projector_type (`str`, defaults to `"mlp"`):
            `"linear"`, `"mlp"` (two layers) or `"identity"` (only when both hidden sizes match; used by conversions).
        projector_hidden_act (`str`, defaults to `"gelu"`):
            Activation of the MLP projector (any key of `transformers.activations.ACT2FN`).
        projector_hidden_size (`int`, *optional*):
            Hidden width of the MLP projector; defaults to GPT-2's hidden size.
        vision_feature_layer (`int` or `list[int]`, defaults to -1):
            Hidden layer of the tower whose tokens are used by `"patches"`, `"queries"` and `"merged"` (-1 is the
            last, after the tower's final norm). A list concatenates those layers' hidden states along the hidden
            size, as LLaVA's `vision_feature_layer` does: `[4, -1]` gives the projector an early layer's colour and
            texture next to the last layer's objects.
        freeze_vision (`bool`, defaults to `True`):
            Freeze the vision tower.
        freeze_text (`bool`, defaults to `True`):
            Freeze GPT-2's pretrained weights. Cross-attention layers are new and always stay trainable.
        freeze_text_layers (`int`, defaults to 0):
            Freeze the pretrained weights of the first N GPT-2 blocks (used when `freeze_text=False`).
        image_token_id (`int`, *optional*):
            With `fusion="prefix"`, the id that marks the image's places in `input_ids`, as transformers' LLaVA marks
            them: each sequence holds `num_image_tokens` of them, and the model writes the image's visual tokens over
            their embeddings. Defaults to GPT-2's vocabulary size, one past its last token, which no text tokenizes to
            and the LM head never predicts.
        tie_word_embeddings (`bool`, *optional*):
            Whether the LM head shares the token embedding's weight; defaults to the decoder's own setting (GPT-2,
            SmolLM2 and OPT tie it, Llama and GPT-NeoX do not).

    Example:

    ```python
    >>> from vision_gpt import VisionGPTConfig, VisionGPTForConditionalGeneration
    >>> config = VisionGPTConfig(fusion="prefix", visual_tokens="queries", num_visual_tokens=32)
    >>> model = VisionGPTForConditionalGeneration(config)
    ```"""

    model_type = "vision_gpt"
    # Set here rather than by registration, so that every save writes the remote code next to the config.
    _auto_class = "AutoConfig"
    _sub_config_types = {"vision_config": "vit", "text_config": "gpt2"}  # the defaults: ViT-B/16, GPT-2 small
    if SubConfigSpec is not None:
        sub_configs_defaults = {
            name: SubConfigSpec(config_class=AutoConfig, model_type=model_type)
            for name, model_type in _sub_config_types.items()
        }
    else:  # before transformers 5.20 (see compat_vision_gpt.py)
        sub_configs = dict.fromkeys(_sub_config_types, AutoConfig)

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    fusion: str = "cross_attention"
    visual_tokens: str = "patches"
    num_visual_tokens: int = 32
    patch_merge_size: int = 2
    projector_type: str = "mlp"
    projector_hidden_act: str = "gelu"
    projector_hidden_size: int | None = None
    vision_feature_layer: int | list[int] = -1
    freeze_vision: bool = True
    freeze_text: bool = True
    freeze_text_layers: int = 0
    image_token_id: int | None = None
    tie_word_embeddings: bool | None = None

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None:
            build_sub_configs(self, self._sub_config_types)
        super().__post_init__(**kwargs)
        self._validate()
        if self.image_token_id is None:
            self.image_token_id = self.text_config.vocab_size
        if self.tie_word_embeddings is None:
            # Where transformers' tying reads it (the top-level config), from where the decoder's config keeps it.
            self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", True))
        if self.is_gpt2:
            # Our GPT-2 builds its cross-attention layers from this flag.
            self.text_config.add_cross_attention = self.fusion == "cross_attention"
        elif hasattr(self.text_config, "is_decoder"):
            # GPT-NeoX's causal LM asks for this flag, as VisionEncoderDecoderModel sets it for its decoder.
            self.text_config.is_decoder = True
        # Generation reads the special tokens from the top-level config.
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(self, name, None) is None:
                setattr(self, name, getattr(self.text_config, name, None))
        # What makes a saved folder load with trust_remote_code, from AutoModel, AutoModelForImageTextToText and both
        # pipelines alike (transformers 5 checks custom_pipelines before redirecting the image-to-text task).
        model_class = "modeling_vision_gpt.VisionGPTForConditionalGeneration"
        self.auto_map = {
            "AutoConfig": "configuration_vision_gpt.VisionGPTConfig",
            "AutoModel": model_class,
            "AutoModelForImageTextToText": model_class,
            "AutoProcessor": "processing_vision_gpt.VisionGPTProcessor",
            **(getattr(self, "auto_map", None) or {}),
        }
        # A saved config keeps the pipelines it declares: they name classes in the pipeline file saved beside it, and a
        # repo saved before the image-text-to-text one existed must not point transformers at a class it lacks.
        if not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = {
                task: {"impl": f"pipeline_vision_gpt.{impl}", "pt": ["AutoModelForImageTextToText"], "type": "multimodal"}
                for task, impl in (("image-to-text", "VisionGPTImageToTextPipeline"),
                                   ("image-text-to-text", "VisionGPTImageTextToTextPipeline"))
            }
        if self.pad_token_id is None:
            # GPT-2 has no pad token; padding reuses eos and is told apart by the attention mask, never by its id.
            eos = self.eos_token_id
            self.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) else eos

    def _validate(self):
        def check_choice(field, allowed):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"VisionGPTConfig.{field}={value!r} is not supported; choose one of {list(allowed)}.")

        check_choice("fusion", FUSIONS)
        check_choice("visual_tokens", VISUAL_TOKENS)
        check_choice("projector_type", PROJECTOR_TYPES)
        if self.vision_config.model_type not in VISION_MODEL_TYPES:
            raise ValueError(
                f"VisionGPTConfig.vision_config has model_type={self.vision_config.model_type!r}; supported vision "
                f"towers are {list(VISION_MODEL_TYPES)} (for CLIP or SigLIP pass the vision part, e.g. "
                "CLIPConfig().vision_config)."
            )
        text_type = self.text_config.model_type
        if text_type not in TEXT_MODEL_TYPES:
            raise ValueError(
                f"VisionGPTConfig.text_config has model_type={text_type!r}; the decoder must be one of the "
                f"decoder-only causal LMs {list(TEXT_MODEL_TYPES)} (llama covers SmolLM2 and the other Llama-"
                "architecture models)."
            )
        if self.fusion == "cross_attention" and text_type not in CROSS_ATTENTION_TEXT_MODEL_TYPES:
            raise ValueError(
                f'VisionGPTConfig(fusion="cross_attention") needs a decoder with cross-attention layers, which '
                f"vision-gpt has for {list(CROSS_ATTENTION_TEXT_MODEL_TYPES)} only, not for {text_type!r}; use "
                'fusion="prefix", which works with every supported decoder.'
            )
        for field in ("num_visual_tokens", "patch_merge_size", "projector_hidden_size"):
            value = getattr(self, field)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"VisionGPTConfig.{field}={value!r} must be a positive integer.")
        max_positions = getattr(self.text_config, "max_position_embeddings", None)
        if max_positions is not None and 0 < max_positions <= self.num_prefix_tokens:
            raise ValueError(
                f"VisionGPTConfig: a visual prefix of {self.num_prefix_tokens} tokens (visual_tokens="
                f"{self.visual_tokens!r}, num_visual_tokens={self.num_visual_tokens}) leaves no room for text in the "
                f"decoder's {max_positions} positions; use fewer visual tokens."
            )
        if self.visual_tokens == "merged" and self.patch_merge_size > self.patch_grid_size:
            raise ValueError(
                f"VisionGPTConfig.patch_merge_size={self.patch_merge_size} is larger than the vision tower's "
                f"{self.patch_grid_size}x{self.patch_grid_size} patch grid."
            )
        if self.projector_type == "identity":
            if self.visual_tokens in ("pooled", "merged"):
                raise ValueError(
                    f'VisionGPTConfig.projector_type="identity" cannot map visual_tokens={self.visual_tokens!r} (one '
                    'pooled feature to several tokens, or several patches to one) to GPT-2\'s width; use "linear" or '
                    '"mlp".'
                )
            if self.vision_feature_size != self.text_config.hidden_size:
                raise ValueError(
                    f'VisionGPTConfig.projector_type="identity" needs equal hidden sizes, but the vision tower gives '
                    f"{self.vision_feature_size} and GPT-2 has {self.text_config.hidden_size}; use "
                    '"linear" or "mlp".'
                )
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(
                f"VisionGPTConfig.projector_hidden_act={self.projector_hidden_act!r} is not an activation known to "
                f"transformers; choose one of {sorted(ACT2FN)}."
            )
        num_layers = self.text_config.num_hidden_layers
        if (
            isinstance(self.freeze_text_layers, bool)
            or not isinstance(self.freeze_text_layers, int)
            or not 0 <= self.freeze_text_layers <= num_layers
        ):
            raise ValueError(
                f"VisionGPTConfig.freeze_text_layers={self.freeze_text_layers!r} must be an integer from 0 to the "
                f"decoder's {num_layers} layers."
            )
        num_vision_layers = self.vision_config.num_hidden_layers
        layers = self.vision_feature_layer
        layers = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if not layers or any(isinstance(layer, bool) or not isinstance(layer, int)
                             or not -num_vision_layers - 1 <= layer <= num_vision_layers for layer in layers):
            raise ValueError(
                f"VisionGPTConfig.vision_feature_layer={self.vision_feature_layer!r} is out of range for a vision tower "
                f"with {num_vision_layers} layers: give a layer from {-num_vision_layers - 1} to {num_vision_layers} "
                "(-1 for the last), or a non-empty list of them."
            )
        if isinstance(self.vision_feature_layer, tuple):
            self.vision_feature_layer = list(self.vision_feature_layer)
        for field in ("freeze_vision", "freeze_text"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"VisionGPTConfig.{field}={getattr(self, field)!r} must be True or False.")

    @property
    def is_gpt2(self) -> bool:
        """Whether the decoder is GPT-2, which runs as vision-gpt's own port (cross-attention, ONNX export)."""
        return self.text_config.model_type == "gpt2"

    @property
    def num_prefix_tokens(self) -> int:
        """How many positions the visual prefix takes in GPT-2's sequence (0 for cross-attention)."""
        if self.fusion != "prefix":
            return 0
        return self.num_image_tokens

    @property
    def num_image_tokens(self) -> int:
        """How many visual tokens the mapper produces per image."""
        if self.visual_tokens in ("pooled", "queries"):
            return self.num_visual_tokens
        if self.visual_tokens == "merged":
            return math.ceil(self.patch_grid_size / self.patch_merge_size) ** 2
        # SigLIP has no CLS token; ViT, CLIP and DINOv2 prepend one.
        return self.patch_grid_size**2 + (0 if self.vision_config.model_type == "siglip_vision_model" else 1)

    @property
    def vision_feature_size(self) -> int:
        """Width of the features the projector reads: the tower's hidden size, times the number of layers that
        `vision_feature_layer` concatenates."""
        layers = self.vision_feature_layer
        return self.vision_config.hidden_size * (len(layers) if isinstance(layers, (list, tuple)) else 1)

    @property
    def patch_grid_size(self) -> int:
        """The side of the vision tower's square grid of patch tokens (14 for ViT-B/16 at 224 px)."""
        return self.vision_config.image_size // self.vision_config.patch_size


__all__ = ["VisionGPTConfig"]
