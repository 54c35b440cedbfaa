"""Caption evaluation: the COCO caption metrics as papers report them, statistics that expose degenerate captioners,
token-weighted perplexity, and a markdown table to compare models side by side.

The caption metrics are pycocoevalcap's (the COCO evaluation server's code): captions are lowercased and tokenized by
Stanford's PTB tokenizer with punctuation removed, then scored by BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D and, when its
Stanford CoreNLP models are installed, SPICE. PTB tokenization, METEOR and SPICE run Java.
"""

import contextlib
import math
import numbers
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

# `evaluate.load(CAPTION_METRICS_PATH)` gives the same numbers as `compute_caption_metrics`, as an `evaluate` metric.
CAPTION_METRICS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "caption_metrics")

JAVA_INSTALL_HINT = "apt-get install openjdk-17-jre-headless"
_METEOR_EXIT_TIMEOUT_S = 10
# The METEOR scorer of the active `caption_metrics_session()`, shared by the `compute_caption_metrics` calls in it.
_session_meteor = None


# ----- caption metrics -----------------------------------------------------------------------------------------------


def compute_caption_metrics(
    predictions: Mapping | Sequence[str],
    references: Mapping | Sequence[Sequence[str]],
    spice: bool | None = None,
) -> dict:
    r"""
    Corpus-level BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (and SPICE) on the 0-100 scale captioning papers use, computed
    by pycocoevalcap exactly as the COCO caption evaluation server does (PTB tokenization, punctuation removed).

    Args:
        predictions: one generated caption per image, as `{image_id: caption}` or a list. Empty captions are allowed
            and score 0.
        references: the ground-truth captions per image, as `{image_id: [caption, ...]}` (same ids as `predictions`)
            or a list of lists aligned with `predictions`. Every image needs at least one reference with a word in it.
        spice: `None` computes SPICE when pycocoevalcap's Stanford CoreNLP jars are installed and otherwise reports
            why it was skipped under `"SPICE_skipped"`; `True` requires SPICE (raises if it cannot run); `False` never
            runs it (SPICE takes minutes and 8 GB of Java heap).

    Returns:
        `{"BLEU-1", ..., "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"}` as floats in [0, 100] (CIDEr-D can exceed 100: its
        scale is 0-1000), `"num_images"`, `"num_references"` (reference captions in total), and either `"SPICE"` or a
        one-line `"SPICE_skipped"` reason (neither with `spice=False`). BLEU-n is the cumulative corpus BLEU over 1- to
        n-grams with the closest reference length for the brevity penalty; METEOR aggregates statistics over the
        corpus; ROUGE-L, CIDEr-D and SPICE are means over images. CIDEr-D's document frequencies come from the
        references passed in, so it is only comparable between runs on the same reference set, and it is 0 for a
        single image.

    Example:

    ```python
    >>> from vision_gpt.evaluation import compute_caption_metrics
    >>> metrics = compute_caption_metrics(
    ...     {1: "A dog runs on the beach.", 2: "a cat on a sofa"},
    ...     {1: ["a dog runs on the beach", "a brown dog running"], 2: ["a cat sleeps on a red sofa"]},
    ...     spice=False,
    ... )
    >>> round(metrics["BLEU-1"], 1), metrics["num_images"], metrics["num_references"]
    (83.4, 2, 3)
    ```
    """
    ids, prediction_list, reference_lists = _validate_captions(predictions, references)
    if spice is not False:
        spice_skipped = _spice_unavailable_reason()
        if spice and spice_skipped:
            raise RuntimeError(spice_skipped)
    _require_java()
    bleu_cls, cider_cls, rouge_cls = _import_scorers()

    # Positions, not the caller's ids, key pycocoevalcap's dicts: SPICE sorts and JSON-dumps them, which breaks on
    # mixed or non-JSON ids.
    res, gts = _ptb_tokenize(prediction_list, reference_lists)
    for index, refs in gts.items():
        for number, ref in enumerate(refs):
            if not ref:
                raise ValueError(
                    f"Reference {number} of image {ids[index]!r} ({reference_lists[index][number]!r}) has no words "
                    "after PTB tokenization, which drops punctuation; fix or remove that reference."
                )
    bleu, _ = bleu_cls(4).compute_score(gts, res, verbose=0)
    metrics = {f"BLEU-{n}": 100.0 * float(bleu[n - 1]) for n in range(1, 5)}
    meteor_context = _meteor_scorer() if _session_meteor is None else contextlib.nullcontext(_session_meteor)
    with meteor_context as meteor:
        metrics["METEOR"] = 100.0 * _meteor_score(meteor, gts, res)
    metrics["ROUGE-L"] = 100.0 * float(rouge_cls().compute_score(gts, res)[0])
    # pycocoevalcap's `Cider` is CIDEr-D: clipped n-gram counts, a Gaussian length penalty (sigma 6) and a factor of 10,
    # as on the COCO server; `method()` still says "CIDEr".
    metrics["CIDEr-D"] = 100.0 * float(cider_cls().compute_score(gts, res)[0])
    if spice is not False:
        if spice_skipped is None:
            spice_score, spice_error = _spice_score(gts, res)
            if spice_error is not None:
                if spice:
                    raise RuntimeError(spice_error)
                metrics["SPICE_skipped"] = spice_error
            else:
                metrics["SPICE"] = 100.0 * spice_score
        else:
            metrics["SPICE_skipped"] = spice_skipped
    metrics["num_images"] = len(ids)
    metrics["num_references"] = sum(len(refs) for refs in reference_lists)
    return metrics


@contextlib.contextmanager
def caption_metrics_session():
    r"""
    Share one METEOR Java process between the [`compute_caption_metrics`] calls inside the block; it is ended when the
    block exits. METEOR spends seconds loading its paraphrase table at every start, which dominates when scoring
    several models or evaluating every epoch. Scores are the same as without a session: METEOR keeps no state
    between calls. Nested sessions reuse the outermost one's process.

    Example:

    ```python
    >>> from vision_gpt.evaluation import caption_metrics_session, compute_caption_metrics, format_metrics_table
    >>> with caption_metrics_session():
    ...     rows = {name: compute_caption_metrics(captions, references) for name, captions in generated.items()}
    >>> print(format_metrics_table(rows))
    ```
    """
    global _session_meteor
    if _session_meteor is not None:
        yield
        return
    _require_java()
    _import_scorers()
    with _meteor_scorer() as scorer:
        _session_meteor = scorer
        try:
            yield
        finally:
            _session_meteor = None


def _validate_captions(predictions, references):
    """Image ids, captions and reference lists in one order; ValueError naming the image for anything malformed."""
    if isinstance(predictions, Mapping) != isinstance(references, Mapping):
        raise ValueError(
            f"`predictions` is a {type(predictions).__name__} but `references` is a {type(references).__name__}; pass "
            "both as dicts keyed by image id, or both as lists in the same order."
        )
    if isinstance(predictions, Mapping):
        missing_refs = [i for i in predictions if i not in references]
        missing_preds = [i for i in references if i not in predictions]
        if missing_refs or missing_preds:
            raise ValueError(
                "`predictions` and `references` must cover the same image ids: "
                f"no references for {missing_refs[:5]}{' ...' if len(missing_refs) > 5 else ''}, "
                f"no prediction for {missing_preds[:5]}{' ...' if len(missing_preds) > 5 else ''}."
            )
        ids = list(predictions)
        prediction_list = [predictions[i] for i in ids]
        reference_lists = [references[i] for i in ids]
    else:
        for name, value in (("predictions", predictions), ("references", references)):
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise ValueError(f"`{name}` must be a dict keyed by image id or a list, got {type(value).__name__}.")
        if len(predictions) != len(references):
            raise ValueError(
                f"`predictions` has {len(predictions)} captions but `references` has {len(references)} lists; pass "
                "one list of reference captions per prediction."
            )
        ids = list(range(len(predictions)))
        prediction_list, reference_lists = list(predictions), list(references)
    if not ids:
        raise ValueError("`predictions` is empty; there is nothing to score.")

    for image_id, prediction, refs in zip(ids, prediction_list, reference_lists):
        if not isinstance(prediction, str):
            raise ValueError(
                f"The prediction for image {image_id!r} must be a string, got {type(prediction).__name__}: "
                f"{prediction!r}."
            )
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(
                f"The references for image {image_id!r} must be a list of strings, got {type(refs).__name__}: "
                f"{refs!r}; wrap a single reference as [caption]."
            )
        if len(refs) == 0:
            raise ValueError(f"The references for image {image_id!r} are an empty list; give at least one caption.")
        for number, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(
                    f"Reference {number} of image {image_id!r} must be a string, got {type(ref).__name__}: {ref!r}."
                )
    return ids, prediction_list, [list(refs) for refs in reference_lists]


def _require_java():
    if shutil.which("java") is None:
        raise RuntimeError(
            "Caption metrics need Java: pycocoevalcap's PTB tokenizer and METEOR run `java`, and no `java` is on PATH. "
            f"Install a Java runtime (Debian/Ubuntu: `{JAVA_INSTALL_HINT}`) or put its `bin` folder on PATH."
        )


def _import_scorers():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError as error:
        raise ImportError("Caption metrics need pycocoevalcap: `pip install 'pycocoevalcap>=1.2'`.") from error
    return Bleu, Cider, Rouge


def _ptb_tokenize(predictions: list[str], references: list[list[str]]):
    """pycocoevalcap's PTB tokenization of predictions and references in one JVM run, keyed by position."""
    from pycocoevalcap.tokenizer import ptbtokenizer

    jar_dir = os.path.dirname(os.path.abspath(ptbtokenizer.__file__))
    if not os.access(jar_dir, os.W_OK):
        raise RuntimeError(
            f"pycocoevalcap's PTB tokenizer writes its input file next to its jar, in {jar_dir}, which is not "
            "writable; install pycocoevalcap where this user can write (e.g. in a virtualenv)."
        )
    # The tokenizer runs with -preserveLines and reads the captions back line by line: a carriage return, form feed or
    # Unicode line separator inside a caption would shift every later caption onto the wrong image.
    captions = {("prediction", i): [{"caption": " ".join(text.split())}] for i, text in enumerate(predictions)}
    for i, refs in enumerate(references):
        captions[("reference", i)] = [{"caption": " ".join(text.split())} for text in refs]
    tokenized = ptbtokenizer.PTBTokenizer().tokenize(captions)
    if any(len(tokenized.get(key, ())) != len(value) for key, value in captions.items()):
        raise RuntimeError(
            "pycocoevalcap's PTB tokenizer returned fewer lines than it was given; see Java's error above."
        )
    res = {i: tokenized[("prediction", i)] for i in range(len(predictions))}
    gts = {i: tokenized[("reference", i)] for i in range(len(references))}
    return res, gts


@contextlib.contextmanager
def _meteor_scorer():
    """pycocoevalcap's METEOR, whose Java process is ended on exit; pycocoevalcap only ends it in `__del__`."""
    import threading

    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        yield scorer
    finally:
        process = scorer.meteor_p
        # EOF on stdin ends the jar's read loop; kill only if it does not exit. Closing the pipe of a process that
        # already died raises BrokenPipeError, and the process is then ended all the same.
        with contextlib.suppress(OSError):
            process.stdin.close()
        try:
            process.wait(timeout=_METEOR_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()
        # `compute_score` leaves its lock held when it raises, and `Meteor.__del__` acquires it: without a fresh lock
        # garbage collection would block forever.
        scorer.lock = threading.Lock()


def _meteor_score(scorer, gts, res) -> float:
    # METEOR's protocol is one line per caption; `|||` separates fields (pycocoevalcap strips it from hypotheses
    # only). PTB output has neither newlines nor `|||` (it splits it into `| | |`), so both sides are safe.
    try:
        score, _ = scorer.compute_score(gts, res)
    except (ValueError, OSError) as error:
        # A closed pipe (OSError) or an answer that is not a number (ValueError, b"" once it exited): the jar died,
        # often for want of the 2 GB heap it asks for, or lost the protocol. Either way it cannot answer any more.
        process = scorer.meteor_p
        process.kill()
        process.wait()
        detail = " | ".join(process.stderr.read().decode(errors="replace").strip().splitlines()[-3:])
        raise RuntimeError(
            f"METEOR's Java process (meteor-1.5.jar, -Xmx2G) stopped with status {process.returncode}: "
            f"{detail or 'no error output'}."
        ) from error
    return float(score)


def _spice_unavailable_reason() -> str | None:
    """None when SPICE can run, else a one-line reason; never triggers pycocoevalcap's download."""
    try:
        from pycocoevalcap.spice import get_stanford_models as spice_models
    except ImportError:
        return "SPICE skipped: pycocoevalcap is not installed (`pip install 'pycocoevalcap>=1.2'`)."
    lib_dir = os.path.join(os.path.abspath(spice_models.SPICEDIR), spice_models.SPICELIB)
    jars = (f"{spice_models.JAR}.jar", f"{spice_models.JAR}-models.jar")
    missing = [jar for jar in jars if not os.path.isfile(os.path.join(lib_dir, jar))]
    if missing:
        return (
            f"SPICE skipped: Stanford CoreNLP ({', '.join(missing)}) is not in {lib_dir}; run "
            "`python -m pycocoevalcap.spice.get_stanford_models` once with internet access to install it."
        )
    return None


def _spice_score(gts, res) -> tuple[float | None, str | None]:
    """SPICE in [0, 1], or None and a one-line reason when its Java process fails."""
    from pycocoevalcap.spice.spice import Spice

    try:
        score, _ = Spice().compute_score(gts, res)
    except subprocess.CalledProcessError as error:
        return None, (
            f"SPICE failed: `java -jar spice-1.0.jar` exited with status {error.returncode} (Java's error is printed "
            "above); SPICE 1.0 is known to fail on Java 17 and later (use Java 8 or 11) and asks for 8 GB of heap."
        )
    return float(score), None


# ----- caption statistics ---------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+(?:'\w+)*")


def _words(caption: str) -> list[str]:
    return _WORD.findall(caption.lower())


def repeats_phrase(words: Sequence[str]) -> bool:
    r"""
    Whether a caption (as a word list) repeats a phrase, the way a degenerate decoder loops. True when either
    - some word trigram occurs at least twice, overlapping allowed ("on top of a hill on top of a hill"), or
    - a phrase is repeated back to back: one word three times in a row ("a a a"), or a phrase of two or more words
      twice in a row ("on the on the").
    Short phrases that recur apart ("a man on a board on a wave") are normal English and do not count.

    Example:

    ```python
    >>> repeats_phrase("a man on top of a hill on top of a hill".split()), repeats_phrase("a man on a board".split())
    (True, False)
    ```
    """
    words = list(words)
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(set(trigrams)) < len(trigrams):
        return True
    for i in range(len(words) - 2):
        if words[i] == words[i + 1] == words[i + 2]:
            return True
    for length in range(2, len(words) // 2 + 1):
        for i in range(len(words) - 2 * length + 1):
            if words[i : i + length] == words[i + length : i + 2 * length]:
                return True
    return False


def caption_statistics(predictions: Sequence[str]) -> dict:
    r"""
    Statistics of generated captions that expose degenerate captioners (one caption for every image, short or looping
    captions), which the reference-based metrics can hide.

    Words are lowercase runs of letters and digits (apostrophes inside words kept: "dog's"), so case and punctuation
    do not count. Returns:
    - `num_captions`: how many captions.
    - `vocabulary_size`: distinct words over all captions.
    - `distinct_captions_pct`: percentage of captions that are distinct (as word sequences); 100 means no caption is
      repeated for two images.
    - `mean_length_words`: mean caption length in words.
    - `empty_captions_pct`: percentage of captions without a word.
    - `repeating_captions_pct`: percentage of captions that repeat a phrase, as [`repeats_phrase`] defines it.

    Example:

    ```python
    >>> from vision_gpt.evaluation import caption_statistics
    >>> stats = caption_statistics(["A dog runs.", "a dog runs", "a cat a cat a cat"])
    >>> stats["vocabulary_size"], stats["distinct_captions_pct"], stats["repeating_captions_pct"]
    (4, 66.66666666666667, 33.333333333333336)
    ```
    """
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise ValueError(f"`predictions` must be a list of captions, got {type(predictions).__name__}.")
    if len(predictions) == 0:
        raise ValueError("`predictions` is empty; there are no captions to describe.")
    for index, caption in enumerate(predictions):
        if not isinstance(caption, str):
            raise ValueError(f"Caption {index} must be a string, got {type(caption).__name__}: {caption!r}.")
    tokenized = [_words(caption) for caption in predictions]
    count = len(tokenized)
    return {
        "num_captions": count,
        "vocabulary_size": len({word for words in tokenized for word in words}),
        "distinct_captions_pct": 100.0 * len({tuple(words) for words in tokenized}) / count,
        "mean_length_words": sum(len(words) for words in tokenized) / count,
        "empty_captions_pct": 100.0 * sum(not words for words in tokenized) / count,
        "repeating_captions_pct": 100.0 * sum(repeats_phrase(words) for words in tokenized) / count,
    }


# ----- perplexity -----------------------------------------------------------------------------------------------------


def perplexity(model, dataloader) -> dict:
    r"""
    Token-weighted perplexity of `model` on the captions of a split: the summed next-token negative log-likelihood of
    every label token over all batches, divided by the number of those tokens, so batches of different sizes and
    caption lengths weigh by their tokens (the mean of per-batch losses does not).

    Args:
        model: a [`VisionGPTForConditionalGeneration`]; put in eval mode for the run and restored afterwards.
        dataloader: an iterable of batches as the processor makes them: dicts with `pixel_values`, `input_ids`,
            `attention_mask` and `labels` (`-100` on padding and on the start token).

    Returns:
        `{"loss": mean NLL per token (nats), "perplexity": exp(loss), "num_tokens": label tokens scored}`.

    Example:

    ```python
    >>> from torch.utils.data import DataLoader
    >>> from vision_gpt.evaluation import perplexity
    >>> loader = DataLoader(validation_set, batch_size=32, collate_fn=collate)
    >>> perplexity(model, loader)
    {'loss': 2.31, 'perplexity': 10.07, 'num_tokens': 48213}
    ```
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_nll = 0.0
    num_tokens = 0
    try:
        with torch.no_grad():
            for step, batch in enumerate(dataloader):
                missing = [key for key in ("pixel_values", "input_ids", "labels") if key not in batch]
                if missing:
                    raise ValueError(
                        f"Batch {step} has no {missing}; perplexity needs batches with `pixel_values`, `input_ids`, "
                        "`attention_mask` and `labels`, as the processor returns for `suffix=`."
                    )
                attention_mask = batch.get("attention_mask")
                outputs = model(
                    pixel_values=batch["pixel_values"].to(device),
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=attention_mask.to(device) if attention_mask is not None else None,
                )
                logits = outputs.logits[:, :-1].float()  # (B, T-1, V): position i predicts token i + 1
                targets = batch["labels"][:, 1:].to(device)  # (B, T-1)
                nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum")
                total_nll += nll.item()
                num_tokens += int((targets != -100).sum())
    finally:
        model.train(was_training)
    if num_tokens == 0:
        raise ValueError(
            "The dataloader has no label tokens (all `labels` are -100, or it is empty); there is nothing to score."
        )
    loss = total_nll / num_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "num_tokens": num_tokens}


# ----- reporting ------------------------------------------------------------------------------------------------------


def format_metrics_table(rows: Mapping[str, Mapping]) -> str:
    r"""
    A markdown table comparing models: one column per entry of `rows` (model name to the dict from
    `compute_caption_metrics`, `caption_statistics` or `perplexity`, or several merged), one line per metric in order
    of first appearance. Floats get one decimal (the caption metrics are already on the 0-100 scale), integers such
    as `num_images` stay integers, a metric a model lacks shows as "-" and one it could not measure (None) as "n/a".
    Text values such as `"SPICE_skipped"` are
    listed under the table.

    Example:

    ```python
    >>> from vision_gpt.evaluation import format_metrics_table
    >>> rows = {"vision-gpt": {"CIDEr-D": 91.234, "num_images": 5000}, "baseline": {"CIDEr-D": 80.0}}
    >>> print(format_metrics_table(rows))
    | metric | vision-gpt | baseline |
    |---|---:|---:|
    | CIDEr-D | 91.2 | 80.0 |
    | num_images | 5000 | - |
    ```
    """
    if not rows:
        raise ValueError("`rows` is empty; pass {model_name: metrics_dict, ...}.")
    names = list(rows)
    metrics, notes = [], []
    for name in names:
        for key, value in rows[name].items():
            if isinstance(value, str):
                notes.append(f"- {name}: {value}")
            elif key not in metrics:
                metrics.append(key)

    def cell(name, key):
        row = rows[name]
        if key not in row:
            return "-"
        value = row[key]
        if value is None:
            return "n/a"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"Metric {key!r} of {name!r} is {value!r}; the table takes numbers (and text notes).")
        return str(value) if isinstance(value, numbers.Integral) else f"{float(value):.1f}"

    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in metrics:
        lines.append(f"| {key} | " + " | ".join(cell(name, key) for name in names) + " |")
    if notes:
        lines += [""] + notes
    return "\n".join(lines)


__all__ = [
    "CAPTION_METRICS_PATH",
    "caption_metrics_session",
    "caption_statistics",
    "compute_caption_metrics",
    "format_metrics_table",
    "perplexity",
    "repeats_phrase",
]
