"""
`vision-gpt export-onnx`: a vision-gpt model as an ONNX repo that ONNX Runtime (`vision_gpt.inference.onnx_runtime`)
and, for `fusion="cross_attention"`, transformers.js's `vision-encoder-decoder` image-to-text model can run.

Layout (transformers.js's for encoder-decoder models, `session_config.js`):

    config.json                  fusion="cross_attention": a `vision-encoder-decoder` config (ViT encoder, GPT-2
                                 decoder with `add_cross_attention`, under TrOCR's names); fusion="prefix": the model's
                                 own config
    generation_config.json       start/end tokens, beams, max_new_tokens
    preprocessor_config.json, tokenizer.json, tokenizer_config.json, processor_config.json, ...
    onnx/encoder_model.onnx      pixel_values (B, 3, H, W) -> last_hidden_state (B, L, D): the visual tokens GPT-2 reads
    onnx/decoder_model_merged.onnx
    onnx/*_fp16.onnx, onnx/*_int8.onnx, onnx/*_quantized.onnx   the variants asked for

The decoder is one graph for every step: it always takes the past keys and values, and the first step gives them with
length 0 (what transformers.js's `addPastKeyValues` builds from the graph's input shapes: `batch_size` is filled in,
every other named dimension is 0). So there is no `use_cache_branch` input and no If node. Inputs: `input_ids (B, T)`,
`attention_mask (B, past + [K +] T)` (ones for real tokens), the visual tokens, then the past. Outputs:
`logits (B, T, V)` (text positions only), then the present, named as the past with `present` for `past_key_values`.

- Cross-attention (transformers.js's encoder-decoder cache layout): `encoder_hidden_states (B, L, D)` at every step,
  and per layer `past_key_values.{i}.decoder.key` / `.value` (self-attention, `(B, heads, past, head_dim)`) and
  `past_key_values.{i}.encoder.key` / `.value` (GPT-2's cross-attention keys and values, `(B, heads, L', head_dim)`).
  The graph projects only the visual tokens past the first L' (`encoder_hidden_states[:, L':]`): all L on the first
  step (L' = 0), none afterwards (an empty slice, no work), so the cross keys and values are computed once per image,
  not at every step. Attention reads the past and the new part without joining them (`_attention_over_parts`), so
  the cross past is never copied, and `present.{i}.encoder.*` is the new part only: all of them on the first step, an
  empty one afterwards. transformers.js keeps the past's then, as it does with optimum's merged decoders (its
  `getPastKeyValues`); the config's decoder is written under TrOCR's `model_type` so that it names these inputs
  (`transformers_js_config`). The cross past may hold one copy per image for several sequences per image (beam
  search), `B = images x c`, image-major: each image's queries attend to its copy together, as `generate` does. Its
  batch dimension is still named `batch_size`, as `input_ids`'s: transformers.js fills the dimensions of that name
  when it builds the empty first past, and sets every other named one to 0.
- Prefix: `image_embeds (B, K, D)` (the K visual tokens on the first step, `(B, 0, D)` afterwards) and per layer
  `past_key_values.{i}.key` / `.value`.

Positions come from the attention mask inside the graph, as the PyTorch model computes them, so left-padded prompts
need no `position_ids`.

Exporter: `torch.onnx.export(..., dynamo=False)`, the TorchScript tracer. optimum-onnx is not used: its only release
(0.1.0) requires transformers < 4.58, and it knows no `vision_gpt` model type. torch's default dynamo exporter is not
used either: our GPT-2 reads the cache length as a Python int (`int(cache.get_seq_length())`), which `torch.export`
specialises to the example's length, so the past length could not stay dynamic. The tracer records the shape
arithmetic that feeds the graph and leaves those Python ints (used only for bookkeeping here) out of it.

Browser demo (`--web-demo`, cross-attention only): `index.html` in the repo captions an uploaded image with
transformers.js, whose bundled web build and ONNX Runtime Web's WebAssembly files are copied into `web/` from the
checkout's `js/node_modules` (`(cd js && npm ci --ignore-scripts)`), so the page needs no CDN. Serve the repo over HTTP
(`python -m http.server --directory OUT`) and open it.

Quantization: ONNX Runtime's dynamic int8 quantization (`quantize_dynamic`, int8 weights, activations quantized per
call), written as `*_int8.onnx` (transformers.js's `dtype: "int8"`) and as `*_quantized.onnx` (`dtype: "q8"`, its
default on WebAssembly).
"""

import json
import logging
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from ..inference.onnx_runtime import SUFFIXES, require_onnx
from ..modeling.configuration_vision_gpt import VisionGPTConfig
from ..modeling.modeling_vision_gpt import VisionGPTForConditionalGeneration

DEFAULT_OPSET = 17
MIN_OPSET = 14  # scaled_dot_product_attention's export needs 14
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ONNXExportError(ValueError):
    """An export that cannot be done; the message says why and what to do."""


# ----- the graphs ----------------------------------------------------------------------------------------------------


class VisionGPTEncoderForExport(nn.Module):
    """pixel_values `(B, 3, H, W)` float32 -> the visual tokens GPT-2 reads `(B, L, D)` float32 (vision tower and
    projector, in the model's dtype)."""

    def __init__(self, model: VisionGPTForConditionalGeneration):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        dtype = self.model.get_input_embeddings().weight.dtype
        pixel_values = pixel_values.to(dtype)
        image_embeds = self.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
        # float32 at the graph's edges whatever the dtype inside, as the decoder's `encoder_hidden_states` input.
        return image_embeds.float()


class _PastKeyValues:
    """The cache our GPT-2 blocks update (`update`, `get_seq_length`), over flat past tensors: each layer's new keys
    and values are appended to its past ones and kept as the present ones the graph returns."""

    def __init__(self, past: list[torch.Tensor]):
        self.past = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        self.present = [None] * len(self.past)

    def get_seq_length(self, layer_idx: int = 0):
        return self.past[layer_idx][0].shape[2]

    def update(self, keys, values, layer_idx, cache_kwargs=None):
        past_keys, past_values = self.past[layer_idx]
        keys = torch.cat([past_keys.to(keys.dtype), keys], dim=2)  # (B, H, past + T, hd)
        values = torch.cat([past_values.to(values.dtype), values], dim=2)
        self.present[layer_idx] = (keys, values)
        return keys, values


class VisionGPTDecoderForExport(nn.Module):
    """
    One decoding step of GPT-2 with its LM head, for any past length (0 on the first step):
    `(input_ids, attention_mask, visual tokens, *past)` -> `(logits, *present)`. The visual tokens are
    `encoder_hidden_states` (cross-attention) or `image_embeds` (prefix, put before the text; empty after the first
    step). The past is per layer the self-attention keys and values, then for cross-attention the cross keys and values
    (`past_key_values.{i}.decoder.key`, `.decoder.value`, `.encoder.key`, `.encoder.value`).
    """

    def __init__(self, model: VisionGPTForConditionalGeneration):
        super().__init__()
        self.language_model = model.language_model
        self.lm_head = model.lm_head
        self.is_prefix = model.config.fusion == "prefix"

    def forward(self, input_ids, attention_mask, visual, *past):
        weight = self.language_model.get_input_embeddings().weight
        # A plain lookup: the model's embedding also maps the image placeholder id, a data-dependent branch.
        embeds = nn.functional.embedding(input_ids, weight)  # (B, T, D)
        visual = visual.to(weight.dtype)
        num_text = embeds.shape[1]
        cross_keys_values = None
        if self.is_prefix:
            embeds = torch.cat([visual, embeds], dim=1)  # (B, K + T, D); K = 0 after the first step
            self_past = list(past)
        else:
            self_past = [states for i in range(0, len(past), 4) for states in past[i : i + 2]]
            cross_past = [past[i + 2 : i + 4] for i in range(0, len(past), 4)]
            # Only the visual tokens not yet in the cross past are projected: all L on the first step (past 0), none
            # afterwards, where the slice is empty and costs nothing. So the keys and values are computed once per
            # image, with no branch in the graph. Attention reads the past and the new part without joining them
            # (a join would copy every layer's cross past at every step).
            new = self.language_model.cross_keys_values(visual[:, cross_past[0][0].shape[2] :])
            cross_keys_values = [
                tuple((old.to(states.dtype), states) for old, states in zip(olds, news))
                for olds, news in zip(cross_past, new)
            ]  # per layer ((past keys, new keys), (past values, new values)), each (images, H, L', hd)
        cache = _PastKeyValues(self_past)
        past_len = self_past[0].shape[2]
        new_len = embeds.shape[1]
        # Positions and the causal mask from the 2D mask over the past and the new tokens, as the PyTorch model builds
        # them (VisionGPTModel.forward, `_self_attention_mask`), as a 4D boolean mask (True: attend).
        mask = attention_mask.long()
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new_len:]  # (B, T)
        keys = torch.arange(past_len + new_len, device=embeds.device)
        queries = keys[-new_len:]
        causal = keys[None, :] <= queries[:, None]  # (T, S)
        full = causal[None] & mask[:, None, :].bool()  # (B, T, S)
        full = full | (keys[None, None, :] == queries[None, :, None])  # a padding query attends itself (no NaN)
        hidden, *_ = self.language_model(embeds, position_ids, full[:, None], cache, cross_keys_values)
        logits = self.lm_head(hidden[:, -num_text:]).float()  # (B, T, V)
        if self.is_prefix:
            present = [states for pair in cache.present for states in pair]
        else:
            # The cross present is what this call computed: every visual token's keys and values on the first step,
            # an empty part afterwards, when the past already holds them (optimum's and transformers.js's contract).
            present = [states for pair, cross in zip(cache.present, new) for states in (*pair, *cross)]
        return (logits, *present)


def _past_names(num_layers: int, fusion: str, prefix: str = "past_key_values") -> list[str]:
    """The decoder's past inputs (or, with `prefix="present"`, its present outputs) in the graph's order: per layer
    `{prefix}.{i}.key` / `.value` (prefix fusion), or `{prefix}.{i}.decoder.key` / `.value` (self-attention) and
    `{prefix}.{i}.encoder.key` / `.value` (cross-attention), transformers.js's encoder-decoder names."""
    kinds = ["key", "value"] if fusion == "prefix" else [f"{part}.{kind}" for part in ("decoder", "encoder")
                                                           for kind in ("key", "value")]
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in kinds]


def export_encoder(model, path: Path, opset: int):
    config = model.config
    size = config.vision_config.image_size
    pixel_values = torch.randn(2, 3, size, size)
    trace_to_onnx(VisionGPTEncoderForExport(model), (pixel_values,), path, opset,
                  input_names=["pixel_values"], output_names=["last_hidden_state"],
                  dynamic_axes={"pixel_values": {0: "batch_size"},
                                "last_hidden_state": {0: "batch_size", 1: "encoder_sequence_length"}})


def export_decoder(model, path: Path, opset: int):
    config = model.config
    text = config.text_config
    num_layers, num_heads = text.n_layer, text.n_head
    head_dim = text.n_embd // num_heads
    dtype = model.get_input_embeddings().weight.dtype
    batch, past_len, new_len, num_visual = 2, 3, 2, max(config.num_image_tokens, 2)
    is_prefix = config.fusion == "prefix"
    visual_name = "image_embeds" if is_prefix else "encoder_hidden_states"
    visual = torch.randn(batch, num_visual, text.n_embd)
    input_ids = torch.randint(0, text.vocab_size, (batch, new_len))
    prefix_len = num_visual if is_prefix else 0
    attention_mask = torch.ones(batch, past_len + prefix_len + new_len, dtype=torch.long)
    attention_mask[0, 0] = 0  # a padded row: the traced mask arithmetic must not assume all ones
    names, present_names = _past_names(num_layers, config.fusion), _past_names(num_layers, config.fusion, "present")
    # The example's cross past holds some of the visual tokens, so the traced slice keeps its start dynamic.
    cross_len = 1
    past = [torch.randn(batch, num_heads, cross_len if ".encoder." in name else past_len, head_dim, dtype=dtype)
            for name in names]
    dynamic_axes = {
        "input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
        "attention_mask": {0: "batch_size", 1: "past_decoder_sequence_length + 1"},
        visual_name: {0: "batch_size", 1: "encoder_sequence_length"},
        "logits": {0: "batch_size", 1: "decoder_sequence_length"},
    }
    for name in names:  # transformers.js's empty first past: `batch_size` filled in, every other named dimension 0
        length = "encoder_sequence_length_past" if ".encoder." in name else "past_sequence_length"
        dynamic_axes[name] = {0: "batch_size", 2: length}
    for name in present_names:
        length = "encoder_sequence_length_new" if ".encoder." in name else "past_sequence_length + 1"
        dynamic_axes[name] = {0: "batch_size", 2: length}
    trace_to_onnx(VisionGPTDecoderForExport(model), (input_ids, attention_mask, visual, *past), path, opset,
                  input_names=["input_ids", "attention_mask", visual_name, *names],
                  output_names=["logits", *present_names], dynamic_axes=dynamic_axes)
    if not is_prefix:
        _reshape_zero_as_zero(path)


def _reshape_zero_as_zero(path: Path):
    """
    Make every Reshape in the graph at `path` read a 0 in its target shape as a length of 0 (`allowzero=1`, opset 14),
    as torch's `view` does. ONNX's default reads 0 as "copy the input's dimension", so the cached steps' empty slice of
    visual tokens, `(B, 0, D)` reshaped to `(B, 0, 2D)` after its projection, would ask for `(B, 2D, 2D)` and fail.
    The exporter never writes a 0 that means "copy", and no target shape here holds both 0 and -1 (refused with
    `allowzero`), so every other Reshape is unchanged.
    """
    import onnx
    from onnx import helper

    model = onnx.load(str(path))
    for node in model.graph.node:
        if node.op_type == "Reshape":
            kept = [attribute for attribute in node.attribute if attribute.name != "allowzero"]
            node.ClearField("attribute")
            node.attribute.extend([*kept, helper.make_attribute("allowzero", 1)])
    onnx.save(model, str(path))


def trace_to_onnx(module, args, path: Path, opset: int, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python int it reads from a shape; those ints only feed bookkeeping here. torch
        # 2.9+ also warns that this exporter is the legacy one: chosen on purpose (see the module docstring).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        for message in ("You are using the legacy TorchScript-based ONNX export", "The feature will be removed"):
            warnings.filterwarnings("ignore", message, DeprecationWarning)
        try:
            torch.onnx.export(module.eval(), args, str(path), dynamo=False, opset_version=opset,
                              do_constant_folding=True, **kwargs)
        except Exception as error:  # the tracer and the ONNX converter raise many kinds
            raise ONNXExportError(
                f"torch.onnx.export could not export {type(module).__name__} at opset {opset}: "
                f"{type(error).__name__}: {error}"
            ) from error


# ----- the repo ------------------------------------------------------------------------------------------------------


def transformers_js_config(config: VisionGPTConfig) -> dict:
    """
    The `vision-encoder-decoder` config transformers.js reads for a cross-attention model: `model_type`,
    `is_encoder_decoder`, and the `decoder`, GPT-2's config under TrOCR's `model_type` and with TrOCR's names for its
    sizes (`decoder_layers`, `decoder_attention_heads`, `d_model`). That is the encoder-decoder cache layout
    transformers.js knows for a VisionEncoderDecoder decoder (`getNormalizedConfig` and `getKeyValueNames` in its
    src/configs.js): self-attention past `past_key_values.{i}.decoder.*` and cross-attention keys and values
    `past_key_values.{i}.encoder.*`, which it computes on the first step and feeds back unchanged. Under `gpt2` it
    would know only a self-attention past, and the decoder would recompute the cross keys and values at every step.
    The encoder's output is already at GPT-2's width (the projector is in the encoder graph), so no projection is
    needed between them.
    """
    text = config.text_config
    decoder = text.to_dict()
    decoder.update(add_cross_attention=True, is_decoder=True, model_type="trocr", decoder_layers=text.n_layer,
                   decoder_attention_heads=text.n_head, d_model=text.n_embd, max_position_embeddings=text.n_positions)
    encoder = config.vision_config.to_dict()
    return {
        "model_type": "vision-encoder-decoder",
        "architectures": ["VisionEncoderDecoderModel"],
        "is_encoder_decoder": True,
        "encoder": encoder,
        "decoder": decoder,
        "decoder_start_token_id": config.bos_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        # What the exported graphs are, for a reader and for vision_gpt.inference.onnx_runtime.
        "vision_gpt": _vision_gpt_fields(config),
    }


def _vision_gpt_fields(config: VisionGPTConfig) -> dict:
    return {"fusion": config.fusion, "num_image_tokens": config.num_image_tokens,
            "image_token_id": config.image_token_id, "model_type": config.model_type}


def _check_exportable(config: VisionGPTConfig, opset: int):
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise ONNXExportError(f"--opset {opset} is too old: the attention layers need opset {MIN_OPSET} or newer "
                              f"(default {DEFAULT_OPSET}).")
    if config.text_config.model_type != "gpt2":
        raise ONNXExportError(f"Only GPT-2 decoders can be exported, not {config.text_config.model_type!r}.")


def _prepare_output(output_dir: Path, overwrite: bool):
    if output_dir.exists() and not output_dir.is_dir():
        raise ONNXExportError(f"{output_dir} exists and is not a folder.")
    if output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise ONNXExportError(f"{output_dir} exists and is not empty; choose a new folder or pass --overwrite.")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def export_onnx(model, processor, output_dir, dtype: str = "fp32", quantize: str | None = None,
                opset: int = DEFAULT_OPSET, overwrite: bool = False, progress: bool = False) -> dict[str, Path]:
    """
    Write `model` and `processor` as an ONNX repo in `output_dir` (see the module docstring). `dtype`: `"fp32"` or
    `"fp16"` (the fp32 graphs are always written: they are what the fp16 and int8 ones are checked against);
    `quantize="int8"` adds ONNX Runtime's dynamic int8 quantization of the fp32 graphs. Returns the written files by
    role (`"encoder"`, `"decoder"`, `"encoder_fp16"`, ...). `progress` shows a bar over the graphs as they are written.
    """
    from tqdm.auto import tqdm

    require_onnx("onnx", "onnxruntime")
    if dtype not in DTYPES:
        raise ONNXExportError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)}.")
    if quantize not in (None, "int8"):
        raise ONNXExportError(f"quantize={quantize!r} is not supported; the only quantization is 'int8'.")
    _check_exportable(model.config, opset)
    output_dir = Path(output_dir)
    _prepare_output(output_dir, overwrite)
    onnx_dir = output_dir / "onnx"
    model = model.float().eval()
    files = {}
    bar = tqdm(total=2 * (1 + (dtype == "fp16") + (quantize == "int8")), unit=" graphs", desc="exporting",
               disable=not progress)
    with bar:
        for part, export in (("encoder", export_encoder), ("decoder", export_decoder)):
            path = onnx_dir / ("encoder_model.onnx" if part == "encoder" else "decoder_model_merged.onnx")
            export(model, path, opset)
            files[part] = path
            bar.update()
        if dtype == "fp16":
            for part in ("encoder", "decoder"):
                files[f"{part}_fp16"] = convert_fp16(files[part])
                bar.update()
        if quantize == "int8":
            for part in ("encoder", "decoder"):
                files[f"{part}_int8"], files[f"{part}_q8"] = quantize_int8(files[part])
                bar.update()
    for name, path in files.items():
        if name.startswith("decoder") and not name.endswith(("_int8", "_q8")):
            share_tied_embedding(path)
    _write_configs(model, processor, output_dir)
    return files


def convert_fp16(path: Path) -> Path:
    """
    The fp32 graph at `path` in float16, as `*_fp16.onnx`: ONNX Runtime's float16 converter, which keeps the graph's
    edges that its users feed and read in float32 (pixels, visual tokens, logits) and makes the cache float16, as
    transformers.js expects of an fp16 decoder. Converting the graph rather than tracing a half-precision model keeps
    fp16 independent of how each transformers release writes its layers (the ViT of 5.12 traces to a graph that mixes
    float32 into float16 layer norms).
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(path))
    edges = [*model.graph.input, *model.graph.output]
    keep = [edge.name for edge in edges if not edge.name.startswith(("past_key_values.", "present."))]
    half = path.with_name(path.stem + SUFFIXES["fp16"] + ".onnx")
    onnx.save(convert_float_to_float16(model, keep_io_types=keep), str(half))
    return half


def share_tied_embedding(path: Path) -> int:
    """
    Store a tied embedding once in the graph at `path`. The LM head multiplies by the embedding's transpose, and the
    exporter's constant folding writes that transpose as a second initializer: GPT-2's 50257 x 768 table twice, 154 MB
    of an fp32 decoder. Each initializer that is the exact transpose of another (a large one) is replaced by a
    Transpose node over it, which ONNX Runtime folds again in memory when it loads the graph. Done after the int8
    variants are made, since the quantizer only quantizes matrix products whose weight is an initializer. Returns the
    bytes saved.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    by_shape = {}
    for init in graph.initializer:
        if len(init.dims) == 2 and init.dims[0] * init.dims[1] >= 1 << 16:
            by_shape.setdefault(tuple(init.dims), []).append(init)
    saved, folded = 0, []
    for init in [init for inits in by_shape.values() for init in inits]:
        # The folded copy has an exporter-made name ("onnx::MatMul_123"); the parameter keeps its own.
        if not init.name.startswith("onnx::"):
            continue
        for original in by_shape.get((init.dims[1], init.dims[0]), []):
            if original.name.startswith("onnx::") or original.data_type != init.data_type:
                continue
            if np.array_equal(numpy_helper.to_array(original).T, numpy_helper.to_array(init)):
                folded.append((init, original))
                break
    for init, original in folded:
        saved += len(init.raw_data) or numpy_helper.to_array(init).nbytes
        graph.initializer.remove(init)
        graph.node.insert(0, helper.make_node("Transpose", [original.name], [init.name], perm=[1, 0],
                                              name=f"{init.name}/tied"))
    if folded:
        onnx.save(model, str(path))
    return saved


def quantize_int8(path: Path) -> tuple[Path, Path]:
    """ONNX Runtime's dynamic int8 quantization of `path`, as `*_int8.onnx` and an identical `*_quantized.onnx`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = path.with_name(path.stem + SUFFIXES["int8"] + ".onnx")
    # The quantizer logs on the root logger that a pre-processing pass (shape inference) might help: it is not needed
    # for dynamic quantization of these graphs, whose MatMul weights are all initializers.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    q8 = path.with_name(path.stem + SUFFIXES["q8"] + ".onnx")
    shutil.copyfile(int8, q8)
    return int8, q8


def _write_configs(model, processor, output_dir: Path):
    config = model.config
    processor.save_pretrained(output_dir)
    # transformers.js reads the image processor from preprocessor_config.json (transformers 5 keeps it inside
    # processor_config.json); `ViTImageProcessor` is its name there for the same resize and normalisation.
    image_processor = processor.image_processor.to_dict()
    image_processor.pop("auto_map", None)
    image_processor["image_processor_type"] = "ViTImageProcessor"
    (output_dir / "preprocessor_config.json").write_text(json.dumps(image_processor, indent=2, sort_keys=True) + "\n")
    generation = model.generation_config.to_dict()
    # The start token of every caption (transformers.js reads `decoder_start_token_id` for encoder-decoder models).
    start = generation.get("bos_token_id")
    generation["decoder_start_token_id"] = start if start is not None else config.bos_token_id
    if config.fusion == "cross_attention":
        config_dict = transformers_js_config(config)
    else:
        config_dict = config.to_dict()
        # Not loadable as a PyTorch model from this folder (no weights): drop what points at the remote code.
        for name in ("auto_map", "custom_pipelines"):
            config_dict.pop(name, None)
        config_dict["vision_gpt"] = _vision_gpt_fields(config)
    (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    (output_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")


# ----- the browser demo ----------------------------------------------------------------------------------------------

# The Node packages of a vision-gpt checkout (js/package.json): the web demo copies its browser files from them.
JS_DIR = Path(__file__).resolve().parents[2] / "js"
NPM_INSTALL = "(cd js && npm ci --ignore-scripts)"
# The bundled web build (no bare imports, so no import map) and the ONNX Runtime Web build it loads by default.
WEB_DEMO_FILES = {
    "transformers.min.js": "@huggingface/transformers/dist",
    "ort-wasm-simd-threaded.asyncify.mjs": "onnxruntime-web/dist",
    "ort-wasm-simd-threaded.asyncify.wasm": "onnxruntime-web/dist",
}
# The graphs a browser runs best first: q8 is transformers.js's default on WebAssembly.
WEB_DTYPES = ("q8", "fp32", "fp16")


def web_demo_sources(config: VisionGPTConfig, js_dir: Path = JS_DIR) -> dict[str, Path]:
    """The page template and the transformers.js / ONNX Runtime Web files `--web-demo` copies, by name; raises an
    error that says what to do when the model or the checkout cannot make one."""
    if config.fusion != "cross_attention":
        raise ONNXExportError(f"--web-demo runs the model in transformers.js, which knows the cross-attention model "
                              f"only (fusion='cross_attention'), not fusion={config.fusion!r}.")
    template = js_dir / "web_demo" / "index.html"
    if not template.is_file():
        raise ONNXExportError(f"--web-demo needs {template}, part of a vision-gpt source checkout (not of the pip "
                              f"package): run the export from a checkout.")
    sources = {"index.html": template}
    for name, folder in WEB_DEMO_FILES.items():
        sources[name] = js_dir / "node_modules" / folder / name
        if not sources[name].is_file():
            raise ONNXExportError(f"--web-demo copies {name} from js/node_modules, which does not have it: install "
                                  f"the pinned transformers.js first with {NPM_INSTALL} (in {js_dir.parent}).")
    return sources


def write_web_demo(output_dir, sources: dict[str, Path]) -> list[Path]:
    """Write `index.html` (a page that captions an uploaded image with transformers.js) into the exported repo
    `output_dir`, and the browser files it loads into `output_dir/web/`. Serve `output_dir` over HTTP to use it."""
    output_dir = Path(output_dir)
    dtypes = [dtype for dtype in WEB_DTYPES
              if (output_dir / "onnx" / f"decoder_model_merged{SUFFIXES[dtype]}.onnx").is_file()]
    page = sources["index.html"].read_text()
    marker = "/* DTYPES */ ['fp32']"
    if marker not in page:
        raise ONNXExportError(f"{sources['index.html']} lacks the {marker!r} line the export fills in.")
    written = [output_dir / "index.html"]
    written[0].write_text(page.replace(marker, json.dumps(dtypes)))
    (output_dir / "web").mkdir(exist_ok=True)
    for name, source in sources.items():
        if name != "index.html":
            written.append(Path(shutil.copyfile(source, output_dir / "web" / name)))
    return written
