"""The web app in front of a `vision-gpt serve` server: the page reads uploads and URLs as always, and the captions
come from the server over its OpenAI-compatible API, streamed, each image its own request, so that the server
batches the page's images with everyone else's requests.

    vision-gpt serve ./my-model --port 8000                     # the engine
    vision-gpt app --server http://127.0.0.1:8000/v1            # the page in front of it
"""

import math
import queue
import time
from concurrent.futures import ThreadPoolExecutor

from ..inference.remote_images import InputError
from .captioner import Caption, Captioner, DecodingSettings, generate_kwargs


class RemoteCaptioner(Captioner):
    """
    A `Captioner` whose captions come from a `vision-gpt serve` server at `server_url` (its `/v1` address). The
    settings panel's choices become the request's fields (beams: `use_beam_search` and `best_of`; sampling:
    `temperature`, `top_p`, `seed`; greedy: `temperature: 0`), and every caption comes with its confidence and
    grounding (`return_caption_scores`). The score column shows log(confidence): the average log-probability per
    token, end token included (for beam search, without beam search's length penalty).
    """

    def __init__(self, server_url: str, *, api_key: str | None = None, timeout: float = 300, **kwargs):
        from openai import OpenAI

        self.server_url = server_url.rstrip("/")
        self.client = OpenAI(base_url=self.server_url, api_key=api_key or "none", max_retries=0, timeout=timeout)
        try:
            models = [model.id for model in self.client.models.list().data]
        except Exception as error:  # connection refused, a wrong key, not an OpenAI-compatible server
            raise ValueError(f"Could not list the models of {self.server_url} ({error}); is `vision-gpt serve` "
                             "running there, and is the key right?") from None
        if not models:
            raise ValueError(f"{self.server_url} serves no model.")
        self.served_model = models[0]
        # The server batches requests itself: the page may send several at once.
        kwargs.setdefault("concurrency", 4)
        super().__init__(None, None, name=self.served_model, **kwargs)

    @property
    def description(self) -> str:
        return f"`{self.served_model}`, served by {self.server_url}"

    @property
    def default_settings(self) -> DecodingSettings:
        return DecodingSettings()

    def request_fields(self, settings: DecodingSettings) -> tuple[dict, int, list[str]]:
        """The chat-completion fields for `settings`, the captions per image, and notes on adjusted settings."""
        kwargs, notes = generate_kwargs(settings)
        fields = {"max_tokens": kwargs["max_new_tokens"], "n": kwargs["num_return_sequences"],
                  "return_caption_scores": True}
        if kwargs["do_sample"]:
            # top_k 0, as the in-process app samples: top-p is the only cut the panel sets.
            fields.update(temperature=kwargs["temperature"], top_p=kwargs["top_p"], top_k=0, seed=int(settings.seed))
        elif kwargs["num_beams"] > 1:
            fields.update(use_beam_search=True, best_of=kwargs["num_beams"])
        else:
            fields["temperature"] = 0
        return fields, kwargs["num_return_sequences"], notes

    def stream(self, images, settings: DecodingSettings, every: float = 0.1):
        import base64
        import io

        from openai import APIError, APIStatusError

        fields, count, notes = self.request_fields(settings)
        if not images:
            yield "final", ([], notes)
            return
        texts = [[""] * count for _ in images]
        scores = [[{} for _ in range(count)] for _ in images]
        updates: queue.SimpleQueue = queue.SimpleQueue()

        def caption(index: int) -> None:
            buffer = io.BytesIO()
            images[index].save(buffer, "PNG")  # lossless, so the server reads the pixels the page read
            kind = "png"
            if buffer.tell() > self.max_upload_bytes:
                # A large photo grows as PNG beyond what was uploaded: send it as a high-quality JPEG instead.
                buffer = io.BytesIO()
                images[index].save(buffer, "JPEG", quality=95)
                kind = "jpeg"
            url = f"data:image/{kind};base64," + base64.b64encode(buffer.getvalue()).decode()
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
            fixed = {key: value for key, value in fields.items() if key in ("max_tokens", "n", "temperature",
                                                                            "top_p", "seed")}
            extra = {key: value for key, value in fields.items() if key not in fixed}
            for chunk in self.client.chat.completions.create(model=self.served_model, messages=messages,
                                                              stream=True, extra_body=extra, **fixed):
                for choice in chunk.choices:
                    texts[index][choice.index] += choice.delta.content or ""
                    if choice.finish_reason is not None:
                        scores[index][choice.index] = dict(choice.model_extra or {})
                updates.put(None)

        with self._slots, ThreadPoolExecutor(len(images), thread_name_prefix="vision-gpt-app-remote") as pool:
            futures = [pool.submit(caption, index) for index in range(len(images))]
            shown = time.monotonic()
            while not all(future.done() for future in futures):
                try:
                    updates.get(timeout=0.05)
                except queue.Empty:
                    continue
                if time.monotonic() - shown >= every:
                    shown = time.monotonic()
                    yield "partial", [list(row) for row in texts]
            for future in futures:
                try:
                    future.result()
                except APIStatusError as error:
                    raise InputError(f"The server refused the request: {error.message}") from None
                except APIError as error:  # an error event in the stream, a lost connection, a timeout
                    raise InputError(f"The server could not caption the image: {error}") from None
        results = []
        for row_texts, row_scores in zip(texts, scores):
            results.append([Caption(text, _log(score.get("confidence")), score.get("confidence"),
                                    score.get("grounding")) for text, score in zip(row_texts, row_scores)])
        yield "final", (results, notes)


def _log(value):
    return math.log(value) if value else None

