"""The OpenAI chat-completions protocol as `vision-gpt serve` speaks it: the request body, the replies, and errors in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), each naming what was wrong.

Request fields follow OpenAI's API reference for `POST /v1/chat/completions`. Those a captioner cannot honour
(`tools`, `logprobs`, `response_format`, ...) are refused with a 400 naming them, never silently dropped. Beam search,
which OpenAI's protocol lacks, is the extra field `use_beam_search` with `best_of` beams, as vLLM names them.
"""

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class OpenAIError(Exception):
    """An error reply: HTTP `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields a captioner has no way to honour. Sent with a value other than their neutral one, they are refused.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logprobs": False,
               "top_logprobs": None, "response_format": None, "logit_bias": None, "audio": None, "modalities": None,
               "prediction": None, "presence_penalty": 0, "frequency_penalty": 0}


class ChatCompletionRequest(BaseModel):
    """The body of `POST /v1/chat/completions`. Fields left out take the model's `generation_config` values."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)  # what torch.manual_seed takes
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's names for beam search: `best_of` beams, the best `n` returned.
    # vLLM's extra sampling field: sample from the K most likely tokens (0: no such cut).
    top_k: int | None = Field(default=None, ge=0)
    use_beam_search: bool = False
    best_of: int | None = Field(default=None, ge=1)
    # vision-gpt's trust scores: each choice gets `confidence` and `grounding` (see VisionGPTCaptionScores).
    return_caption_scores: bool = False

    def unsupported_fields(self) -> list[str]:
        extra = self.model_extra or {}
        return sorted(name for name, value in extra.items() if name not in UNSUPPORTED or value != UNSUPPORTED[name])


def parse_request(body: Any) -> ChatCompletionRequest:
    """The request, or a 400 `OpenAIError` naming the first field that is wrong."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "The request body must be a JSON object.")
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise OpenAIError(400, f"Invalid '{where}': {first['msg']}.", param=where) from None
    unsupported = request.unsupported_fields()
    if unsupported:
        raise OpenAIError(400, f"This server does not support {', '.join(repr(f) for f in unsupported)}: it serves "
                               "an image captioner (text and image_url content parts).", param=unsupported[0])
    if request.max_tokens is not None and request.max_completion_tokens is not None:
        raise OpenAIError(400, "Give 'max_tokens' or 'max_completion_tokens', not both.", param="max_tokens")
    return request


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(request_id: str, model: str, texts: list[str], finish_reasons: list[str], prompt_tokens: int,
               completion_tokens: int, scores: list[dict] | None = None) -> dict:
    """A whole `chat.completion` reply: one choice per returned caption (with its trust scores, where asked)."""
    choices = [{"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": reason} for index, (text, reason) in enumerate(zip(texts, finish_reasons))]
    for choice, extra in zip(choices, scores or []):
        choice.update(extra)
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(request_id: str, model: str, created: int, index: int, delta: dict, finish_reason: str | None = None,
          usage_counts: dict | None = None, choices: bool = True, scores: dict | None = None) -> dict:
    """One `chat.completion.chunk` of a streamed reply (the usage chunk has no choices; a choice's last chunk carries
    its trust scores, where asked)."""
    body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason,
                         **(scores or {})}] if choices else []}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body
