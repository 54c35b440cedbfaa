"""
`VisionGPTCaptioner`: a captioner that data engines host, for collections too large for one `vision-gpt caption` run.

The engines that caption millions of images all take the same shape of function: a class that loads its model once
per worker and maps a batch, a dict of columns, to a batch with more columns. Ray Data's `map_batches` with an actor
pool constructs it on each actor; `datasets.Dataset.map(batched=True)` calls an instance; Spark's `mapInPandas`
iterator UDF builds one per task. This one adds the caption (and with several per image, all of them and their
scores), an error column for images that cannot be read, and the model and decoding settings, to every row.
"""

import json

import torch

from ..data.images import open_stored_image
from ..modeling.image_loading_vision_gpt import ImageLoadError
from .decoding import check_decoding, settings_in_use
from .generation import average_log_probs, one_line
from .loading import dtype_name, load_model

# Generation settings recorded in every row's `decoding` column, in this order, with what generate used for each.
RECORDED = ("num_beams", "num_return_sequences", "max_new_tokens", "do_sample", "temperature", "top_p", "top_k",
            "repetition_penalty", "no_repeat_ngram_size", "length_penalty", "seed")
OUTPUT_COLUMNS = ("caption", "captions", "scores", "error", "model", "model_revision", "decoding")


class VisionGPTCaptioner:
    r"""
    Loads a vision-gpt model (a folder or a Hub id, at `revision`) once, and captions batches of rows.

    `__call__(batch)` takes a dict of equal-length columns (lists or numpy arrays, as `datasets` and Ray pass them; a
    pandas DataFrame comes back as one) whose `image_column` holds, per row, a file path, encoded image bytes, a PIL
    image, a numpy array (what `ray.data.read_images` gives) or a `datasets` image cell (`{"bytes", "path"}`). It
    returns the batch with these columns added:

    - `caption`: the best caption ("" for an image that could not be read);
    - `captions` and `scores` (only with `num_return_sequences` > 1): every caption, best first, and its average
      log-probability per token (beam search's `sequences_scores` with beams); "" and NaN for an unreadable image;
    - `error`: "" for a captioned image, else why it could not be read (missing file, not an image, truncated); such
      rows never stop the batch. Empty strings rather than nulls keep every column's type the same in every batch,
      which Arrow writers (`datasets`, Ray, parquet) need: a first batch of nulls would fix a column's type as null;
    - `model`, `model_revision`, `decoding`: the model as given, the revision asked for (the commit it resolved to for
      a Hub id, where the Hub client can tell; "" for a local folder), and a JSON object of every decoding setting
      generate used.

    `generation_kwargs` are `generate`'s (`num_beams`, `max_new_tokens`, `do_sample`, `temperature`, `top_p`,
    `num_return_sequences`, ...); those not given come from the model's generation config. With `do_sample`, `seed`
    seeds each batch, so a batch's captions do not depend on which worker ran it or when.

    The captioner pickles as its constructor arguments, not its weights: an engine ships it to workers (and `datasets`
    fingerprints it) cheaply, and each worker loads the model once where it is unpickled.

    Example:

    ```python
    >>> import ray
    >>> from vision_gpt import VisionGPTCaptioner
    >>> images = ray.data.read_binary_files("s3://bucket/photos/", include_paths=True)
    >>> captioned = images.map_batches(VisionGPTCaptioner, fn_constructor_kwargs={"model": "user/vision-gpt-flickr8k",
    ...     "image_column": "bytes", "num_beams": 3}, compute=ray.data.ActorPoolStrategy(size=4),
    ...     batch_size=32)
    >>> captioned.write_parquet("captions/")
    ```"""

    def __init__(self, model: str, *, image_column: str = "image", dtype: str = "float32", device: str = "auto",
                 revision: str | None = None, seed: int = 0, trust_remote_code: bool = False, **generation_kwargs):
        if "generation_config" in generation_kwargs:
            raise ValueError("VisionGPTCaptioner takes generate's settings one by one (num_beams=..., "
                             "max_new_tokens=...), so that every row can record them; not a generation_config.")
        self._arguments = dict(model=model, image_column=image_column, dtype=dtype, device=device, revision=revision,
                               seed=seed, trust_remote_code=trust_remote_code, **generation_kwargs)
        name = dtype_name(dtype)
        self.image_column = image_column
        self.seed = seed
        self.model_name, self.revision = str(model), revision
        self.model, self.processor = load_model(model, dtype=name, device=device, revision=revision,
                                                trust_remote_code=trust_remote_code)
        self.generate_kwargs, self.settings = _decoding(self.model.generation_config, generation_kwargs, seed)
        self.settings["dtype"] = name
        self.resolved_revision = _resolved_revision(str(model), revision)
        if self.resolved_revision:  # workers that unpickle it load this commit, not whatever the branch is by then
            self._arguments["revision"] = self.resolved_revision

    def __reduce__(self):
        # The weights' identity travels too (unused when rebuilding): `datasets` fingerprints the pickle, so captions
        # cached for a folder whose model was retrained in place are not served again.
        return _rebuild, (type(self), self._arguments, _weights_identity(self.model_name))

    @property
    def num_captions(self) -> int:
        return self.settings["num_return_sequences"]

    def __call__(self, batch):
        if type(batch).__name__ == "DataFrame":  # pandas, as Spark's mapInPandas and Ray's "pandas" format pass it
            import pandas

            return pandas.DataFrame(self(batch.to_dict(orient="list")))
        if self.image_column not in batch:
            raise KeyError(f"The batch has no column {self.image_column!r} (it has {sorted(batch)}); pass "
                           "image_column= to name the column that holds the images.")
        taken = sorted(set(batch) & set(OUTPUT_COLUMNS))
        if taken:
            raise ValueError(f"The batch already has the column(s) {taken}, which VisionGPTCaptioner writes; rename "
                             "them first (e.g. `dataset.rename_column(\"caption\", \"reference\")`), so no data is "
                             "overwritten.")
        cells = list(batch[self.image_column])
        images, errors = [], []
        for index, cell in enumerate(cells):
            try:
                images.append(_open(cell, _describe(batch, index)))
                errors.append("")
            except ImageLoadError as error:
                images.append(None)
                errors.append(one_line(error))
            except Exception as error:  # noqa: BLE001 - PIL's plugins raise many types on malformed files
                images.append(None)
                errors.append(one_line(f"{_describe(batch, index)} could not be read: {type(error).__name__}: {error}"))
        captions, scores = self._caption([image for image in images if image is not None])
        columns = {"caption": [], "error": errors}
        if self.num_captions > 1:
            columns.update(captions=[], scores=[])
        readable = iter(zip(captions, scores))
        for image in images:
            # An unreadable image's lists are as long as the others (of "" and NaN): typed like every other batch's.
            texts, values = next(readable) if image is not None else ([""] * self.num_captions,
                                                                      [float("nan")] * self.num_captions)
            columns["caption"].append(texts[0] if texts else "")
            if self.num_captions > 1:
                columns["captions"].append(texts)
                columns["scores"].append(values)
        count = len(cells)
        columns["model"] = [self.model_name] * count
        columns["model_revision"] = [self.resolved_revision or ""] * count
        columns["decoding"] = [json.dumps(self.settings, sort_keys=True)] * count
        like_numpy = hasattr(batch[self.image_column], "dtype")  # Ray's default batches are numpy arrays
        out = dict(batch)
        for name, values in columns.items():
            out[name] = _object_array(values) if like_numpy else values
        return out

    @torch.no_grad()
    def _caption(self, images) -> tuple[list[list[str]], list[list[float]]]:
        """For each image, its `num_captions` captions, best first, and their scores."""
        if not images:
            return [], []
        inputs = self.processor(images=images).to(self.model.device)
        if self.settings["do_sample"]:
            torch.manual_seed(self.seed)
        beams = self.settings["num_beams"] > 1
        # Only what the scores need: a (sequences, vocabulary) tensor per step is large.
        output = self.model.generate(**inputs, **self.generate_kwargs, return_dict_in_generate=True,
                                     output_scores=beams, output_logits=not beams)
        texts = [one_line(text) for text in self.processor.batch_decode(output.sequences)]
        if beams:
            values = output.sequences_scores
        else:
            eos = self.model.generation_config.eos_token_id
            values = average_log_probs(output, eos if isinstance(eos, list) else [eos])
        values = [round(float(value), 4) for value in values]
        n = self.num_captions
        if len(texts) != n * len(images):
            raise RuntimeError(f"generate returned {len(texts)} captions for {len(images)} images, not {n} each.")
        captions, scores = [], []
        for i in range(len(images)):
            # Best first: beam search returns its captions so ordered, sampling in the order drawn.
            ranked = sorted(zip(texts[i * n:(i + 1) * n], values[i * n:(i + 1) * n]), key=lambda pair: -pair[1])
            captions.append([text for text, _ in ranked])
            scores.append([value for _, value in ranked])
        return captions, scores


def _rebuild(cls, arguments, weights_identity=None):
    return cls(**arguments)


def _weights_identity(model: str):
    """(name, size, mtime) of a local folder's weight files; None for a Hub id, whose revision is pinned instead."""
    import os

    if not os.path.isdir(model):
        return None
    return sorted((name, os.stat(os.path.join(model, name)).st_size, os.stat(os.path.join(model, name)).st_mtime_ns)
                  for name in os.listdir(model) if name.endswith((".safetensors", ".bin")))


def _open(cell, description: str):
    """An RGB PIL image from a cell: path, bytes, PIL image, numpy array, or a `datasets` image dict."""
    if isinstance(cell, (bytes, bytearray, memoryview)):
        cell = {"bytes": bytes(cell), "path": None}
    return open_stored_image(cell, description)


def _describe(batch, index: int) -> str:
    """How an error names a row: its path where the batch has one (`path` is what Ray's file readers add)."""
    for name in ("path", "file_name", "image_path", "key"):
        if name in batch:
            return f"'{batch[name][index]}'"
    return f"row {index} of the batch"


def _object_array(values):
    import numpy as np

    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _decoding(generation_config, given: dict, seed: int) -> tuple[dict, dict]:
    """(`generate` kwargs, every setting generate uses as recorded in the rows), checked by the one decoding check."""
    if given.get("output_scores") is not None or given.get("return_dict_in_generate") is not None:
        raise ValueError("VisionGPTCaptioner asks generate for scores itself; drop output_scores and "
                         "return_dict_in_generate.")
    generate_kwargs, used = check_decoding(given, generation_config)
    # The recorded settings the check does not cover (repetition_penalty, ...): as generate uses them.
    used.update(settings_in_use(generation_config, given, [name for name in RECORDED[:-1] if name not in used]))
    used["seed"] = seed if used["do_sample"] else None
    extra = {name: value for name, value in given.items() if name not in used}
    return generate_kwargs, {**used, **extra}


def _resolved_revision(model: str, revision: str | None) -> str | None:
    """The commit a Hub id resolves to (`revision` when the Hub cannot be asked); None for a local folder, which has
    no revisions (`revision` does not apply to it)."""
    import os

    if os.path.isdir(model):
        return None
    try:
        from huggingface_hub import model_info

        return model_info(model, revision=revision).sha or revision
    except Exception:  # noqa: BLE001 - offline or private: the revision asked for is what there is to record
        return revision


__all__ = ["VisionGPTCaptioner"]
