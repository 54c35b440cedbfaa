"""The caption job's DataLoader side: images read and preprocessed in worker processes (`ImageDecoder`), and
`caption_batches`, which turns each batch into output rows."""


from dataclasses import dataclass

import torch
from PIL import Image

from ..data.images import open_stored_image
from ..data.shards import ShardMember
from ..modeling.image_loading_vision_gpt import ImageLoadError, load_image
from .inputs import ImageRef
from ..inference.decoding import check_decoding
from ..inference.generation import one_line
from ..inference.loading import ONNX_DTYPES, load_model
from ..inference.trust import caption_trust, check_confidence_threshold, rerank_value
from .outputs import make_row


class ImageDecoder(torch.utils.data.Dataset):
    """Loads and preprocesses one image per item: `(key, pixel_values (C, H, W), None)`, or `(key, None, reason)` for
    an image that cannot be read, so that one bad file never stops the run. With a `score_processor` (CLIP's, for
    `--score clip`), the pixel values are a pair: the captioner's and CLIP's."""

    def __init__(self, refs: list[ImageRef], image_processor, dataset=None, max_image_pixels: int | None = None,
                 score_processor=None):
        self.refs = refs
        self.image_processor = image_processor
        self.dataset = dataset
        self.max_image_pixels = max_image_pixels
        # Only the image processor travels to the workers, not the CLIP model.
        self.score_processor = score_processor

    def __len__(self):
        return len(self.refs)

    def __getitem__(self, index):
        ref = self.refs[index]
        try:
            if ref.source is None:
                raise ImageLoadError(f"Shard sample '{ref.key}' has no image member (only its other files).")
            if isinstance(ref.source, ShardMember):
                image = open_stored_image(ref.source, ref.key)
            elif isinstance(ref.source, int):
                image = open_stored_image(self.dataset[ref.source][self.dataset.column_names[0]], ref.key)
            else:
                self._check_size(ref)  # from the header, before decoding
                image = load_image(ref.source)
            self._check_size(ref, image.size)
            pixel_values = self.image_processor(images=image, return_tensors="pt")["pixel_values"][0]
            if self.score_processor is not None:
                clip_pixels = self.score_processor(images=image, return_tensors="pt")["pixel_values"][0]
                pixel_values = (pixel_values, clip_pixels)
        except _TooLarge as error:
            return ref.key, None, (f"Image '{ref.key}' is too large: {error} (the limit is --max-image-pixels "
                                   f"{self.max_image_pixels}; raise it or downscale the image).")
        except ImageLoadError as error:
            return ref.key, None, one_line(error if ref.key in str(error) else f"Image '{ref.key}': {error}")
        except Image.DecompressionBombError as error:
            return ref.key, None, one_line(f"Image '{ref.key}' is too large to decode safely: {error}")
        except Exception as error:  # noqa: BLE001
            # PIL's format plugins raise many types on malformed files (struct.error, IndexError, ...); one such file
            # must cost one error row, not a 100k-image run.
            return ref.key, None, one_line(f"Image '{ref.key}' could not be read: {type(error).__name__}: {error}")
        return ref.key, pixel_values, None

    def _check_size(self, ref, size=None):
        """Refuse images over `--max-image-pixels` (a per-run limit; PIL's own guard, process-wide, stays as is)."""
        if self.max_image_pixels is None:
            return
        if size is None:
            try:
                with Image.open(ref.source) as header:
                    size = header.size
            except Exception:  # noqa: BLE001 - unreadable files get their real error from load_image next
                return
        if size[0] * size[1] > self.max_image_pixels:
            raise _TooLarge(f"{size[0]}x{size[1]} = {size[0] * size[1]} pixels")


class _TooLarge(ValueError):
    pass


def _keep_items(items):
    """The DataLoader's collate: items stay a list, since error items have no tensor to stack."""
    return items


@dataclass(frozen=True)
class RowOptions:
    """What every row holds besides its captions: trust scores (`scores`), and the review mark below a confidence."""

    scores: bool = True
    review_below: float | None = None
    # Order each image's candidates by this score and keep the best `num_captions` (None: generate's order).
    rerank: str | None = None
    candidates: int = 1
    # With --do-sample, the samples drawn per image for reranking (None: --num-captions, reordered).
    num_candidates: int | None = None


def row_options(args, model=None) -> RowOptions:
    """The flags' `RowOptions`: scores unless --no-caption-scores (PyTorch and ONNX Runtime models both score)."""
    check_confidence_threshold(args.review_below, "--review-below")
    for flag, value in (("--review-below", args.review_below), ("--rerank", args.rerank)):
        if value is not None and args.no_caption_scores:
            raise ValueError(f"{flag} reads the caption scores, which --no-caption-scores turns off; drop one of them.")
    num_candidates = getattr(args, "num_candidates", None)
    if num_candidates is not None and args.rerank is None:
        raise ValueError("--num-candidates is how many samples --rerank chooses from: give --rerank too.")
    return RowOptions(scores=not args.no_caption_scores, review_below=args.review_below, rerank=args.rerank,
                      num_candidates=num_candidates)


def rerank_settings(options: RowOptions, generate_kwargs: dict, settings: dict) -> RowOptions:
    """With --rerank, generate's candidates per image: every beam (or every sample), of which the best
    `num_captions` by the score are kept; `generate_kwargs` asks for them all."""
    if options.rerank is None:
        return options
    # Beam search returns its beams, best first; sampling draws --num-candidates captions (default --num-captions).
    if settings["do_sample"]:
        candidates = options.num_candidates or settings["num_captions"]
        if options.num_candidates is not None and candidates < settings["num_captions"]:
            raise ValueError(f"--num-candidates {candidates} is fewer than --num-captions "
                             f"({settings['num_captions']}): the best --num-captions are kept from the candidates.")
        too_few = candidates < 2
    else:
        if options.num_candidates is not None:
            raise ValueError("--num-candidates counts samples, with --do-sample; beam search's candidates are its "
                             "--num-beams beams.")
        candidates = settings["num_beams"]
        too_few = candidates <= settings["num_captions"]
    if too_few:
        raise ValueError(f"--rerank {options.rerank} chooses among candidates: give --num-beams above "
                         f"--num-captions ({settings['num_captions']}), or --do-sample with --num-candidates (or "
                         "--num-captions) 2 or more.")
    generate_kwargs["num_return_sequences"] = candidates
    return RowOptions(options.scores, options.review_below, options.rerank, candidates, options.num_candidates)


def caption_batches(loader, model, processor, generate_kwargs: dict, settings: dict, fmt: str | None,
                    scorer=None, options: RowOptions = RowOptions(scores=False)):
    """Yield the rows of each batch of `loader` (an `ImageDecoder`'s): readable images are captioned in one `generate`
    call, the others become error rows. With `options.scores`, every caption gets its confidence and grounding (two
    teacher-forced passes after generation); with a `scorer` (a `CLIPScorer`), each row also gets the CLIPScore of
    its first caption."""
    num_captions = settings["num_captions"]
    for items in loader:
        good = [(key, pixels) for key, pixels, error in items if error is None]
        captions, scores, trust = {}, {}, {}
        if good:
            own = [pixels[0] if scorer is not None else pixels for _, pixels in good]
            pixel_values = torch.stack(own).to(device=model.device, dtype=model.dtype)  # (B, C, H, W)
            output = model.generate(pixel_values=pixel_values, **generate_kwargs,
                                    **({"output_caption_scores": True} if options.scores else {}))
            sequences = output.sequences if options.scores else output  # (B * K, L), by image
            texts = [one_line(text) for text in processor.batch_decode(sequences)]
            per_caption = caption_trust(model, processor, pixel_values, output, texts) if options.scores else None
            k = options.candidates if options.rerank else num_captions
            for i, (key, _) in enumerate(good):
                pairs = list(zip(texts[i * k:(i + 1) * k], per_caption[i * k:(i + 1) * k] if per_caption else
                                 [None] * k))
                if options.rerank:  # best first by the score; a stable sort keeps generate's order on ties
                    pairs = sorted(pairs, key=lambda pair: -rerank_value(pair[1], options.rerank))
                pairs = pairs[:num_captions]
                captions[key] = [text for text, _ in pairs]
                if per_caption:
                    trust[key] = [row for _, row in pairs]
            if scorer is not None:
                values = scorer.score_pixels(torch.stack([pixels[1] for _, pixels in good]),
                                             [captions[key][0] for key, _ in good])
                scores = {key: round(value, 2) for (key, _), value in zip(good, values)}
        rows = [make_row(key, captions.get(key), error, settings, fmt, trust.get(key), options.scores,
                         options.review_below, options.rerank) for key, _, error in items]
        if scorer is not None:
            for row in rows:
                row["clipscore"] = scores.get(row["image"])
        yield rows


def load_captioner(args, device: torch.device, say=None):
    """(model on `device` in eval mode, processor, CLIPScorer or None) as the flags ask, through the one loader; with
    `--runtime onnx` the model is an `ONNXCaptioner` over an exported folder."""
    model, processor = load_model(args.model, runtime=args.runtime, dtype=args.dtype, device=device,
                                  trust_remote_code=args.trust_remote_code)
    scorer = None
    if args.score:
        from ..evaluation.clipscore import DEFAULT_MODEL as CLIP_MODEL
        from ..evaluation.clipscore import CLIPScorer, CLIPScoreSettings

        scorer = CLIPScorer(CLIPScoreSettings(model=args.clipscore_model or CLIP_MODEL), device=str(device))
        if say is not None:
            say(scorer.description)
    return model, processor, scorer


def run_settings(args, generation_config) -> tuple[dict, dict]:
    """(`generate` kwargs, the settings every row records, in `SETTINGS` order; the dtype of an ONNX run is recorded
    as `onnx-fp32`, `onnx-int8`, ...)."""
    given = {name: getattr(args, name) for name in ("num_beams", "max_new_tokens", "do_sample", "temperature", "top_p",
                                                    "top_k")}
    generate_kwargs, used = check_decoding({**given, "num_return_sequences": args.num_captions}, generation_config)
    used["num_captions"] = used.pop("num_return_sequences")
    dtype = f"onnx-{ONNX_DTYPES[args.dtype]}" if args.runtime == "onnx" else args.dtype
    return generate_kwargs, {"model": args.model, **used, "dtype": dtype, "seed": args.seed}
