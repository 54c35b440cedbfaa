"""What `vision-gpt serve` does between a parsed request and its reply, free of any HTTP or serving library: read the
request's image within limits, pick its decoding settings, and caption a batch of requests with as few `generate`
calls as their settings allow, reporting each request's text as the tokens arrive.

    engine = CaptionEngine.from_pretrained("user/vision-gpt-flickr8k", limits=ServeLimits())
    job = engine.job_for(parse_request(body))            # OpenAIError (400/413) for anything wrong with it
    engine.run([job, other_job], emit=print)             # ("delta", job, choice, text) ... ("done", job, reply)
"""

import base64
import binascii
import copy
import logging
import re
import threading
from dataclasses import dataclass

from ..inference.remote_images import InputError, fetch_url, image_from_bytes, readable_size
from ..inference.streaming import StepStreamer, TextStream, cut_at_stop
from .settings import ServeLimits
from ..modeling.processing_vision_gpt import IMAGE_TOKEN
from .protocol import ChatCompletionRequest, OpenAIError

logger = logging.getLogger(__name__)

# Sampled requests share torch's one random generator: a seeded one draws alone, so its seed gives its captions.
_SAMPLING_LOCK = threading.Lock()
# transformers' stop-string check builds tables the size of the vocabulary times the string's length.
MAX_STOP_LENGTH = 64
_DATA_URL = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,", re.IGNORECASE)


@dataclass(frozen=True)
class Decoding:
    """A request's decoding settings. Requests with equal settings share one `generate` call."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # None: the model's generation_config
    num_beams: int = 1
    n: int = 1
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "num_beams": self.num_beams}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, num_return_sequences=self.n)
            if self.top_k is not None:
                kwargs["top_k"] = self.top_k
        elif self.num_beams > 1:
            kwargs["num_return_sequences"] = self.n
        return kwargs


@dataclass(eq=False)
class Job:
    """One request, parsed: its image as the model reads it (`pixel_values`, `(1, C, H, W)`: the decoded image is not
    kept while the request waits), its text prompt, or its chat messages' model inputs, and how to decode it."""

    pixel_values: object | None
    prompt: str | None
    decoding: Decoding
    stream: bool = False
    request_id: str = ""
    created: int = 0
    model: str = ""
    include_usage: bool = False
    inputs: object | None = None  # a chat request's model inputs, built from its messages when it is read
    caption_scores: bool = False
    messages: list | None = None  # a chat request's messages, as transformers' chat templates take them


@dataclass
class Reply:
    """A finished request: one text per choice, why each ended, and the token counts."""

    texts: list[str]
    finish_reasons: list[str]
    prompt_tokens: int
    completion_tokens: int
    # With `return_caption_scores`: each choice's confidence and grounding (VisionGPTCaptionScores).
    scores: list[dict] | None = None


class CaptionEngine:
    """A loaded model and processor, and the rules that turn requests into `generate` calls."""

    def __init__(self, model, processor, limits: ServeLimits | None = None):
        self.model = model.eval() if hasattr(model, "eval") else model
        self.processor = processor
        # Requests are read on several threads while the generation thread uses `processor`: a fast tokenizer's
        # padding state is shared, so reading requests uses its own copy, one thread at a time.
        self.request_processor = copy.deepcopy(processor)
        self._request_lock = threading.Lock()
        self.limits = limits or ServeLimits()
        self.tokenizer = processor.tokenizer
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.has_chat_template = bool(getattr(processor, "chat_template", None) or self.tokenizer.chat_template)
        import torch

        # ONNX Runtime's captioner has no streamer, prompts or stop strings: its captions arrive whole.
        self.is_torch = isinstance(model, torch.nn.Module)
        self.num_visual_tokens = self._count_visual_tokens()
        text_config = getattr(getattr(model, "config", None), "text_config", None)
        # The decoder's positions: the prompt (with the visual prefix, where the image is read as tokens) and the new
        # tokens must fit in them.
        self.max_positions = getattr(text_config, "n_positions", None) or getattr(
            text_config, "max_position_embeddings", None)
        config = getattr(model, "config", None)
        self.prefix_positions = int(config.num_prefix_tokens) if getattr(config, "fusion", None) == "prefix" else 0

    @classmethod
    def from_pretrained(cls, model_path_or_id: str, *, limits: ServeLimits | None = None, dtype: str = "float32",
                        device: str = "auto", runtime: str = "torch", trust_remote_code: bool = False):
        from ..inference.loading import load_model

        model, processor = load_model(model_path_or_id, runtime=runtime, dtype=dtype, device=device,
                                      trust_remote_code=trust_remote_code)
        return cls(model, processor, limits)

    def _count_visual_tokens(self) -> int:
        config = getattr(self.model, "config", None)
        if self.is_torch and hasattr(self.model, "null_image_embeds"):
            return int(self.model.null_image_embeds(1).shape[1])
        return int(getattr(config, "num_prefix_tokens", 0) or getattr(self.processor, "num_image_tokens", 0) or 0)

    # ----- requests ------------------------------------------------------------------------------------------------

    def job_for(self, request: ChatCompletionRequest) -> Job:
        """The request's image, text and decoding settings, or an `OpenAIError` naming what is wrong."""
        decoding = self.decoding_for(request)
        image_parts, texts = [], []
        for position, message in enumerate(request.messages):
            parts = message.content if isinstance(message.content, list) else [message.content or ""]
            for index, part in enumerate(parts):
                where = f"messages[{position}].content" + (f"[{index}]" if isinstance(message.content, list) else "")
                if isinstance(part, str):
                    texts.append((message.role, part))
                elif part.type == "text":
                    if part.text is None:
                        raise OpenAIError(400, f"{where} is a text part without 'text'.", param=where)
                    texts.append((message.role, part.text))
                else:
                    if part.image_url is None:
                        raise OpenAIError(400, f"{where} is an image_url part without 'image_url'.", param=where)
                    if message.role != "user":
                        raise OpenAIError(400, f"{where}: images go in user messages, not {message.role} ones.",
                                          param=where)
                    image_parts.append((where, part.image_url.url))
        # Counted before any image is decoded or fetched.
        if len(image_parts) > 1:
            raise OpenAIError(400, f"The messages hold {len(image_parts)} images; this model captions one image per "
                                   "request: send one request per image.", param="messages")
        if not image_parts:
            raise OpenAIError(400, "The messages hold no image: add an image_url part (a data: URL) to a user "
                                   "message. This model captions images.", param="messages")
        where, url = image_parts[0]
        image = self.read_image(url, where)
        if self.has_chat_template:
            messages = [self._hf_message(message, image) for message in request.messages]
            try:
                with self._request_lock:
                    inputs = self.request_processor.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
            except ValueError as error:
                raise OpenAIError(400, f"This model cannot read these messages: {error}", param="messages") from None
            self._check_length(inputs["input_ids"].shape[1], decoding, request)
            return Job(None, None, decoding, stream=request.stream, inputs=inputs, messages=messages,
                       caption_scores=request.return_caption_scores)
        if not self.is_torch and any(text.strip() for _, text in texts):
            raise OpenAIError(400, "The ONNX Runtime captioner takes no text prompt: send the image alone.",
                              param="messages")
        # A captioner continues the text of the user's messages, or captions when there is none.
        prompt = " ".join(text.strip() for role, text in texts if role == "user" and text.strip()) or None
        if prompt is not None and IMAGE_TOKEN in prompt:
            raise OpenAIError(400, f"The text holds {IMAGE_TOKEN!r}: the image comes from the image_url part, and "
                                   "the model puts it where it reads images.", param="messages")
        with self._request_lock:
            prompt_tokens = len(self.request_processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]) \
                if prompt else 0
        self._check_length(self.prefix_positions + 1 + prompt_tokens, decoding, request)
        pixel_values = self.request_processor(images=[image])["pixel_values"]  # (1, C, H, W)
        return Job(pixel_values, prompt, decoding, stream=request.stream,
                   caption_scores=request.return_caption_scores)

    def _check_length(self, prompt_positions: int, decoding: Decoding, request: ChatCompletionRequest) -> None:
        """The prompt and the new tokens must fit in the decoder's positions (GPT-2 small: 1024)."""
        room = None if self.max_positions is None else self.max_positions - prompt_positions
        if room is None or decoding.max_new_tokens <= room:
            return
        name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        asked = (f"'{name}' is {decoding.max_new_tokens}" if request.max_completion_tokens or request.max_tokens
                 else f"The model's default of {decoding.max_new_tokens} new tokens is too many")
        raise OpenAIError(400, f"{asked}, but this model's decoder reads {self.max_positions} positions and the prompt "
                               f"takes {prompt_positions}: ask for at most {max(room, 0)} tokens.", param=name)

    @staticmethod
    def _hf_message(message, image) -> dict:
        """An OpenAI message as transformers' chat templates take it: `image` parts carry the image itself."""
        if not isinstance(message.content, list):
            return {"role": message.role, "content": [{"type": "text", "text": message.content or ""}]}
        content = [{"type": "image", "image": image} if part.type == "image_url" else {"type": "text",
                                                                                        "text": part.text}
                   for part in message.content]
        return {"role": message.role, "content": content}

    def read_image(self, url: str, where: str):
        """An RGB image from a `data:` URL (or an http(s) one, where allowed). Local paths are never read."""
        from ..modeling import ImageLoadError

        limits = self.limits
        try:
            if url.startswith("data:"):
                data = self._decode_data_url(url, where)
            elif url.startswith(("http://", "https://")):
                if not limits.allow_url_images:
                    raise OpenAIError(400, f"{where}: this server does not fetch http(s) image URLs (it was started "
                                           "without --allow-url-images); send the image as a data: URL.", param=where,
                                      code="url_images_disabled")
                data = fetch_url(url, max_bytes=limits.max_image_bytes, timeout=limits.url_timeout)
            else:
                scheme = url.split(":", 1)[0] if ":" in url[:16] else "a local path"
                raise OpenAIError(400, f"{where}: images come as data: URLs (or http(s) URLs where the server allows "
                                       f"them), not {scheme}; this server never reads its own files.", param=where)
            image = image_from_bytes(data, where, max_pixels=limits.max_image_pixels)
        except InputError as error:
            raise OpenAIError(400, f"{where}: {error}", param=where) from None
        except ImageLoadError as error:
            raise OpenAIError(400, str(error), param=where, code="invalid_image") from None
        return image.convert("RGB")

    def _decode_data_url(self, url: str, where: str) -> bytes:
        match = _DATA_URL.match(url)
        if match is None:
            raise OpenAIError(400, f"{where}: a data: URL must be base64, as data:image/jpeg;base64,...", param=where)
        payload = url[match.end():]
        # Base64 is 4/3 of the bytes: refuse an oversized image before decoding it.
        if len(payload) * 3 // 4 > self.limits.max_image_bytes:
            raise OpenAIError(413, f"{where}: the image is about {readable_size(len(payload) * 3 // 4)}, over the "
                                   f"{readable_size(self.limits.max_image_bytes)} limit per image.", param=where,
                              code="image_too_large")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise OpenAIError(400, f"{where}: the data: URL's base64 payload is not valid base64.", param=where,
                              code="invalid_image") from None

    def decoding_for(self, request: ChatCompletionRequest) -> Decoding:
        """The request's settings; what it leaves out comes from the model's `generation_config`."""
        limits, config = self.limits, self.model.generation_config
        max_new_tokens = request.max_completion_tokens or request.max_tokens or config.max_new_tokens or 32
        name = "max_completion_tokens" if request.max_completion_tokens else "max_tokens"
        if max_new_tokens > limits.max_tokens:
            raise OpenAIError(400, f"'{name}' is {max_new_tokens}; this server generates at most "
                                   f"{limits.max_tokens} tokens a caption.", param=name)
        if request.n > limits.max_n:
            raise OpenAIError(400, f"'n' is {request.n}; this server returns at most {limits.max_n} choices a "
                                   "request.", param="n")
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        if len(stop) > 4 or any(not s or len(s) > MAX_STOP_LENGTH for s in stop):
            raise OpenAIError(400, f"'stop' takes up to 4 non-empty strings of at most {MAX_STOP_LENGTH} characters.",
                              param="stop")
        if request.use_beam_search:
            beams = request.best_of or max(config.num_beams or 1, request.n)
            if request.temperature not in (None, 0) or request.top_p not in (None, 1):
                raise OpenAIError(400, "Beam search does not sample: leave 'temperature' and 'top_p' out (or 0 and "
                                       "1) with 'use_beam_search'.", param="use_beam_search")
        elif request.best_of not in (None, request.n):
            raise OpenAIError(400, "'best_of' is the number of beams of beam search: set 'use_beam_search' too.",
                              param="best_of")
        elif request.temperature is not None or request.top_p is not None:
            beams = 1  # temperature 0 is greedy; any other temperature or top_p samples
        else:
            beams = 1 if config.do_sample else (config.num_beams or 1)
        do_sample = not request.use_beam_search and (
            (request.temperature or 0) > 0 if request.temperature is not None
            else (request.top_p is not None or bool(config.do_sample)))
        if beams > limits.max_beams:
            raise OpenAIError(400, f"{beams} beams were asked for; this server runs at most {limits.max_beams}.",
                              param="best_of")
        if not do_sample and beams > 1 and request.n > beams:
            fix = (f"set 'best_of' to at least {request.n}" if request.use_beam_search else
                   f"set 'use_beam_search' with 'best_of' of at least {request.n}, or sample ('temperature' above 0)")
            raise OpenAIError(400, f"'n' is {request.n} but beam search keeps {beams} beams: {fix}.", param="n")
        if request.top_k is not None and not do_sample:
            raise OpenAIError(400, "'top_k' applies to sampling: set 'temperature' above 0 too.", param="top_k")
        temperature = top_p = None
        if do_sample:
            temperature = request.temperature if request.temperature is not None else (config.temperature or 1.0)
            top_p = request.top_p if request.top_p is not None else (config.top_p or 1.0)
        return Decoding(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                        top_k=request.top_k if do_sample else None, num_beams=1 if do_sample else beams, n=request.n, seed=request.seed if do_sample else None,
                        stop=stop)

    # ----- generation ----------------------------------------------------------------------------------------------

    def run(self, jobs: list[Job], emit) -> None:
        """
        Caption `jobs`, one `generate` call per group of equal settings (chat requests, whose prompts differ in
        layout, one at a time), calling `emit(("delta", job, choice, text))` as text is decided and
        `emit(("done", job, Reply))` when a job is finished; `("error", job, OpenAIError)` if its group failed.
        """
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            # Chat requests, and seeded samples (whose draws depend on the batch's size), run alone.
            alone = job.inputs is not None or (job.decoding.do_sample and job.decoding.seed is not None)
            key = (job.decoding, job.prompt is not None, id(job) if alone else None)
            groups.setdefault(key, []).append(job)
        for group in groups.values():
            try:
                self._run_group(group, emit)
            except Exception as error:  # one group's failure is its own requests' error, not the batch's
                logger.exception("generation failed for %d request(s)", len(group))
                for job in group:
                    emit(("error", job, OpenAIError(500, f"Generation failed: {error}", type="server_error")))

    def _inputs(self, group: list[Job]):
        import torch
        from transformers import BatchFeature

        if group[0].inputs is not None:
            return group[0].inputs
        pixel_values = torch.cat([job.pixel_values for job in group])
        if group[0].prompt is None:
            return BatchFeature({"pixel_values": pixel_values})
        # The prompts' ids are what `processor(images=..., text=prompts)` gives: they hold no image placeholder.
        inputs = self.processor(text=[job.prompt for job in group])
        inputs["pixel_values"] = pixel_values
        return inputs

    def _run_group(self, group: list[Job], emit) -> None:
        import torch

        decoding = group[0].decoding
        inputs = self._inputs(group)
        if self.is_torch:
            inputs = inputs.to(self.model.device)
        kwargs = decoding.generate_kwargs()
        # Sequences per request: sampling and beam search return n; greedy decoding returns its one caption n times.
        copies = decoding.n if (decoding.do_sample or decoding.num_beams > 1) else 1
        streams = [[TextStream(self.tokenizer, self.eos, decoding.stop) for _ in range(copies)] if job.stream
                   else None for job in group]
        if self.is_torch and decoding.stop:
            kwargs.update(stop_strings=list(decoding.stop), tokenizer=self.tokenizer)
        if self.is_torch and decoding.num_beams == 1 and any(job.stream for job in group):
            kwargs["streamer"] = StepStreamer(lambda tokens: self._on_step(group, streams, copies, tokens, emit))
        scored = any(job.caption_scores for job in group)
        if scored:
            kwargs["output_caption_scores"] = True  # two teacher-forced passes over the finished sequences
        if decoding.do_sample:
            with _SAMPLING_LOCK:
                if decoding.seed is not None:
                    torch.manual_seed(decoding.seed)
                output = self._generate(inputs, kwargs)
        else:
            output = self._generate(inputs, kwargs)
        sequences = output.sequences if scored else output
        prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1
        new_tokens = sequences[:, prompt_length:].tolist()
        prompt_tokens = self._prompt_tokens(inputs)
        for row, job in enumerate(group):
            texts, reasons, generated = [], [], 0
            for index in range(decoding.n):
                sequence = index if copies > 1 else 0
                text, reason, count = self._finish(new_tokens[row * copies + sequence], decoding)
                texts.append(text)
                reasons.append(reason)
                generated += count
                if job.stream:
                    stream = streams[row][sequence]
                    if not text.startswith(stream.sent):  # a tokenizer whose text changes behind its end
                        logger.warning("streamed %r, but the caption is %r", stream.sent, text)
                    elif text != stream.sent:
                        emit(("delta", job, index, stream.rest(text)))
            scores = None
            if job.caption_scores:
                confidence = output.caption_scores.confidence.tolist()
                grounding = output.caption_scores.grounding.tolist()
                scores = [{"confidence": confidence[row * copies + (index if copies > 1 else 0)],
                           "grounding": grounding[row * copies + (index if copies > 1 else 0)]}
                          for index in range(decoding.n)]
            emit(("done", job, Reply(texts, reasons, prompt_tokens[row], generated, scores)))

    def _generate(self, inputs, kwargs):
        if self.is_torch:
            return self.model.generate(**inputs, **kwargs)
        onnx_kwargs = {k: v for k, v in kwargs.items() if k != "streamer"}
        return self.model.generate(inputs["pixel_values"], **onnx_kwargs)

    def _prompt_tokens(self, inputs) -> list[int]:
        """Per request: the visual tokens, and the prompt's text tokens (its start token included)."""
        if "input_ids" not in inputs:
            return [self.num_visual_tokens + 1] * len(inputs["pixel_values"])
        image_token = getattr(getattr(self.model, "config", None), "image_token_id", None)
        counts = []
        for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
            counts.append(self.num_visual_tokens + sum(1 for t, m in zip(ids, mask) if m and t != image_token))
        return counts

    def _text(self, tokens: list[int]) -> tuple[str, bool, int]:
        """The text of new tokens up to the first end token; whether there was one; how many tokens count."""
        for position, token in enumerate(tokens):
            if token in self.eos:
                return self.tokenizer.decode(tokens[:position], skip_special_tokens=True), True, position + 1
        return self.tokenizer.decode(tokens, skip_special_tokens=True), False, len(tokens)

    def _finish(self, tokens: list[int], decoding: Decoding) -> tuple[str, str, int]:
        text, ended, count = self._text(tokens)
        cut = cut_at_stop(text, decoding.stop)
        reason = "stop" if ended or cut is not None else "length"
        return (text if cut is None else text[:cut]).strip(), reason, count

    def _on_step(self, group, streams, copies, tokens, emit) -> None:
        """A decoding step's tokens, one per returned sequence: send each streaming request its newly settled text."""
        n = group[0].decoding.n
        for row, job in enumerate(group):
            if streams[row] is None:
                continue
            for sequence, stream in enumerate(streams[row]):
                delta = stream.add(tokens[row * copies + sequence])
                if delta:
                    # Greedy decoding with n > 1 sends its one caption to every choice.
                    for index in (range(n) if copies == 1 else (sequence,)):
                        emit(("delta", job, index, delta))
