"""The torch datasets training and evaluation read: image-caption pairs from records, a stream from shards, and the
collator that tokenizes captions."""

import logging

import numpy as np
import torch

from ..modeling.image_loading_vision_gpt import ImageLoadError
from .factory import clean_captions
from .images import open_stored_image
from .records import MAX_CAPTION_CHARS, CaptionedImage, DataReport
from .shard_splits import check_shards, describe_shards, shard_samples
from .shards import sample_id

logger = logging.getLogger(__name__)


class CaptionPairDataset(torch.utils.data.Dataset):
    """One item per (image, caption) pair, so every reference caption is a training example. Items carry either
    `pixel_values` or, from a frozen tower's feature cache, `vision_features`."""

    def __init__(self, images: list[CaptionedImage], image_processor, feature_cache=None):
        self.images = images
        self.pairs = [(index, caption) for index, record in enumerate(images) for caption in record.captions]
        self.image_processor = image_processor
        self.feature_cache = feature_cache

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image_index, caption = self.pairs[index]
        record = self.images[image_index]
        if self.feature_cache is not None:
            return {"vision_features": self.feature_cache.get(record.image_id), "caption": caption}
        return {"pixel_values": pixel_values_for(record.image, self.image_processor)[0], "caption": caption}


class StreamingCaptionDataset(torch.utils.data.IterableDataset):
    """
    (image, caption) pairs streamed from webdataset tars and parquet files, for training on sets too large to hold:
    items are what `CaptionPairDataset` gives, read as they are needed.

    The order is a function of `seed` and the pass alone, so that a resumed run, which skips the batches it already
    trained by reading them again, sees the very batches the interrupted one did. Each pass shuffles the shard order
    (seeded by seed and pass), deals the shards out to the data loader's workers (worker w of W reads shards w, w + W,
    ...: no pair twice, whatever W), and mixes each worker's pairs through a shuffle buffer of `shuffle_buffer_size`
    pairs (seeded by seed, pass and worker); the same W gives the same order. With `repeat` (training), pass follows
    pass without end: Trainer counts only --max_steps, and its "epoch" of a stream is the whole run, so the passes are
    counted here, from the one `set_epoch` sets (Trainer calls it, through Accelerate, with 0).

    With a `feature_cache` built for these shards (`FeatureCache.build_from_stream`), images are not read at all: items
    carry the cached features. Samples without an image or captions, captions that do not parse, images that do not
    decode and shards that break off are skipped and counted in `report` (the first of each kind is logged at once,
    and a summary after each pass), never stopping the run.

    Example:

    ```python
    >>> pairs = StreamingCaptionDataset(resolve_data_files("webdataset", "shards/{000000..000099}.tar"),
    ...                                 processor.image_processor, seed=42)
    >>> loader = DataLoader(pairs, batch_size=32, num_workers=4, collate_fn=CaptionCollator(processor))
    ```"""

    def __init__(self, shards: list[str], image_processor=None, feature_cache=None, seed: int = 0,
                 shuffle_buffer_size: int = 1000, repeat: bool = True, image_column: str | None = None,
                 caption_column: str | None = None, max_caption_chars: int = MAX_CAPTION_CHARS):
        if not shards:
            raise ValueError("StreamingCaptionDataset needs at least one shard.")
        if image_processor is None and feature_cache is None:
            raise ValueError("StreamingCaptionDataset needs an image_processor, or a feature_cache to read features "
                             "from.")
        check_shards(shards, image_column, caption_column)
        self.shards = list(shards)
        self.image_processor = image_processor
        self.feature_cache = feature_cache
        self.seed = seed
        self.shuffle_buffer_size = max(1, shuffle_buffer_size)
        self.repeat = repeat
        self.image_column = image_column
        self.caption_column = caption_column
        self.max_caption_chars = max_caption_chars
        self.epoch = 0
        self._warned, self._unreadable = set(), set()
        self.report = self._new_report()

    def _new_report(self) -> "StreamReport":
        return StreamReport(source=f"the stream of {describe_shards(self.shards)}", warned=self._warned)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def shard_order(self, epoch: int) -> list[str]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[index] for index in order]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        while True:
            shards = self.shard_order(epoch)[worker::workers]
            if not shards:
                logger.warning("Data loader worker %d of %d has no shard to read (there are %d): use at most %d "
                               "--dataloader_num_workers.", worker, workers, len(self.shards), len(self.shards))
                return
            count = 0
            self.report, self._unreadable = self._new_report(), set()
            for item in self._pass(shards, np.random.default_rng([self.seed, epoch, worker])):
                count += 1
                yield item
            logger.info("Pass %d over %s%s: %d pairs from %d shards.\n%s", epoch, self.report.source,
                        f" (worker {worker} of {workers})" if workers > 1 else "", count, len(shards),
                        "\n".join(self.report.problems()))
            # A pass with nothing usable would repeat forever.
            if not self.repeat or count == 0:
                return
            epoch += 1

    def _pass(self, shards: list[str], rng):
        """One pass over `shards` through the shuffle buffer: a pair enters the buffer in a random slot, and the pair
        it displaces leaves; what is left at the end leaves in random order."""
        buffer = []
        for pair in self._pairs(shards, self.report):
            if len(buffer) < self.shuffle_buffer_size:
                buffer.append(pair)
                continue
            slot = int(rng.integers(len(buffer)))
            pair, buffer[slot] = buffer[slot], pair
            item = self._item(*pair)
            if item is not None:
                yield item
        for slot in rng.permutation(len(buffer)):
            item = self._item(*buffer[slot])
            if item is not None:
                yield item

    def _pairs(self, shards: list[str], report: DataReport):
        """`(image_id, encoded image or None, caption)` in file order; the bytes of an image are shared by its
        captions' pairs, and are decoded only when a pair leaves the buffer."""
        images = self.feature_cache is None
        for path in shards:
            try:
                samples = shard_samples(path, report, images=images, image_column=self.image_column,
                                        caption_column=self.caption_column)
                for sample in samples:
                    image_id = sample_id(path, sample.key)
                    captions = clean_captions(image_id, sample.captions, report, self.max_caption_chars)
                    if not captions:
                        report.add("images with no usable caption", image_id)
                    for caption in captions:
                        yield image_id, sample.data, caption
            except ValueError as error:  # a shard replaced or removed since the run started
                report.add("shards that could not be opened", str(error))

    def first_pair_or_problems(self) -> tuple[tuple | None, DataReport]:
        """The stream's first (image_id, caption) pair (None if it has none), and what was skipped before it: read
        up to the first usable sample only, so a run over shards with nothing to train on stops at start."""
        report = DataReport(self.report.source)
        pair = next(self._pairs(self.shards, report), None)
        return (None if pair is None else (pair[0], pair[2])), report

    def _item(self, image_id: str, data: bytes | None, caption: str) -> dict | None:
        """The pair as a training item, or None (counted once per image) if its image cannot be had."""
        if image_id in self._unreadable:
            return None
        problem = None
        if self.feature_cache is not None:
            if self.feature_cache.contains(image_id):
                return {"vision_features": self.feature_cache.get(image_id), "caption": caption}
            problem = self.feature_cache.unreadable.get(image_id, f"{image_id} is not in the feature cache")
        else:
            try:
                image = open_stored_image({"bytes": data, "path": image_id}, image_id)
                pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
                return {"pixel_values": pixel_values[0], "caption": caption}
            except ImageLoadError as error:
                problem = str(error)
        self._unreadable.add(image_id)
        self.report.add("unreadable images", problem)
        return None


class StreamReport(DataReport):
    """A `DataReport` that also logs the first problem of each kind at once (once per kind in `warned`, shared across
    passes): a pass over the shards can take hours, and its summary comes only at its end."""

    def __init__(self, source: str, warned: set):
        super().__init__(source)
        self.warned = warned

    def add(self, reason: str, example: str, action: str = "Skipped") -> None:
        if reason not in self.warned:
            self.warned.add(reason)
            logger.warning("%s %s in %s, e.g. %s (counted; a summary follows each pass).", action, reason,
                           self.source, example)
        super().add(reason, example, action)


def pixel_values_for(image, image_processor) -> torch.Tensor:
    """`(1, 3, H, W)` pixel values for one stored image."""
    return image_processor(images=[open_stored_image(image)], return_tensors="pt")["pixel_values"]


class CaptionCollator:
    """Pads each batch to its longest caption (labels are -100 on padding and on the start token)."""

    def __init__(self, processor, max_length: int = 64):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        tokens = self.processor.encode_captions([item["caption"] for item in items], max_length=self.max_length)
        batch = {key: torch.tensor(value) for key, value in tokens.items()}
        for key in ("pixel_values", "vision_features"):
            if key in items[0]:
                batch[key] = torch.stack([item[key] for item in items])
        return batch
