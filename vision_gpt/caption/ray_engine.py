"""`vision-gpt caption --engine ray`: the same job, its images captioned by a pool of Ray Data actors.

The driver (this process) lists the inputs, skips what the output already holds, and hands Ray one small row per image
(its key and where to read it: a path, a shard member, a `datasets` row). Each actor loads the model once and turns a
batch of those rows into output rows with the very code of the local engine (`ImageDecoder`, `caption_batches`), so
the captions, the error rows and the recorded settings are the same as `vision-gpt caption` without Ray. Rows stream
back to the driver, which appends and flushes them as they arrive: a killed run loses only the batches in flight, and
rerunning the command resumes.

With no cluster named (`--address`, or `RAY_ADDRESS`), `ray.init()` starts a local Ray instance for the run, so the
same command runs on a laptop and, with `--address auto` on a cluster's head node, on every node. A cluster's nodes
need vision-gpt installed and the inputs at the same paths (a shared file system); the model may be a Hub id.
"""

import argparse
import json

import torch

from ..data.shards import ShardMember

# The flags an actor needs to load the model and caption exactly as the local engine does.
ACTOR_OPTIONS = ("model", "dtype", "runtime", "device", "trust_remote_code", "num_beams", "max_new_tokens", "do_sample",
                 "temperature", "top_p", "top_k", "num_captions", "seed", "score", "clipscore_model",
                 "max_image_pixels", "cpus_per_worker", "no_caption_scores", "review_below", "rerank",
                 "num_candidates")


def model_generation_config(args):
    """The model's decoding defaults, read without loading its weights: enough to check the decoding flags before
    any actor starts."""
    from transformers import AutoConfig, GenerationConfig

    problem = None
    try:
        return GenerationConfig.from_pretrained(args.model)
    except OSError:
        try:
            return GenerationConfig.from_model_config(
                AutoConfig.from_pretrained(args.model, trust_remote_code=args.trust_remote_code))
        except (OSError, ValueError) as error:
            problem = error
    raise ValueError(f"Could not load the model --model '{args.model}': {problem}\nPass a folder written by "
                     "save_pretrained (or `vision-gpt assemble`), or a Hub id; offline (HF_HUB_OFFLINE=1) a Hub model "
                     "must already be in the cache.")


def encode_ref(ref) -> str:
    """An `ImageRef` as one JSON string: Ray's rows then have one column of one type, whatever the inputs mix.
    ASCII escapes keep file names that are not UTF-8 (surrogate escapes) intact through Arrow."""
    source = ref.source
    if isinstance(source, ShardMember):
        source = {"member": vars(source)}
    return json.dumps({"key": ref.key, "source": source})


def decode_ref(text: str):
    from .inputs import ImageRef

    data = json.loads(text)
    source = data["source"]
    if isinstance(source, dict):
        source = ShardMember(**source["member"])
    return ImageRef(data["key"], source)


class RayCaptioner:
    """A Ray Data actor: loads the captioner once, then maps batches `{"ref": [...]}` to `{"row": [...]}`, each row
    the JSON of an output row as the local engine writes it."""

    def __init__(self, options: dict, output_format: str | None, dataset=None):
        from transformers import set_seed

        from .workers import load_captioner, rerank_settings, row_options, run_settings

        args = argparse.Namespace(**options)
        if args.cpus_per_worker:
            torch.set_num_threads(max(1, int(args.cpus_per_worker)))
        # Ray makes the GPU it reserved for this actor the only visible one.
        wants_gpu = args.device != "cpu" and torch.cuda.is_available()
        device = torch.device("cuda" if wants_gpu else "cpu")
        self.model, self.processor, self.scorer = load_captioner(args, device)
        self.generate_kwargs, self.settings = run_settings(args, self.model.generation_config)
        self.options = rerank_settings(row_options(args, self.model), self.generate_kwargs, self.settings)
        self.output_format = output_format
        self.max_image_pixels = args.max_image_pixels
        self.dataset = dataset
        if args.seed is not None:
            set_seed(args.seed)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .workers import ImageDecoder, caption_batches

        refs = [decode_ref(text) for text in batch["ref"]]
        decoder = ImageDecoder(refs, self.processor.image_processor, self.dataset, self.max_image_pixels,
                               self.scorer.image_processor if self.scorer is not None else None)
        items = [decoder[index] for index in range(len(refs))]
        rows = next(caption_batches([items], self.model, self.processor, self.generate_kwargs, self.settings,
                                    self.output_format, self.scorer, self.options))
        out = np.empty(len(rows), dtype=object)
        out[:] = [json.dumps(row) for row in rows]
        return {"row": out}


def _start_ray(address: str | None):
    """(ray, True if this run started the instance). A running instance in this process (a notebook's) is reused."""
    import ray

    if ray.is_initialized():
        return ray, False
    # Without an address (and without RAY_ADDRESS), ray.init starts a local instance that ends with this process.
    ray.init(address=address, include_dashboard=False, logging_level="WARNING")
    return ray, True


def _actor_resources(ray, workers: int, cpus_per_worker: float | None, device: str) -> tuple[float, int]:
    """(CPUs, GPUs) each actor reserves: by default an equal share of the cluster's CPUs, at most one node's, and one
    GPU where the cluster has as many as actors and --device allows it."""
    resources = ray.cluster_resources()
    total = resources.get("CPU", 1.0)
    node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=total)
    cpus = cpus_per_worker if cpus_per_worker is not None else max(1.0, min(node, total // workers))
    if cpus <= 0:
        raise ValueError(f"--cpus-per-worker must be positive, got {cpus_per_worker}.")
    if cpus > node or workers * cpus > total:
        raise ValueError(f"--num-workers {workers} actors of {cpus:g} CPUs each do not fit this Ray cluster "
                         f"({total:g} CPUs, at most {node:g} on one node); use fewer workers or --cpus-per-worker.")
    gpus = 1 if device != "cpu" and resources.get("GPU", 0) >= workers else 0
    if device.startswith("cuda") and not gpus:
        raise ValueError(f"--device {device} with --engine ray needs a GPU per actor: the cluster has "
                         f"{resources.get('GPU', 0):g} GPUs for {workers} actors.")
    return cpus, gpus


def caption_with_ray(args, todo, dataset, say):
    """Yield the output rows of `todo` (a list of `ImageRef`) batch by batch, as Ray's actors finish them."""
    from .outputs import output_format

    if not todo:
        return
    ray, started = _start_ray(args.address)
    try:
        workers = args.num_workers or 1
        cpus, gpus = _actor_resources(ray, workers, args.cpus_per_worker, args.device)
        options = {name: getattr(args, name) for name in ACTOR_OPTIONS}
        options["cpus_per_worker"] = cpus
        fmt = output_format(args.output) if args.output else None
        say(f"captioning {len(todo)} images with {args.model} on Ray: {workers} actor{'s' * (workers > 1)} of "
            f"{cpus:g} CPUs{f' and {gpus} GPU' if gpus else ''} ({args.dtype}), batch size {args.batch_size}")
        refs = ray.data.from_items([{"ref": encode_ref(ref)} for ref in todo])
        rows = refs.map_batches(
            RayCaptioner, fn_constructor_kwargs={"options": options, "output_format": fmt, "dataset": dataset},
            batch_size=args.batch_size, compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=cpus, num_gpus=gpus,
        )
        try:
            for batch in rows.iter_batches(batch_size=None, batch_format="numpy"):
                yield [json.loads(text) for text in batch["row"]]
        except ray.exceptions.RayError as error:
            raise ValueError(f"--engine ray: an actor failed: {_root_cause(error)}") from None
    finally:
        if started:
            ray.shutdown()


def _root_cause(error) -> str:
    cause = getattr(error, "cause", None)
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return str(cause or error).strip().splitlines()[-1]
