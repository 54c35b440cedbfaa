"""A frozen vision tower's features, computed once per image and kept on disk for training.

With the tower frozen, its output for an image never changes, yet a plain data loader recomputes it for each of the
image's five captions in every epoch. The cache computes it once and serves it from a memory-mapped file. Its folder is
named by a digest of everything the features depend on (the tower's weights and config, the image processor, which
features are taken, the storage dtype), so a changed model or processor never reads stale features.
"""

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NUMPY_DTYPES = {"float16": np.float16, "float32": np.float32}


def cache_key(model, image_processor, dtype: str = "float16") -> str:
    """Digest of the tower's weights and config, the image processor and the feature selection."""
    digest = hashlib.sha256()
    config = model.config
    describe = {
        "format": FORMAT_VERSION,
        "vision_config": config.vision_config.to_diff_dict(),
        "image_processor": json.loads(image_processor.to_json_string()),
        "pooled": config.visual_tokens == "pooled",
        "vision_feature_layer": config.vision_feature_layer,
        "dtype": dtype,
    }
    describe["vision_config"].pop("transformers_version", None)
    describe["image_processor"].pop("transformers_version", None)
    digest.update(json.dumps(describe, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.vision_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """
    Vision features of a frozen tower, one row per image, in `root/<digest>/features.npy` (memory-mapped).

    Example:

    ```python
    >>> cache = FeatureCache("~/.cache/vision-gpt/features", model, processor.image_processor)
    >>> cache.build(images)                   # computes only what is missing, once per image
    >>> cache.get(images[0].image_id).shape   # (N, Dv)
    >>> cache.build_from_stream(ids, pairs)   # the same for shards: every id listed, (id, image) pairs streamed
    ```"""

    def __init__(self, root, model, image_processor, dtype: str = "float16"):
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"Feature cache dtype {dtype!r} is not supported; use one of {list(_NUMPY_DTYPES)}.")
        self.model = model
        self.image_processor = image_processor
        self.dtype = dtype
        self.key = cache_key(model, image_processor, dtype)
        self.folder = Path(root).expanduser() / self.key[:20]
        self._index = None
        self._array = None
        self._unreadable = None

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def is_complete_for(self, image_ids) -> bool:
        """True if the folder holds finished features of this exact model for all `image_ids` (or knows them to be
        unreadable)."""
        if not self.manifest_path.is_file():
            return False
        manifest = json.loads(self.manifest_path.read_text())
        if manifest.get("key") != self.key:
            raise ValueError(
                f"Feature cache '{self.folder}' was written for another vision model or image processor (its key "
                f"{manifest.get('key', '?')[:12]}... is not {self.key[:12]}...); delete the folder or choose another "
                "--feature_cache_dir."
            )
        if not manifest.get("complete"):
            return False
        index = json.loads((self.folder / "index.json").read_text())
        known = set(index) | set(manifest.get("unreadable", {}))
        return all(image_id in known for image_id in image_ids)

    def build(self, images, batch_size: int = 32, num_workers: int = 0) -> None:
        """Compute the features of every image not yet cached; a no-op when all are there."""
        records = {record.image_id: record for record in images}
        if self.is_complete_for(records):
            logger.info("Feature cache %s holds all %d images; reusing it.", self.folder, len(records))
            return
        ids = sorted(records)
        self._compute(ids, ((image_id, records[image_id].image) for image_id in ids), batch_size)

    def build_from_stream(self, image_ids: list[str], images, batch_size: int = 32) -> None:
        """
        `build` for images streamed from shards, never all held: `image_ids` lists every image up front (the file's
        shape), `images` yields `(image_id, stored image)` pairs in any order, each decoded once, here. An image that
        does not decode, or a listed one that never comes (its shard broke off), is recorded as unreadable: `contains`
        is False for it, `unreadable` says why, and later runs do not try it again.
        """
        ids = list(dict.fromkeys(image_ids))
        if self.is_complete_for(ids):
            logger.info("Feature cache %s holds all %d images; reusing it.", self.folder, len(ids))
            return
        self._compute(ids, images, batch_size)

    def _compute(self, ids: list[str], images, batch_size: int) -> None:
        from ..data.images import open_stored_image
        from ..modeling.image_loading_vision_gpt import ImageLoadError

        self.folder.mkdir(parents=True, exist_ok=True)
        # The folder may hold a finished cache of other images: it stops being complete before its file is rewritten.
        self.manifest_path.unlink(missing_ok=True)
        rows = {image_id: row for row, image_id in enumerate(ids)}
        model = self.model
        was_training = model.training
        model.eval()
        features_path = self.folder / "features.npy"
        array, done, unreadable, pending = None, set(), {}, []
        logger.info("Computing vision features of %d images into %s (once; later runs reuse them).", len(ids),
                    self.folder)

        def flush():
            nonlocal array
            pixels = self.image_processor(images=[image for _, image in pending], return_tensors="pt")["pixel_values"]
            features = model.get_vision_features(pixels.to(model.device)).float().cpu().numpy()
            if array is None:
                shape = (len(ids),) + features.shape[1:]
                array = np.lib.format.open_memmap(features_path, mode="w+", dtype=_NUMPY_DTYPES[self.dtype],
                                                  shape=shape)
            for (row, _), feature in zip(pending, features):
                array[row] = feature
            pending.clear()

        try:
            with torch.no_grad():
                for image_id, stored in images:
                    if image_id not in rows or image_id in done or image_id in unreadable:
                        continue
                    try:
                        image = open_stored_image(stored, image_id)
                    except ImageLoadError as error:
                        unreadable[image_id] = str(error)
                        continue
                    done.add(image_id)
                    pending.append((rows[image_id], image))
                    if len(pending) == batch_size:
                        flush()
                if pending:
                    flush()
            if array is None:
                raise ValueError(f"None of the {len(ids)} images for the feature cache could be read, e.g. "
                                 f"{next(iter(unreadable.values()), ids[0] if ids else 'none listed')}.")
            array.flush()
        finally:
            model.train(was_training)
        for image_id in ids:
            if image_id not in done and image_id not in unreadable:
                unreadable[image_id] = f"{image_id} was listed but not found when its shard was read"
        (self.folder / "index.json").write_text(json.dumps({image_id: rows[image_id] for image_id in ids
                                                            if image_id in done}))
        # Written last: a run killed while building leaves no manifest saying "complete".
        manifest = {"key": self.key, "complete": True, "num_images": len(done), "shape": list(array.shape),
                    "dtype": self.dtype, "vision_model_type": model.config.vision_config.model_type,
                    "unreadable": unreadable}
        self.manifest_path.write_text(json.dumps(manifest, indent=2))
        self._index = self._array = self._unreadable = None

    def _open(self) -> None:
        # Opened lazily, so each data-loader worker maps the file itself.
        self._index = json.loads((self.folder / "index.json").read_text())
        self._array = np.load(self.folder / "features.npy", mmap_mode="r")
        self._unreadable = json.loads(self.manifest_path.read_text()).get("unreadable", {})

    def contains(self, image_id: str) -> bool:
        """Whether the cache holds features for `image_id` (False for one recorded as unreadable)."""
        if self._index is None:
            self._open()
        return image_id in self._index

    @property
    def unreadable(self) -> dict[str, str]:
        """`{image_id: why}` for the images the cache could not read."""
        if self._index is None:
            self._open()
        return self._unreadable

    def get(self, image_id: str) -> torch.Tensor:
        """Features of one image, `(N, Dv)` in float32."""
        if self._array is None:
            self._open()
        return torch.from_numpy(np.asarray(self._array[self._index[image_id]], dtype=np.float32))
