"""Captioning speed: vision-gpt's default model against transformers' VisionEncoderDecoderModel, side by side.

Both at ViT-B/16 (224 px) and GPT-2 small (124M), random weights from the same seed (speed does not depend on their
values), the same forced caption length (min_new_tokens == max_new_tokens), greedy and 5-beam, fp32 and bf16. Each
setting gets two warm-up calls (oneDNN builds its kernels on the first bf16 calls), then the two models alternate so
that a drifting machine affects both alike. Also: the vision encoder's achieved GFLOP/s next to the machine's
matrix-multiply peak, and the rate at which decoding's linear layers read their weights next to the machine's read
bandwidth, measured in the same run.

    python benchmarks/bench_generate.py                      # all three tables (CPU: about 15 minutes on 2 cores)
    python benchmarks/bench_generate.py --tables decoding    # decoding's linear layers alone (seconds)
    python benchmarks/bench_generate.py --batch-sizes 8 --repeats 2
    python benchmarks/bench_generate.py --quick              # tiny models, seconds; used by the test suite
"""

import argparse
import contextlib
import ctypes
import functools
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from vision_gpt import VisionGPTConfig, VisionGPTForConditionalGeneration
from vision_gpt.modeling.configuration_vision_gpt import FUSIONS, VISUAL_TOKENS
from vision_gpt.modeling.packed_linear_vision_gpt import packed_linear_available, packed_linears

START = 50256
TABLES = ("models", "encoder", "decoding")


def build_models(quick: bool, **ours_overrides):
    """Ours (its default configuration unless `ours_overrides` says otherwise) and the peer, from the same seed."""
    vision = ViTConfig() if not quick else ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, image_size=32, patch_size=8)
    text = GPT2Config() if not quick else GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    ours = VisionGPTForConditionalGeneration(VisionGPTConfig(vision_config=vision.to_dict(),
                                                             text_config=text.to_dict(), **ours_overrides)).eval()
    torch.manual_seed(0)
    peer_config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        vision, GPT2Config(**{**text.to_dict(), "add_cross_attention": True, "is_decoder": True}))
    peer_config.decoder_start_token_id = peer_config.pad_token_id = peer_config.eos_token_id = START
    peer = VisionEncoderDecoderModel(peer_config).eval()
    return ours, peer, vision.image_size


class PeakMemory:
    """
    Peak memory of a call above its start: CUDA's allocator peak, or on CPU the bytes malloc has handed out (glibc's
    `mallinfo2`: the main heap plus every mmapped block, where torch's large tensors live), sampled every millisecond.
    Resident set size would not do: memory freed to malloc stays resident, so a call reusing it reads as zero. Where
    `mallinfo2` is missing (not glibc), resident set size it is.
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = cpu_memory_in_use()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, cpu_memory_in_use())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, cpu_memory_in_use())
        self.megabytes = (self.peak - self.base) / 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.lru_cache(maxsize=None)
def _mallinfo2():
    try:
        function = ctypes.CDLL(None).mallinfo2
    except (AttributeError, OSError):
        return None
    function.restype = _MallInfo2
    return function


def cpu_memory_in_use() -> int:
    """Bytes malloc has handed out and not taken back (heap in use + mmapped blocks); resident set size without
    glibc."""
    mallinfo2 = _mallinfo2()
    if mallinfo2 is not None:
        info = mallinfo2()
        return info.uordblks + info.hblkhd
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def generate(model, pixel_values, mode: str, tokens: int, **extra):
    num_beams = 1 if mode == "greedy" else 5
    return model.generate(pixel_values=pixel_values, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                          num_beams=num_beams, **extra)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pair(models, pixel_values, mode, tokens, repeats, device, extra):
    """Median seconds per call and peak memory (MB) for each model, calls alternating between the models; `extra`
    holds each model's additional generate arguments. Memory is taken on the second warm-up call, so that the sampling
    thread never runs during a timed call."""
    memory = {}
    with torch.inference_mode():
        for warmup in range(2):
            for name, model in models.items():
                with PeakMemory(device) if warmup else contextlib.nullcontext() as peak:
                    generate(model, pixel_values, mode, tokens, **extra[name])
                if warmup:
                    memory[name] = peak.megabytes
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                sync(device)
                start = time.perf_counter()
                generate(model, pixel_values, mode, tokens, **extra[name])
                sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}, memory


def matmul_peak(dtype, device, rows=(1576, 4096), repeats=20) -> float:
    """GFLOP/s of ViT-MLP-shaped matrix products (768 -> 3072 and back; 1576 rows = 8 images x 197 tokens): the
    practical matrix-multiply peak of this machine. The best over shapes, many calls (a single call on a shared CPU
    can come out far below it) and, on CPU, both kernels torch offers there: `F.linear` (MKL) and oneDNN with a packed
    weight."""
    best = 0.0
    for m in rows:
        for k, n in ((768, 3072), (3072, 768)):
            x = torch.randn(m, k, device=device, dtype=dtype)
            w = torch.randn(n, k, device=device, dtype=dtype)
            kernels = [lambda: F.linear(x, w)]
            if device.type == "cpu" and packed_linear_available():
                packed = torch.ops.mkldnn._reorder_linear_weight(w)
                kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
            for kernel in kernels:
                for _ in range(3):
                    kernel()
                for _ in range(repeats):
                    sync(device)
                    start = time.perf_counter()
                    kernel()
                    sync(device)
                    best = max(best, 2 * m * k * n / (time.perf_counter() - start) / 1e9)
    return best


def vision_gflops(encoder_call, pixel_values, fast_path=contextlib.nullcontext, repeats=3) -> tuple[float, float]:
    """(GFLOP per image, achieved GFLOP/s) of a vision encoder call, timed inside `fast_path()`. FLOPs are counted by
    torch's FlopCounterMode on the plain layers, since it does not know oneDNN's packed linear op."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            encoder_call(pixel_values)
        flops = counter.get_total_flops()
    with torch.inference_mode(), fast_path():
        for _ in range(2):
            encoder_call(pixel_values)
        best = float("inf")
        for _ in range(repeats):
            sync(pixel_values.device)
            start = time.perf_counter()
            encoder_call(pixel_values)
            sync(pixel_values.device)
            best = min(best, time.perf_counter() - start)
    return flops / pixel_values.shape[0] / 1e9, flops / best / 1e9


def read_bandwidth(device, megabytes=512, repeats=5) -> float:
    """GB/s of a plain reduction over a buffer far larger than the caches: what this machine's memory delivers."""
    buffer = torch.ones(megabytes * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        buffer.sum()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def decoding_layer_rates(text_config, dtype, device, rows=8, repeats=5) -> dict[str, tuple[float, float, float]]:
    """
    {kernel: (weight MB, GB/s of weights read, GFLOP/s)} for one decoding step's linear layers at `rows` rows (batch 8
    greedy: one token per image): per GPT-2 block the self-attention's input and output layers, the cross-attention's
    query and output layers and the MLP's two, then the LM head; each with its own weight, as in the model, so that
    none stays in cache. Per kernel torch offers here: `F.linear`, and on CPU oneDNN with a packed weight.
    """
    width, layers = text_config.n_embd, text_config.n_layer
    inner = text_config.n_inner or 4 * width
    shapes = [(3 * width, width), (width, width), (width, width), (width, width), (inner, width), (width, inner)]
    shapes = shapes * layers + [(text_config.vocab_size, width)]  # (out, in)
    weights = [torch.randn(out, into, device=device, dtype=dtype) for out, into in shapes]
    inputs = {into: torch.randn(rows, into, device=device, dtype=dtype) for into in {into for _, into in shapes}}
    steps = {"F.linear": [functools.partial(F.linear, inputs[w.shape[1]], w) for w in weights]}
    if device.type == "cpu" and packed_linear_available():
        packed = [(inputs[w.shape[1]], torch.ops.mkldnn._reorder_linear_weight(w)) for w in weights]
        steps["packed oneDNN"] = [functools.partial(torch.ops.mkldnn._linear_pointwise, x, w, None, "none", [], "")
                                  for x, w in packed]
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    flops = 2 * rows * sum(w.numel() for w in weights)
    rates = {}
    with torch.inference_mode():
        for kernel, calls in steps.items():
            best = float("inf")
            for _ in range(repeats + 2):
                sync(device)
                start = time.perf_counter()
                for call in calls:
                    call()
                sync(device)
                best = min(best, time.perf_counter() - start)
            rates[kernel] = (weight_bytes / 1e6, weight_bytes / best / 1e9, flops / best / 1e9)
    return rates


def time_settings(models, batch_sizes, args, image_size, device, dtype, repeats, extra, rows):
    """Time both models at every batch size and decoding mode in one dtype; appends to `rows`."""
    dtype_name = str(dtype).removeprefix("torch.")
    for batch in batch_sizes:
        pixel_values = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        pixel_values = pixel_values.to(device, dtype)
        for mode in args.modes:
            seconds, memory = time_pair(models, pixel_values, mode, args.tokens, repeats, device, extra)
            rows.append((batch, mode, dtype_name, seconds, memory))
            print(f"  batch {batch:>3} {mode:<6} {dtype_name:<8} ours {batch / seconds['ours']:7.2f} img/s   "
                  f"peer {batch / seconds['peer']:7.2f} img/s   ratio {seconds['peer'] / seconds['ours']:.2f}x",
                  flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default: 1 8 32 (CUDA: 1 8 32 128)")
    parser.add_argument("--modes", nargs="+", default=["greedy", "beam5"], choices=["greedy", "beam5"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=20, help="caption length, forced for both models")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model and setting (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plain-linears", action="store_true",
                        help="run ours without its oneDNN packed linear layers (to see what they contribute)")
    parser.add_argument("--unfused-gelu", action="store_true",
                        help="run ours with packed layers but each GELU as a separate op (to see what fusing gives)")
    parser.add_argument("--bf16-logits", action="store_true",
                        help="run ours in bf16 with generate(float32_logits=False) (to see what float32 logits cost)")
    parser.add_argument("--fusion", choices=FUSIONS, help="ours with this fusion instead of the default")
    parser.add_argument("--visual-tokens", choices=VISUAL_TOKENS, help="ours with these visual tokens instead")
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES,
                        help="what to measure: the models side by side, the vision encoder against the matmul peak, "
                             "decoding's linear layers against the read bandwidth (default: all three)")
    parser.add_argument("--quick", action="store_true", help="tiny models: checks that the benchmark runs")
    args = parser.parse_args(argv)
    if args.plain_linears and args.unfused_gelu:
        parser.error("--unfused-gelu changes the packed layers, which --plain-linears turns off: choose one")
    device = torch.device(args.device)
    batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8, 32] + ([128] if device.type == "cuda" else []))
    repeats = 1 if args.quick else args.repeats

    overrides = {name: value for name, value in (("fusion", args.fusion), ("visual_tokens", args.visual_tokens))
                 if value is not None}
    ours32, peer32, image_size = build_models(args.quick, **overrides)
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, {args.tokens} tokens per "
          f"caption, median of {repeats} call(s) after 2 warm-ups")
    print(f"ours: fusion={ours32.config.fusion!r}, visual_tokens={ours32.config.visual_tokens!r} "
          f"({ours32.config.num_image_tokens} visual tokens per image)")
    if "models" in args.tables:
        models_table(ours32, peer32, image_size, batch_sizes, repeats, device, args)
    if "encoder" in args.tables:
        encoder_table(ours32, peer32, image_size, device, args)
    if "decoding" in args.tables:
        decoding_table(ours32.config.text_config, device, args)


def models_table(ours32, peer32, image_size, batch_sizes, repeats, device, args):
    """Both models' images/s and peak memory at every batch size, decoding mode and dtype; the models come back in
    float32 (`.to` converts them in place)."""
    extra = {"ours": {"use_packed_linears": not args.plain_linears, "float32_logits": not args.bf16_logits}, "peer": {}}
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {"ours": ours32.to(device, dtype), "peer": peer32.to(device, dtype)}
        settings = contextlib.nullcontext()
        if args.unfused_gelu:
            # An outer block's settings hold for the blocks generate() opens inside it.
            float32_layers = () if args.bf16_logits else (models["ours"].get_output_embeddings(),)
            settings = packed_linears(models["ours"], float32_layers=float32_layers, fuse_gelu=False)
        with settings:
            time_settings(models, batch_sizes, args, image_size, device, dtype, repeats, extra, rows)
        ours32.float()
        peer32.float()

    print("\n| batch | decoding | dtype | ours / peer | ours img/s | peer img/s | ours peak MB | peer peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, mode, dtype_name, seconds, memory in rows:
        print(f"| {batch} | {mode} | {dtype_name} | **{seconds['peer'] / seconds['ours']:.2f}x** | "
              f"{batch / seconds['ours']:.2f} | {batch / seconds['peer']:.2f} | {memory['ours']:.0f} | "
              f"{memory['peer']:.0f} |")


def encoder_table(ours32, peer32, image_size, device, args):
    """Each model's vision encoder in GFLOP/s against the matrix-multiply peak, per dtype; back in float32 after."""
    print("\nVision encoder (batch 8) against this machine's matrix-multiply peak (ViT-MLP-shaped products, best shape "
          "and kernel):")
    print("| dtype | matmul peak GFLOP/s | encoder | GFLOP/image | achieved GFLOP/s | share of peak |")
    print("|---|---|---|---|---|---|")
    pixel_values = torch.randn(2 if args.quick else 8, 3, image_size, image_size)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        peak = matmul_peak(dtype, device, rows=(64,) if args.quick else (1576, 4096))
        ours, peer = ours32.to(device, dtype), peer32.to(device, dtype)
        encoders = {"ours": ours.get_vision_features, "peer": lambda px: peer.encoder(pixel_values=px)}
        fast_paths = {"ours": lambda: packed_linears(ours, enabled=not args.plain_linears,  # as generate() runs it
                                                     fuse_gelu=not args.unfused_gelu),
                      "peer": contextlib.nullcontext}
        for name, call in encoders.items():
            per_image, achieved = vision_gflops(call, pixel_values.to(device, dtype), fast_paths[name])
            print(f"| {dtype_name} | {peak:.0f} | {name} | {per_image:.3g} | {achieved:.0f} | "
                  f"{100 * achieved / peak:.0f}% |")
        ours.float()
        peer.float()


def decoding_table(text_config, device, args):
    """The rate at which one decoding step's linear layers read their weights, per kernel and dtype, against the
    machine's read rate measured just before."""
    bandwidth = read_bandwidth(device, megabytes=16 if args.quick else 512)
    print(f"\nDecoding's linear layers at 8 rows (a batch 8 greedy step: GPT-2's blocks with cross-attention, then "
          f"the LM head) against this machine's read bandwidth, {bandwidth:.0f} GB/s (a sum over a large buffer):")
    print("| kernel | dtype | weights MB | GB/s of weights | GFLOP/s | share of read bandwidth |")
    print("|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        rates = decoding_layer_rates(text_config, getattr(torch, dtype_name), device)
        for kernel, (megabytes, rate, gflops) in rates.items():
            print(f"| {kernel} | {dtype_name} | {megabytes:.1f} | {rate:.2f} | {gflops:.1f} | "
                  f"{100 * rate / bandwidth:.0f}% |")


if __name__ == "__main__":
    main()
