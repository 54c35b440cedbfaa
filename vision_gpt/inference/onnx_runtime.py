"""
Captioning with ONNX Runtime, from a folder that `vision-gpt export-onnx` wrote: no PyTorch model, the same processor.

Named `onnx_runtime` rather than `onnx` so that `import onnx` inside the package still finds the ONNX package.

Decoding is greedy, beam search or sampling, numpy ports of GenerationMixin's (transformers 5.24 `_sample`,
`_beam_search` with its length penalty and early-stopping heuristic), so that greedy and beam captions equal
`model.generate(..., num_beams=n)`'s for the same model; sampling applies temperature, top-k and top-p as it does,
with its own draws. Other logits processors (repetition penalty, n-gram blocking, ...) are not applied; a
generation config that asks for one is refused. `ONNXCaptioner` also has what `vision-gpt caption` and `vision-gpt app`
use of a PyTorch model (`generate` on pixel values, `generation_config`, `device`, `dtype`), so both run it with
`--runtime onnx`.

    >>> from vision_gpt.inference.onnx_runtime import ONNXCaptioner
    >>> captioner = ONNXCaptioner("vision-gpt-onnx")              # or dtype="int8", "fp16"
    >>> captioner(["dog.jpg", "cat.jpg"], num_beams=3)
    ['a dog runs through the grass', 'a cat sits on a sofa']
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# `--dtype` of `vision-gpt caption` / `app` with `--runtime onnx` -> the export's graphs, by transformers.js's names.
ONNX_DTYPES = {"float32": "fp32", "float16": "fp16", "int8": "int8", "q8": "q8"}
_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# Generation settings whose logits processors are not ported here: a config that sets them is refused.
_UNSUPPORTED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_new_tokens": None,
                "min_length": 0, "diversity_penalty": 0.0}

# transformers.js's file suffix per dtype (`DEFAULT_DTYPE_SUFFIX_MAPPING` in src/utils/dtypes.js).
SUFFIXES = {"fp32": "", "fp16": "_fp16", "int8": "_int8", "q8": "_quantized"}
ONNX_EXTRA = "pip install 'vision-gpt[onnx]' (onnx, onnxruntime)"


def require_onnx(*modules: str):
    """Import `onnx` / `onnxruntime`, or raise an error naming the extra that installs them."""
    import importlib

    missing = []
    for name in modules or ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export and inference need {', '.join(missing)}: {ONNX_EXTRA}.")



class ONNXCaptioner:
    """
    Caption images with an exported ONNX repo on `onnxruntime.InferenceSession`s. `dtype` picks the graphs:
    `"fp32"`, `"fp16"`, `"int8"` or `"q8"` (the files transformers.js names `*_int8.onnx`, `*_quantized.onnx`).
    `providers` and `session_options` go to every `InferenceSession`.
    """

    def __init__(self, folder, dtype: str = "fp32", providers=None, session_options=None):
        require_onnx("onnxruntime")
        import onnxruntime as ort

        from ..modeling.processing_vision_gpt import VisionGPTProcessor

        folder = Path(folder)
        self.precision = dtype
        if dtype not in SUFFIXES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(SUFFIXES)}.")
        names = ("encoder_model", "decoder_model_merged")
        paths = [folder / "onnx" / f"{name}{SUFFIXES[dtype]}.onnx" for name in names]
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist: export it with `vision-gpt export-onnx` (fp16 needs "
                                        "--dtype fp16, int8 and q8 need --quantize int8).")
        options = dict(providers=providers or ["CPUExecutionProvider"], sess_options=session_options)
        self.encoder = ort.InferenceSession(str(paths[0]), **options)
        self.decoder = ort.InferenceSession(str(paths[1]), **options)
        config = json.loads((folder / "config.json").read_text())
        self.fusion = config.get("vision_gpt", {}).get("fusion", "cross_attention")
        self.generation_settings = json.loads((folder / "generation_config.json").read_text())
        self.processor = VisionGPTProcessor.from_pretrained(folder)
        inputs = self.decoder.get_inputs()
        self.visual_name = inputs[2].name  # encoder_hidden_states or image_embeds
        # The past: self-attention keys and values, and for cross-attention the cross ones (`.encoder.`), computed on
        # the first step and fed back after (the module docstring of vision_gpt.export.onnx).
        self.past = [(meta.name, meta.shape, _NUMPY_TYPES[meta.type]) for meta in inputs[3:]]
        self.static_past = [".encoder." in name for name, _, _ in self.past]
        outputs = [meta.name for meta in self.decoder.get_outputs()]
        # Where each past's present is among the outputs: `present.*` for `past_key_values.*`.
        self.present_index = [outputs.index(name.replace("past_key_values", "present", 1)) for name, _, _ in self.past]

    # ----- one decoder step ----------------------------------------------------------------------------------------

    def encode(self, pixel_values: np.ndarray) -> np.ndarray:
        """`(B, 3, H, W)` -> the visual tokens `(B, L, D)`."""
        return self.encoder.run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def empty_past(self, batch_size: int) -> list[np.ndarray]:
        """Past keys and values of length 0 (self- and cross-attention), as transformers.js builds them for the first
        step."""
        return [np.zeros((batch_size, shape[1], 0, shape[3]), dtype=dtype) for _, shape, dtype in self.past]

    def step(self, input_ids, attention_mask, visual, past) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: `(logits (B, T, V) float32, present keys and values)`, the present in the past's order."""
        feeds = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                 self.visual_name: visual}
        feeds.update({name: states for (name, _, _), states in zip(self.past, past)})
        outputs = self.decoder.run(None, feeds)
        # The cross present is only what the call computed (empty once the past holds every visual token): it is
        # appended to the cross past. The self-attention present is the whole past.
        present = []
        for old, index, static in zip(past, self.present_index, self.static_past):
            new = outputs[index]
            if static and old.shape[2]:
                new = np.concatenate([old, new], axis=2) if new.shape[2] else old
            present.append(new)
        return outputs[0], present

    def _first_step(self, visual: np.ndarray, start: int):
        """The start token's logits `(B, V)` and the cache, with the visual prefix in it for `fusion="prefix"`."""
        batch_size = visual.shape[0]
        input_ids = np.full((batch_size, 1), start, dtype=np.int64)
        prefix_len = visual.shape[1] if self.fusion == "prefix" else 0
        attention_mask = np.ones((batch_size, prefix_len + 1), dtype=np.int64)
        logits, past = self.step(input_ids, attention_mask, visual, self.empty_past(batch_size))
        return logits[:, -1], past

    def _reorder(self, past: list[np.ndarray], order: np.ndarray) -> list[np.ndarray]:
        """The past of the sequences that beam search continues (`order`: for each beam, the row it continues). The
        cross-attention keys and values are one copy per image, which `order` never leaves."""
        return [states if static else states[order] for states, static in zip(past, self.static_past)]

    def _next_visual(self, visual: np.ndarray) -> np.ndarray:
        # A prefix is in the cache after the first step; cross-attention reads the image at every step.
        return visual[:, :0] if self.fusion == "prefix" else visual

    # ----- decoding ------------------------------------------------------------------------------------------------

    def __call__(self, images, num_beams: int | None = None, max_new_tokens: int | None = None) -> list[str]:
        """Caption one image or a list (PIL images, paths, arrays): a list of strings, one per image."""
        images = images if isinstance(images, (list, tuple)) else [images]
        pixel_values = self.processor(images=images, return_tensors="np")["pixel_values"]
        return self.processor.batch_decode(self.generate(pixel_values, num_beams, max_new_tokens))

    def generate(self, pixel_values, num_beams: int | None = None, max_new_tokens: int | None = None,
                 num_return_sequences: int | None = None, do_sample: bool | None = None, temperature: float | None = None,
                 top_p: float | None = None, top_k: int | None = None, seed: int | None = None,
                 return_dict_in_generate: bool = False, output_caption_scores: bool = False, **ignored):
        """
        Token ids `(B * num_return_sequences, 1 + new tokens)`, start token first, finished rows padded, each image's
        sequences together and best first, as `model.generate` returns them (a torch tensor for a torch input, else
        numpy). Settings not given come from generation_config.json. With `return_dict_in_generate`, an
        `ONNXGenerateOutput` whose `sequences_scores` are beam search's (length-penalised) scores, or for greedy and
        sampled captions the average log-probability per token up to the first end token (the model's own
        distribution, before temperature and top-p), the score the app and `VisionGPTCaptioner` report.

        Sampling (`do_sample`, with `temperature`, `top_k` then `top_p`, in GenerationMixin's order) draws uniform
        numbers from torch's global generator (or one seeded by `seed`): repeatable after `torch.manual_seed`, though
        not the very tokens PyTorch's `generate` draws. `output_scores`,
        `output_logits` and `use_packed_linears` (PyTorch's) are accepted and unused.
        """
        config = self.generation_settings
        for name, neutral in _UNSUPPORTED.items():
            if config.get(name) not in (None, neutral):
                raise ValueError(f"generation_config.json sets {name}={config[name]!r}, which the ONNX Runtime "
                                 "captioner does not implement; remove it from the file.")
        unknown = sorted(set(ignored) - {"output_scores", "output_logits", "use_packed_linears"})
        if unknown:
            raise TypeError(f"ONNXCaptioner.generate does not take {', '.join(unknown)}.")
        is_torch = type(pixel_values).__module__.startswith("torch")
        pixels = pixel_values.detach().cpu().float().numpy() if is_torch else np.asarray(pixel_values, np.float32)
        do_sample = bool(_first(do_sample, config.get("do_sample"), False))
        num_beams = 1 if do_sample else _first(num_beams, config.get("num_beams"), 1)
        max_new_tokens = _first(max_new_tokens, config.get("max_new_tokens"), 32)
        num_return_sequences = _first(num_return_sequences, config.get("num_return_sequences"), 1)
        if num_return_sequences > num_beams and not do_sample:
            raise ValueError(f"num_return_sequences={num_return_sequences} needs at least as many beams "
                             f"(num_beams={num_beams}), or do_sample=True.")
        visual = self.encode(pixels)
        if num_beams > 1:
            ids, scores = self._beam_search(visual, num_beams, max_new_tokens, num_return_sequences)
        else:
            sampler = _Sampler(_first(temperature, config.get("temperature"), 1.0), _first(top_k, config.get("top_k"), 0),
                               _first(top_p, config.get("top_p"), 1.0), seed) if do_sample else None
            ids, scores = self._decode(np.repeat(visual, num_return_sequences, axis=0), max_new_tokens, sampler)
        caption_scores = None
        if output_caption_scores:
            # The new tokens up to and including the first end token, as the PyTorch model scores them.
            import torch

            from ..modeling.generation_vision_gpt import generated_tokens

            _, eos, _ = self._special_tokens()
            labels = ids.copy()
            labels[:, 1:][~generated_tokens(torch.from_numpy(ids), 1, eos.tolist()).numpy()] = -100
            caption_scores = self.score_captions(np.repeat(pixels, len(ids) // len(pixels), axis=0), ids,
                                                 np.ones_like(ids), labels)
        if is_torch:
            import torch

            ids, scores = torch.from_numpy(ids), torch.from_numpy(scores)
        if return_dict_in_generate or output_caption_scores:
            return ONNXGenerateOutput(ids, scores, caption_scores=caption_scores)
        return ids

    def score_captions(self, pixel_values=None, input_ids=None, attention_mask=None, labels=None, **ignored):
        """
        What the PyTorch model's `score_captions` computes (`VisionGPTCaptionScores`: confidence, grounding, ...), from
        the same two teacher-forced passes through the decoder graph: with each caption's image, and with the blank
        image whose `pixel_values` are all zero ("no image").
        """
        import torch

        from ..modeling.generation_vision_gpt import VisionGPTCaptionScores

        if input_ids is None or labels is None or pixel_values is None:
            raise ValueError("score_captions needs the images and the captions as `input_ids` and `labels`: pass "
                             "processor(images=..., suffix=captions).")
        pixels = _numpy(pixel_values)
        ids, labels = _numpy(input_ids).astype(np.int64), _numpy(labels).astype(np.int64)
        mask = np.ones_like(ids) if attention_mask is None else _numpy(attention_mask).astype(np.int64)
        scored = labels[:, 1:] != -100  # (N, T - 1): scored[:, i] says whether ids[:, i + 1] counts
        count = scored.sum(-1)
        if (count == 0).any():
            raise ValueError(f"Captions {np.flatnonzero(count == 0).tolist()} have no token to score.")
        visual = self.encode(pixels)
        null = np.repeat(self.encode(np.zeros_like(pixels[:1])), len(ids), axis=0)
        with_image, without = (torch.from_numpy(self._sequence_log_prob(v, ids, mask, scored)) for v in (visual, null))
        return VisionGPTCaptionScores.from_log_probs(with_image, without, torch.from_numpy(count))

    def _sequence_log_prob(self, visual, ids, mask, scored) -> np.ndarray:
        """The summed log-probability of the scored tokens, from one decoder call over whole sequences: `(N,)`."""
        prefix = visual.shape[1] if self.fusion == "prefix" else 0
        full_mask = np.concatenate([np.ones((len(ids), prefix), np.int64), mask], axis=1)
        logits, _ = self.step(ids, full_mask, visual, self.empty_past(len(ids)))
        log_probs = _log_softmax(logits[:, -ids.shape[1]:-1].astype(np.float32))  # (N, T - 1, V)
        targets = np.where(scored, ids[:, 1:], 0)
        token = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return np.where(scored, token, 0.0).sum(-1).astype(np.float64)

    def _special_tokens(self):
        config = self.generation_settings
        eos = config.get("eos_token_id")
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = config.get("pad_token_id")
        start = _first(config.get("decoder_start_token_id"), config.get("bos_token_id"))
        return start, np.array(eos, dtype=np.int64), (pad if pad is not None else (eos[0] if eos else 0))

    def _decode(self, visual, max_new_tokens, sampler=None):
        """Greedy decoding (or, with a `_Sampler`, sampling): `(ids (N, 1 + T), average log-probability (N,))`."""
        start, eos, pad = self._special_tokens()
        batch_size = visual.shape[0]
        logits, past = self._first_step(visual, start)
        ids = np.full((batch_size, 1), start, dtype=np.int64)
        attention_mask = np.ones((batch_size, past[0].shape[2]), dtype=np.int64)
        unfinished = np.ones(batch_size, dtype=bool)
        total, count = np.zeros(batch_size, np.float64), np.zeros(batch_size, np.int64)
        next_visual = self._next_visual(visual)
        for step in range(max_new_tokens):
            log_probs = _log_softmax(logits.astype(np.float32))
            chosen = log_probs.argmax(-1) if sampler is None else sampler(logits)
            tokens = np.where(unfinished, chosen, pad)
            # The score counts each sequence's tokens up to and including its end token.
            total += np.where(unfinished, np.take_along_axis(log_probs, tokens[:, None], axis=1)[:, 0], 0.0)
            count += unfinished
            ids = np.concatenate([ids, tokens[:, None]], axis=1)
            unfinished &= ~np.isin(tokens, eos)
            if not unfinished.any() or step == max_new_tokens - 1:
                break
            attention_mask = np.concatenate([attention_mask, np.ones((batch_size, 1), np.int64)], axis=1)
            logits, past = self.step(tokens[:, None], attention_mask, next_visual, past)
            logits = logits[:, -1]
        return ids, (total / np.maximum(count, 1)).astype(np.float32)

    # ----- what `vision-gpt caption` and `vision-gpt app` ask of a model -------------------------------------------

    @property
    def generation_config(self):
        """generation_config.json as transformers' `GenerationConfig` (what a PyTorch model's attribute holds)."""
        from transformers import GenerationConfig

        return GenerationConfig(**self.generation_settings)

    @property
    def device(self):
        import torch

        return torch.device("cpu")

    @property
    def dtype(self):
        import torch

        return torch.float32  # the graphs take float32 pixels whatever they compute in

    training = False  # an ONNX graph has no training mode; `eval` and `train` are kept for callers of a model

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def _beam_search(self, visual, num_beams, max_new_tokens, num_return_sequences=1):
        """GenerationMixin's `_beam_search` (transformers 5.24), step for step, in numpy: `(ids (B * R, L), scores
        (B * R,))` for R = `num_return_sequences`, each image's best first."""
        start, eos, pad = self._special_tokens()
        config = self.generation_settings
        length_penalty = float(_first(config.get("length_penalty"), 1.0))
        early_stopping = _first(config.get("early_stopping"), False)
        batch_size, n = visual.shape[0], num_beams
        max_length, cur_len, prompt_len = 1 + max_new_tokens, 1, 1
        keep = max(2, 1 + len(eos)) * n  # candidates kept per image, so that n unfinished ones remain
        top_n = np.arange(keep) < n

        # The first step once per image, its logits and self-attention cache repeated for the image's beams. The
        # cross-attention keys and values stay one copy per image, as `generate` keeps them: the graph attends each
        # image's beams to its copy together (its queries are grouped by image), so a step reads them once per image
        # and beam search never reorders them.
        logits, past = self._first_step(visual, start)
        logits = np.repeat(logits, n, axis=0)
        past = [states if static else np.repeat(states, n, axis=0) for states, static in zip(past, self.static_past)]
        next_visual = self._next_visual(visual)
        if self.fusion == "prefix":
            next_visual = np.repeat(next_visual, n, axis=0)

        running = np.full((batch_size, n, max_length), pad, dtype=np.int64)
        running[:, :, 0] = start
        sequences = running.copy()
        running_scores = np.zeros((batch_size, n), np.float32)
        running_scores[:, 1:] = -1e9
        beam_scores = np.full((batch_size, n), -1e9, np.float32)
        finished = np.zeros((batch_size, n), bool)
        improvable = np.ones((batch_size, 1), bool)
        running_indices = np.full((batch_size, n, max_length - 1), -1, np.int64)
        attention_mask = np.ones((batch_size * n, past[0].shape[2]), dtype=np.int64)
        while True:
            vocab = logits.shape[-1]
            log_probs = _log_softmax(logits.astype(np.float32)).reshape(batch_size, n, vocab)
            log_probs = (log_probs + running_scores[:, :, None]).reshape(batch_size, n * vocab)
            top = _topk(log_probs, keep)  # (B, keep)
            top_scores = np.take_along_axis(log_probs, top, axis=1)
            beam, tokens = top // vocab, top % vocab
            top_sequences = np.take_along_axis(running, beam[:, :, None], axis=1)
            top_sequences[:, :, cur_len] = tokens
            top_indices = np.take_along_axis(running_indices, beam[:, :, None], axis=1)
            top_indices[:, :, cur_len - prompt_len] = beam + np.arange(batch_size)[:, None] * n
            hits = np.isin(tokens, eos) | (cur_len + 1 >= max_length)

            # The best n candidates that did not stop continue.
            running_top = top_scores + hits.astype(np.float32) * np.float32(-1e9)
            chosen = _topk(running_top, n)
            running = np.take_along_axis(top_sequences, chosen[:, :, None], axis=1)
            running_scores = np.take_along_axis(running_top, chosen, axis=1)
            running_indices = np.take_along_axis(top_indices, chosen[:, :, None], axis=1)

            # Candidates among the top n that stopped join the finished ones, by length-penalised score.
            just_finished = hits & top_n[None, :]
            scores = top_scores / np.float32((cur_len + 1 - prompt_len) ** length_penalty)
            full = finished.all(axis=-1, keepdims=True) & (early_stopping is True)
            scores = scores + np.float32(-1e9) * (full.astype(np.float32) + (~improvable).astype(np.float32)
                                                  + (~just_finished).astype(np.float32))
            merged_scores = np.concatenate([beam_scores, scores.astype(np.float32)], axis=1)
            best = _topk(merged_scores, n)
            sequences = np.take_along_axis(np.concatenate([sequences, top_sequences], axis=1), best[:, :, None], axis=1)
            beam_scores = np.take_along_axis(merged_scores, best, axis=1)
            finished = np.take_along_axis(np.concatenate([finished, just_finished], axis=1), best, axis=1)

            cur_len += 1
            if early_stopping == "never" and length_penalty > 0.0:
                best_length = max_length - prompt_len
            else:
                best_length = cur_len - prompt_len
            best_possible = running_scores[:, :1] / np.float32(best_length**length_penalty)
            worst_finished = np.where(finished, beam_scores.min(axis=1, keepdims=True), np.float32(-1e9))
            improvable &= (best_possible > worst_finished).any(axis=-1, keepdims=True)
            open_beams = not (finished.all() and early_stopping is True)
            if not (improvable.any() and open_beams and not hits.all()):
                break

            order = running_indices[:, :, cur_len - 1 - prompt_len].reshape(-1)  # which sequence each beam continues
            past = self._reorder(past, order)
            attention_mask = np.concatenate([attention_mask, np.ones((batch_size * n, 1), np.int64)], axis=1)
            logits, past = self.step(running[:, :, cur_len - 1].reshape(-1, 1), attention_mask, next_visual, past)
            logits = logits[:, -1]
        r = num_return_sequences
        return sequences[:, :r, :cur_len].reshape(batch_size * r, cur_len), beam_scores[:, :r].reshape(-1)


@dataclass
class ONNXGenerateOutput:
    """`generate(..., return_dict_in_generate=True)`'s result: the sequences and one score each (see `generate`)."""

    sequences: Any
    sequences_scores: Any
    logits: None = None  # scores are computed here, so callers need no logits
    caption_scores: Any = None  # with output_caption_scores=True, a VisionGPTCaptionScores


class _Sampler:
    """Draws the next token from logits `(N, V)` after temperature, top-k and top-p (GenerationMixin's order)."""

    def __init__(self, temperature: float, top_k: int, top_p: float, seed: int | None):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
        import torch

        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        # torch's generator, so that `torch.manual_seed` (what the app and `set_seed` call) makes draws repeatable.
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        scores = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = -np.partition(-scores, self.top_k - 1, axis=-1)[:, self.top_k - 1 : self.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-probs, axis=-1, kind="stable")
            sorted_probs = np.take_along_axis(probs, order, axis=-1)
            # Keep the smallest set whose probability reaches top_p (the token that crosses it included).
            drop_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs >= self.top_p
            drop = np.zeros_like(drop_sorted)
            np.put_along_axis(drop, order, drop_sorted, axis=-1)
            probs = np.where(drop, 0.0, probs)
            probs /= probs.sum(-1, keepdims=True)
        cumulative = np.cumsum(probs, axis=-1)
        import torch

        draws = torch.rand((probs.shape[0], 1), generator=self.generator, dtype=torch.float64).numpy()
        return np.minimum((cumulative < draws).sum(-1), probs.shape[-1] - 1)


def _numpy(array) -> np.ndarray:
    if type(array).__module__.startswith("torch"):
        return array.detach().cpu().float().numpy() if array.is_floating_point() else array.detach().cpu().numpy()
    return np.asarray(array)


def _first(*values):
    """The first value that is not None: what was given, else the generation config's, else the default."""
    return next((value for value in values if value is not None), None)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _topk(x: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest per row, largest first (ties: the lower index first)."""
    if k < x.shape[-1]:
        candidates = np.sort(np.argpartition(-x, k - 1, axis=-1)[:, :k], axis=-1)  # a full sort of 3 x 50257 is slow
    else:
        candidates = np.broadcast_to(np.arange(x.shape[-1]), x.shape)
    order = np.argsort(-np.take_along_axis(x, candidates, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(candidates, order, axis=-1)


__all__ = ["ONNXCaptioner"]
