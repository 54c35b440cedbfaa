"""Captions as they are written: each decoding step's tokens from `generate`, and each caption's text that can no
longer change. Shared by `vision-gpt serve` (server-sent events) and `vision-gpt app` (the page), so that both show
the text that the finished caption will start with, never a piece they later take back.

    streams = [TextStream(processor.tokenizer, eos) for _ in range(batch_size)]
    def on_step(tokens):                      # one new token per sequence
        for stream, token in zip(streams, tokens):
            delta = stream.add(token)         # "" until more of the text is settled
    model.generate(**inputs, num_beams=1, streamer=StepStreamer(on_step))
"""


class StepStreamer:
    """transformers' streamer protocol (`put`, `end`): `generate` puts the prompt first, then each step's new tokens,
    one per sequence, `(B * num_return_sequences,)`; `on_step` gets each step's as a list. Beam search cannot stream:
    transformers refuses a streamer with `num_beams > 1`."""

    def __init__(self, on_step):
        self.on_step = on_step
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.on_step(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class TextStream:
    """
    One sequence's caption while it is generated. `add(token)` returns the text newly settled by that token: the
    caption stripped of surrounding spaces (as a finished caption is), without trailing spaces, half of a multi-byte
    character, or the beginning of a stop string, which the next tokens could still change. After an end token, or a
    stop string, the stream is `finished` and ignores further tokens (padding).
    """

    def __init__(self, tokenizer, eos_token_ids, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)
        self.stop = tuple(stop)
        self.tokens: list[int] = []
        self.sent = ""
        self.finished = False

    def add(self, token: int) -> str:
        if self.finished:
            return ""
        if token in self.eos:
            self.finished = True
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if cut_at_stop(text, self.stop) is not None:
            self.finished = True  # the finished caption ends before the stop string: what was sent is all of it
            return ""
        settled = text.strip().rstrip("\ufffd")
        # Without a possible stop string's beginning, and then without the spaces that were before it.
        settled = settled[:len(settled) - _stop_prefix_length(settled, self.stop)].rstrip()
        if not settled.startswith(self.sent) or len(settled) <= len(self.sent):
            return ""
        delta, self.sent = settled[len(self.sent):], settled
        return delta

    def rest(self, final_text: str) -> str:
        """What the finished caption adds to the text already sent ("" if the stream sent all of it)."""
        return final_text[len(self.sent):] if final_text.startswith(self.sent) else ""


def cut_at_stop(text: str, stop: tuple[str, ...]) -> int | None:
    """Where the first stop string begins in `text`, or None."""
    positions = [text.find(s) for s in stop if s in text]
    return min(positions) if positions else None


def _stop_prefix_length(text: str, stop: tuple[str, ...]) -> int:
    """The longest end of `text` that begins a stop string, which more text could complete."""
    best = 0
    for s in stop:
        for length in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:length]):
                best = max(best, length)
                break
    return best
