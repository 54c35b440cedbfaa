"""What the web app does between a request and its captions, without the page: reading uploads and URLs within
limits, turning the settings panel into `generate` arguments, and captioning, all at once or as the captions are
written. `Captioner` runs a model in this process; `remote.RemoteCaptioner` asks a `vision-gpt serve` server."""

import os
import threading
import time
from dataclasses import dataclass

from ..inference.decoding import FLAGS, check_decoding
from ..inference.generation import average_log_probs
from ..inference.loading import load_model
from ..inference.remote_images import InputError, fetch_url, image_from_bytes, readable_size
from ..inference.trust import caption_trust

MB = 1024 * 1024  # Gradio's "mb" unit, so our limit and Gradio's agree to the byte

# Slider ranges: wide enough to explore, small enough that one request cannot tie the server up for minutes.
MAX_BEAMS = 8
MAX_CAPTIONS = 8
MAX_NEW_TOKENS = 64

# Greedy and beam search draw no random numbers, but sampling does, from torch's one global generator: a sampled
# request seeds it and draws alone, so that the same seed gives the same captions while others are being captioned.
_SAMPLING_LOCK = threading.Lock()


@dataclass
class DecodingSettings:
    """What the settings panel chooses. `num_captions` is how many captions to show per image."""

    num_beams: int = 3
    num_captions: int = 3
    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    seed: int = 0


@dataclass
class Caption:
    """One caption and its score: the average log-probability per generated token (closer to 0 is more confident);
    and its trust scores (`VisionGPTCaptionScores`): `confidence` (0-1) and `grounding`."""

    text: str
    score: float | None  # None while the caption is being written
    confidence: float | None = None
    grounding: float | None = None


def generate_kwargs(settings: DecodingSettings) -> tuple[dict, list[str]]:
    """
    The `model.generate` arguments for `settings`, and notes for the user where a setting had to be adjusted.

    Sampling returns `num_captions` independent samples (beams unused); beam search (beams > 1) returns up to
    `num_beams` distinct beams; greedy decoding (1 beam, no sampling) has only one answer.
    """
    notes = []
    num_beams = _clamp(int(settings.num_beams), 1, MAX_BEAMS)
    wanted = _clamp(int(settings.num_captions), 1, MAX_CAPTIONS)
    if settings.do_sample:
        # Plain sampling only: beam-sample's scores would mix in temperature and top-p, and be harder to explain.
        if num_beams > 1:
            notes.append("Sampling draws each caption on its own, so the Beams setting is not used while it is on.")
        num_beams, count = 1, wanted
    elif num_beams > 1:
        count = min(wanted, num_beams)
        if count < wanted:
            notes.append(f"Beam search keeps {num_beams} beams, so it can show at most {num_beams} captions per image; "
                         "raise the number of beams to see more.")
    else:
        count = 1
        if wanted > 1:
            notes.append("Greedy decoding (1 beam, no sampling) has only one answer; use more beams or turn on "
                         "sampling to see alternatives.")
    kwargs = dict(
        num_beams=num_beams,
        num_return_sequences=count,
        max_new_tokens=_clamp(int(settings.max_new_tokens), 1, MAX_NEW_TOKENS),
        do_sample=bool(settings.do_sample),
        # Scores: `sequences_scores` for beams; raw logits for greedy and sampling, scored in `average_log_probs`.
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
    )
    if settings.do_sample:
        # top_k=0 turns off the generation config's default top-50 cut, so top-p is the only truncation the user sets.
        kwargs.update(temperature=float(settings.temperature), top_p=float(settings.top_p), top_k=0)
    return kwargs, notes


def _clamp(value, low, high):
    return max(low, min(high, value))


@dataclass
class LoadedImage:
    name: str  # what the user calls it: the uploaded file's name or the URL
    image: object  # PIL.Image.Image
    preview: object  # what the result gallery shows: the uploaded file's path, or the image itself


class Captioner:
    """
    A loaded model and processor, and everything between a request and its captions: reading uploads and URLs
    within limits, decoding settings, scores. Thread-safe: up to `concurrency` generations run at once on the one
    model (sampled ones one at a time, as they share torch's random generator); further callers wait.

    Example:

    ```python
    >>> captioner = Captioner.from_pretrained("user/vision-gpt-flickr8k", dtype="bfloat16")
    >>> images, errors = captioner.load_inputs(["photo.jpg"], "")
    >>> captioner.caption([item.image for item in images], DecodingSettings(num_beams=3, num_captions=2))
    [[Caption(text='a dog runs through the grass', score=-0.61), Caption(text='a dog runs on the grass', ...)]]
    ```"""

    def __init__(self, model, processor, *, name: str = "model", max_upload_mb: float = 10, max_images: int = 8,
                 allow_urls: bool = True, allow_private_urls: bool = False, url_timeout: float = 5.0,
                 concurrency: int = 1):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (generations at once), got {concurrency}.")
        self.model = model.eval() if model is not None else None  # None: captions come from a server (remote.py)
        self.processor = processor
        self.name = name
        self.max_upload_bytes = int(max_upload_mb * MB)
        self.max_images = max_images
        self.allow_urls = allow_urls
        # Off by default: a public page that fetches any URL would let visitors probe this machine's own network.
        self.allow_private_urls = allow_private_urls
        self.url_timeout = url_timeout
        # Generations share the model's weights and nothing else: `generate` builds each call's cache and generation
        # config afresh, runs under no_grad, and the one thing it changes on the model, the packed CPU layers, is
        # swapped under a lock (packed_linear_vision_gpt.py). So several may run at once. Gradio's queue already
        # starts at most `concurrency` requests; the semaphore keeps that true for any other caller.
        self.concurrency = concurrency
        self._slots = threading.BoundedSemaphore(concurrency)

    @classmethod
    def from_pretrained(cls, model_path_or_id: str, *, dtype: str = "float32", device: str = "auto",
                        runtime: str = "torch", trust_remote_code: bool = False, **kwargs):
        """Load the model and processor once through `vision_gpt.inference.loading.load_model` (a folder or a Hub id),
        in `dtype`, on `device` ("auto": the accelerator when there is one). With `runtime="onnx"`, the folder is an
        export of `vision-gpt export-onnx`, run by ONNX Runtime on the CPU (`dtype` float32, float16, int8 or q8 picks
        its graphs). A repo that needs its own Python code loads only with `trust_remote_code=True`."""
        model, processor = load_model(model_path_or_id, runtime=runtime, dtype=dtype, device=device,
                                      trust_remote_code=trust_remote_code)
        name = f"{model_path_or_id} (ONNX Runtime)" if runtime == "onnx" else str(model_path_or_id)
        return cls(model, processor, name=name, **kwargs)

    @property
    def description(self) -> str:
        """What the page says runs the captions: the model, its precision and device."""
        # An ONNX captioner takes float32 pixels whatever its graphs compute in; `precision` names its graphs.
        dtype = getattr(self.model, "precision", None) or str(self.model.dtype).removeprefix("torch.")
        return f"`{self.name}` ({dtype}, {self.model.device.type})"

    @property
    def default_settings(self) -> DecodingSettings:
        """The panel's starting values: the model's saved generation config, so the page captions as `generate` does."""
        config = self.model.generation_config
        num_beams = _clamp(config.num_beams or 1, 1, MAX_BEAMS)
        return DecodingSettings(num_beams=num_beams, num_captions=num_beams,
                                max_new_tokens=_clamp(config.max_new_tokens or 32, 1, MAX_NEW_TOKENS))

    # ----- reading inputs ----------------------------------------------------------------------------------------

    def load_inputs(self, files, urls: str) -> tuple[list[LoadedImage], list[str]]:
        """
        Read uploaded files (paths) and URLs (one per line) into RGB images. Returns the images that loaded and one
        message per input that did not; a bad input never stops the others.
        """
        from ..modeling import ImageLoadError, load_image

        files = [files] if isinstance(files, (str, os.PathLike)) else list(files or [])
        url_list = [line.strip() for line in (urls or "").splitlines() if line.strip()]
        if url_list and not self.allow_urls:
            raise InputError("This app was started with URLs turned off; download the image and upload it instead.")
        total = len(files) + len(url_list)
        if total > self.max_images:
            raise InputError(f"{total} images were given; this app captions at most {self.max_images} at a time.")
        images, errors = [], []
        for path in files:
            path = os.fspath(path)
            name = os.path.basename(path)
            try:
                size = os.path.getsize(path)
                if size > self.max_upload_bytes:
                    raise InputError(f"{name} is {readable_size(size)}; the limit is {readable_size(self.max_upload_bytes)} per "
                                     "file. Downscale or recompress it and try again.")
                image = load_image(path)
            except (ImageLoadError, InputError, OSError) as error:
                # Messages name the server's temporary copy; the user knows the file by its own name.
                errors.append(str(error).replace(f"'{path}'", name).replace(path, name))
                continue
            images.append(LoadedImage(name, image, path))
        for url in url_list:
            try:
                data = self.fetch_url(url)
                image = load_image(image_from_bytes(data, url))
            except (ImageLoadError, InputError) as error:
                errors.append(str(error))
                continue
            images.append(LoadedImage(url, image, image))
        return images, errors

    def fetch_url(self, url: str) -> bytes:
        """
        Download an image URL within `url_timeout` seconds and the upload size limit. Offline, this fails at once
        (or after the timeout) with a message that says to upload the file instead, never a hang.
        """
        return fetch_url(url, max_bytes=self.max_upload_bytes, timeout=self.url_timeout,
                         allow_private=self.allow_private_urls)

    # ----- captioning --------------------------------------------------------------------------------------------

    def caption(self, images, settings: DecodingSettings) -> list[list[Caption]]:
        """One list of captions per image, best first (`run` also returns notes about adjusted settings)."""
        return self.run(images, settings)[0]

    def run(self, images, settings: DecodingSettings) -> tuple[list[list[Caption]], list[str]]:
        """Caption a list of RGB images in one batch; returns one list of captions per image, and the notes."""
        for kind, payload in self.stream(images, settings):
            if kind == "final":
                return payload
        raise RuntimeError("captioning ended without captions")

    def stream(self, images, settings: DecodingSettings, every: float = 0.1):
        """
        `run`, as the captions are written: yields `("partial", texts)`, one list of caption texts so far per image
        (the text each finished caption will start with), at most every `every` seconds while greedy decoding or
        sampling runs, then `("final", (captions, notes))` as `run` returns them. Beam search, whose best captions are
        known only at the end, and ONNX Runtime models yield only the final captions.
        """
        import queue

        import torch

        from ..inference.streaming import StepStreamer, TextStream

        kwargs, notes = generate_kwargs(settings)
        # The panel's sliders keep settings in range; the one check still guards callers that build settings by hand.
        check_decoding({name: kwargs.get(name) for name in FLAGS}, self.model.generation_config)
        count = kwargs["num_return_sequences"]
        inputs = self.processor(images=list(images)).to(self.model.device)
        kwargs["output_caption_scores"] = True
        texts = None
        if kwargs["num_beams"] == 1 and isinstance(self.model, torch.nn.Module):
            eos = self.model.generation_config.eos_token_id
            texts = [TextStream(self.processor.tokenizer, eos if isinstance(eos, list) else [eos])
                     for _ in range(len(images) * count)]
            steps: queue.SimpleQueue = queue.SimpleQueue()

            def on_step(tokens):
                for text, token in zip(texts, tokens):
                    text.add(token)
                steps.put("step")

            kwargs["streamer"] = StepStreamer(on_step)
        if texts is None:
            output = self._generate(inputs, kwargs, settings)
        else:
            # Generation runs on its own thread; this one hands the text written so far to the page.
            done: dict = {}

            def work():
                try:
                    done["output"] = self._generate(inputs, kwargs, settings)
                except BaseException as error:  # raised again below, in the caller's thread
                    done["error"] = error
                finally:
                    steps.put("done")

            worker = threading.Thread(target=work, name="vision-gpt-app-generate", daemon=True)
            worker.start()
            shown = time.monotonic()
            while steps.get() != "done":
                if time.monotonic() - shown >= every:
                    shown = time.monotonic()
                    yield "partial", [[text.sent for text in texts[i * count:(i + 1) * count]]
                                      for i in range(len(images))]
            worker.join()
            if "error" in done:
                raise done["error"]
            output = done["output"]
        if kwargs["num_beams"] > 1 or output.logits is None:
            # Beam search scores its sequences; so does ONNX Runtime's captioner, which returns no logits.
            scores = output.sequences_scores
        else:
            eos = self.model.generation_config.eos_token_id
            scores = average_log_probs(output, eos if isinstance(eos, list) else [eos])
        decoded = self.processor.batch_decode(output.sequences)
        trust = caption_trust(self.model, self.processor, inputs["pixel_values"], output, decoded)
        captions = [Caption(text, float(score), row.get("confidence"), row.get("grounding"))
                    for text, score, row in zip(decoded, scores.tolist(), trust)]
        # generate returns the `count` captions of each image together, each image's best first.
        yield "final", ([captions[i * count:(i + 1) * count] for i in range(len(images))], notes)

    def _generate(self, inputs, kwargs, settings: DecodingSettings):
        import torch

        with self._slots:
            if settings.do_sample:
                with _SAMPLING_LOCK:
                    # Same seed, same captions: sampling is reproducible from the page.
                    torch.manual_seed(int(settings.seed))
                    return self.model.generate(**inputs, **kwargs)
            return self.model.generate(**inputs, **kwargs)
