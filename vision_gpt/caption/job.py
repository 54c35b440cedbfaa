"""`vision-gpt caption`: caption many images with a trained model, resumably, on one or many processes, or on Ray.

Inputs are image files, folders (searched recursively), glob patterns, list files (`--from-file`), webdataset tar
shards and parquet files (`vision_gpt.data.shards`), and `datasets` splits (`--dataset`). Images are decoded and
preprocessed by DataLoader workers while the model generates, so decoding overlaps generation. A few images (at most
`TABLE_LIMIT`, no `--output`) are printed as a table; otherwise rows go to a JSONL, CSV or parquet file, appended and
flushed after every batch, one line per image (a parquet output collects its rows in a JSONL file next to it until the
run ends). Rerunning with the same `--output` skips the images it already holds, so an interrupted job loses at most
one batch. Under `accelerate launch` every process captions its share into a part file next to `--output`, and the
main process merges the parts when all are done. With `--engine ray` (`ray_engine`), Ray Data actors
caption the images and this process writes their rows.

An image that cannot be read becomes an error row naming the file and the reason; the run goes on and exits with 1.
"""

import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..inference.loading import check_runtime, resolve_device
from .inputs import IMAGE_EXTENSIONS, ImageRef, collect_inputs, load_dataset_split
from .output_lock import OutputLock
from .outputs import (
    SCORE_FILE_SETTINGS,
    SETTINGS,
    RowWriter,
    _repair,
    absorb_parquet,
    csv_columns,
    finish_parquet,
    format_table,
    merge_parts,
    output_format,
    parquet_schema,
    part_path,
    prepare_output,
    row_store,
    score_file_columns,
)
from .score_file import read_caption_file, score_batches
from .workers import (ImageDecoder, _keep_items, caption_batches, load_captioner, rerank_settings, row_options,
                      run_settings)

# Up to this many images (and no --output) the captions are printed as a table; more belong in a resumable file.
TABLE_LIMIT = 20


def _resolve_device(requested: str, state) -> torch.device:
    if state.num_processes > 1:
        if requested not in ("auto", "cpu"):
            raise ValueError(f"--device {requested} cannot be used under a multi-process launch: each process takes "
                             "its own accelerator. Leave --device auto (or use cpu).")
        return state.device
    # accelerate's choice for "auto": this process's own accelerator under a launcher.
    return state.device if requested == "auto" else resolve_device(requested)


def _broadcast(state, value):
    """`value` as computed on the main process, on every process."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def _gather(state, values: list) -> list:
    if state.num_processes == 1:
        return values
    from accelerate.utils import gather_object

    return gather_object(values)


def _on_main(state, function):
    """Run `function` on the main process only and hand its result (or its ValueError) to every process, so that a
    user error on the main process stops all of them instead of leaving the others waiting."""
    result = error = None
    if state.is_main_process:
        try:
            result = function()
        except ValueError as caught:
            error = str(caught)
    result, error = _broadcast(state, (result, error))
    if error is not None:
        raise ValueError(error)
    return result


def run(args) -> int:
    """Caption the inputs of `args` (parsed by the parser `register` builds). Returns the exit code: 0, or 1 when
    any image could not be captioned."""
    from accelerate import PartialState

    def say(message):
        if state.is_main_process:
            print(message, file=sys.stderr, flush=True)

    if not (args.images or args.from_file or args.dataset or args.score_captions):
        raise ValueError("Nothing to caption: give image files, folders or glob patterns, --from-file LIST, or "
                         "--dataset NAME_OR_FOLDER.")
    if args.score_captions:
        clashes = {"--dataset": args.dataset, "--engine ray": args.engine == "ray",
                   "--no-caption-scores": args.no_caption_scores, "--score clip": args.score, "--rerank": args.rerank}
        clash = next((flag for flag, given in clashes.items() if given), None)
        if clash:
            raise ValueError(f"--score-captions scores the captions of its file on this machine; it cannot be "
                             f"combined with {clash}.")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}.")
    if args.clipscore_model and not args.score:
        raise ValueError("--clipscore-model is the model of --score clip: add --score clip.")
    # Checked before anything is read: the loader checks them again where the model loads (an actor, with Ray).
    args.dtype = check_runtime(args.runtime, args.dtype or "float32", args.device)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.engine == "ray":
        if world_size > 1:
            raise ValueError("--engine ray runs from one process, which hands the images to Ray's actors; start it "
                             "with plain `vision-gpt caption`, not under accelerate launch or torchrun.")
        if args.num_workers is not None and args.num_workers < 1:
            raise ValueError(f"--num-workers is the number of Ray actors with --engine ray: at least 1, got "
                             f"{args.num_workers}.")
    elif args.address or args.cpus_per_worker is not None:
        raise ValueError(f"{'--address' if args.address else '--cpus-per-worker'} is for --engine ray; add "
                         "--engine ray, or drop it.")
    # Under torchrun without accelerators, PartialState() would make every process a separate single-process run;
    # cpu=True makes them one gloo group that splits the images.
    use_cpu = args.device == "cpu" or args.runtime == "onnx" or (
        world_size > 1 and not torch.accelerator.is_available())
    state = PartialState(cpu=use_cpu)
    # With Ray, the actors take the devices of the nodes they run on, which the driver's machine may lack.
    device = torch.device("cpu") if args.engine == "ray" else _resolve_device(args.device, state)

    captions = None
    if args.score_captions:
        captions = read_caption_file(args.score_captions)
        refs = [ImageRef(key, key) for key in captions]
        if args.images or args.from_file:  # positional inputs limit the scoring to those images
            wanted = {ref.key for ref in collect_inputs(args.images, args.from_file, args.image_column,
                                                         args.id_column)}
            refs = [ref for ref in refs if ref.key in wanted]
            if not refs:
                raise ValueError(f"None of the images given is in {args.score_captions}; nothing to score.")
    else:
        refs = collect_inputs(args.images, args.from_file, args.image_column, args.id_column)
    dataset = None
    if args.dataset:
        dataset, dataset_refs = load_dataset_split(args.dataset, args.split, args.image_column, args.id_column)
        refs += dataset_refs
    if not refs:
        raise ValueError("The inputs hold no images (folders are searched for " + ", ".join(IMAGE_EXTENSIONS) + ").")
    if args.output is None and len(refs) > TABLE_LIMIT:
        raise ValueError(f"{len(refs)} images are too many for a table on the terminal (at most {TABLE_LIMIT}); pass "
                         "--output captions.jsonl (or .csv): rows are written as they are captioned, and rerunning "
                         "the same command resumes where it stopped.")
    fmt = output_format(args.output) if args.output else None
    lock = None
    if args.output:
        # One job per output, for the whole run (the other processes of a multi-process run write part files
        # that the main process merges): taken before the model loads, so a second job stops at once.
        lock = OutputLock(Path(args.output)) if state.is_main_process else None
        if lock is not None:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        for note in _on_main(state, lambda: lock.acquire()):
            say(note)
    try:
        return _caption(args, state, device, refs, dataset, fmt, say, captions)
    finally:
        if lock is not None:
            lock.release()


def _caption(args, state, device, refs, dataset, fmt, say, captions=None) -> int:
    from transformers import set_seed

    if args.engine == "ray":
        from .ray_engine import model_generation_config

        # The actors load the model; here only its decoding defaults are needed, to check the flags before Ray starts.
        model = processor = scorer = None
        generate_kwargs, settings = run_settings(args, model_generation_config(args))
        # The actors load the model; scores come from PyTorch models, which is what Ray runs.
        options = rerank_settings(row_options(args), dict(generate_kwargs), settings)  # checked here, set per actor
    else:
        model, processor, scorer = load_captioner(args, device, say)
        generate_kwargs, settings = run_settings(args, model.generation_config)
        options = rerank_settings(row_options(args, model), generate_kwargs, settings)
    review = options.review_below is not None
    reranked = options.rerank is not None
    columns = csv_columns(settings["num_captions"], clipscore=bool(args.score), scores=options.scores, review=review,
                          rerank=reranked)
    if captions is not None:
        # Scoring given captions: generation settings have no effect, and rows record the model and dtype only.
        settings = {name: settings[name] for name in SCORE_FILE_SETTINGS}
        settings["num_captions"] = 0
        columns = score_file_columns(review)
    if args.seed is not None:
        set_seed(args.seed)

    done, store, store_fmt, schema = {}, None, None, None
    if args.output:
        store, store_fmt = row_store(Path(args.output), fmt)
        schema = parquet_schema(settings["num_captions"], clipscore=bool(args.score), scores=options.scores,
                                review=review, rerank=reranked) if fmt == "parquet" else None
        done = _rows_held(args, state, store, store_fmt, schema, columns, say)
    todo = [ref for ref in refs if ref.key not in done]
    skipped = len(refs) - len(todo)
    skipped_errors = sum(done[ref.key] for ref in refs if ref.key in done)
    if skipped:
        say(f"skipped {skipped} already captioned in {args.output}"
            + (f" ({skipped_errors} of them error rows; --retry-errors tries them again)" if skipped_errors else ""))

    if args.engine == "ray":
        from .ray_engine import caption_with_ray

        share = todo
        batches = caption_with_ray(args, todo, dataset, say)
    else:
        share, batches = _local_batches(args, state, device, todo, dataset, (model, processor, scorer),
                                        generate_kwargs, settings, fmt, say, options, captions)
    sink = None
    if args.output:
        sink = RowWriter(part_path(str(store), state.process_index) if state.num_processes > 1 else store,
                         store_fmt, columns)

    table_rows, captioned, failed = [], 0, 0
    started = time.perf_counter()
    # Ray draws its own progress bars, one per stage of the pipeline.
    progress = tqdm(total=len(share), unit=" images", disable=not state.is_main_process or not share
                    or args.engine == "ray",
                    desc="captioning" + (f" (process 0 of {state.num_processes})" if state.num_processes > 1 else ""))
    try:
        for batch in batches:
            failed += sum(1 for row in batch if row["error"])
            captioned += sum(1 for row in batch if not row["error"])
            if sink is not None:
                sink.write(batch)
            else:
                table_rows += batch
            progress.update(len(batch))
    finally:
        progress.close()
        if sink is not None:
            sink.close()
    elapsed = time.perf_counter() - started

    counts = _gather(state, [(captioned, failed, elapsed)])
    captioned, failed = sum(c[0] for c in counts), sum(c[1] for c in counts)
    elapsed = max(c[2] for c in counts)  # the slowest process: the rate is the job's, not one process's
    if args.output:
        state.wait_for_everyone()
        if state.num_processes > 1:
            _on_main(state, lambda: merge_parts(store, store_fmt, columns))
        if schema is not None:
            _on_main(state, lambda: finish_parquet(Path(args.output), store, schema))
    else:
        table_rows = _gather(state, table_rows)
        header = "  ".join(f"{name}={settings[name]}" for name in SETTINGS if settings.get(name) is not None)
        if state.is_main_process:
            print(format_table(table_rows, header), flush=True)

    rate = f" in {elapsed:.1f} s ({captioned / elapsed:.1f} images/s)" if captioned and elapsed > 0 else ""
    say(f"done: {captioned} captioned{rate}, {failed} failed, {skipped} skipped (already in the output)"
        + (f"; rows in {args.output}" if args.output else ""))
    if failed or skipped_errors:
        bad = failed + skipped_errors
        rows = "their rows have" if bad != 1 else "its row has"
        say(f"{bad} image{'s' if bad != 1 else ''} could not be read; {rows} an 'error' field naming the file and the "
            "reason.")
        return 1
    return 0


def _rows_held(args, state, store, store_fmt, schema, columns, say) -> dict[str, bool]:
    """The rows the output already holds, `{image key: True if its row is an error}`, after making it ready to append
    to (a half-written last row dropped, part files merged, a parquet output's rows moved into its row store)."""
    output = Path(args.output)

    def prepare():
        notes = []
        if schema is not None:
            notes += _repair(store)
            absorbed = absorb_parquet(output, store, schema)
            notes += [f"{output}: resuming from its {absorbed} rows."] if absorbed else []
        held, more = prepare_output(store, store_fmt, columns, args.retry_errors)
        return held, notes + more

    done, notes = _on_main(state, prepare)
    for note in notes:
        say(note)
    return done


def _local_batches(args, state, device, todo, dataset, loaded, generate_kwargs, settings, fmt, say, options,
                   captions=None):
    """(this process's share of `todo`, its output rows batch by batch): DataLoader workers read the images while the
    model captions the previous batch."""
    model, processor, scorer = loaded
    # Contiguous shares: process i captions todo[i * n / P : (i + 1) * n / P].
    with state.split_between_processes(todo) as share:
        share = list(share)
    num_workers = min(4, os.cpu_count() or 1) if args.num_workers is None else args.num_workers
    decoder = ImageDecoder(share, processor.image_processor, dataset, args.max_image_pixels,
                           scorer.image_processor if scorer is not None else None)
    loader = torch.utils.data.DataLoader(
        decoder, batch_size=args.batch_size, num_workers=num_workers, collate_fn=_keep_items,
        pin_memory=device.type == "cuda")
    processes = f", {state.num_processes} processes" if state.num_processes > 1 else ""
    doing = "scoring the captions of" if captions is not None else "captioning"
    say(f"{doing} {len(todo)} images with {args.model} on {device} ({settings['dtype']}{processes}), batch "
        f"size {args.batch_size}, decoding workers: {num_workers}")
    if captions is not None:
        return share, score_batches(loader, model, processor, captions, settings, options)
    return share, caption_batches(loader, model, processor, generate_kwargs, settings, fmt, scorer, options)
