"""Captioning speed: vision-gpt's default model against transformers' VisionEncoderDecoderModel, side by side.

Both at ViT-B/16 (224 px) and GPT-2 small (124M), random weights from the same seed (speed does not depend on their
values), the same forced caption length (min_new_tokens == max_new_tokens), greedy and 5-beam, fp32 and bf16. Each
setting gets two warm-up calls (oneDNN builds its kernels on the first bf16 calls), then the two models alternate so
that a drifting machine affects both alike. Also: the vision encoder's achieved GFLOP/s next to the machine's
matrix-multiply peak, measured in the same run.

    python benchmarks/bench_generate.py                      # the full table (CPU: about 15 minutes on 2 cores)
    python benchmarks/bench_generate.py --batch-sizes 8 --repeats 2
    python benchmarks/bench_generate.py --quick              # tiny models, seconds; used by the test suite
"""

import argparse
import contextlib
import os
import statistics
import threading
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig

from vision_gpt import VisionGPTConfig, VisionGPTForConditionalGeneration
from vision_gpt.modeling.packed_linear_vision_gpt import packed_linear_available, packed_linears

START = 50256


def build_models(quick: bool):
    vision = ViTConfig() if not quick else ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=128, image_size=32, patch_size=8)
    text = GPT2Config() if not quick else GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128)
    torch.manual_seed(0)
    ours = VisionGPTForConditionalGeneration(VisionGPTConfig(vision_config=vision.to_dict(),
                                                             text_config=text.to_dict())).eval()
    torch.manual_seed(0)
    peer_config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        vision, GPT2Config(**{**text.to_dict(), "add_cross_attention": True, "is_decoder": True}))
    peer_config.decoder_start_token_id = peer_config.pad_token_id = peer_config.eos_token_id = START
    peer = VisionEncoderDecoderModel(peer_config).eval()
    return ours, peer, vision.image_size


class PeakMemory:
    """Peak memory of a call: CUDA's allocator peak, or on CPU the peak resident set size above the start, sampled."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss())
        self.megabytes = (self.peak - self.base) / 2**20


def _rss() -> int:
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
    holds each model's additional generate arguments."""
    with torch.inference_mode():
        for _ in range(2):  # warm-up
            for name, model in models.items():
                generate(model, pixel_values, mode, tokens, **extra[name])
        times = {name: [] for name in models}
        memory = {name: 0.0 for name in models}
        for _ in range(repeats):
            for name, model in models.items():
                with PeakMemory(device) as peak:
                    sync(device)
                    start = time.perf_counter()
                    generate(model, pixel_values, mode, tokens, **extra[name])
                    sync(device)
                    times[name].append(time.perf_counter() - start)
                memory[name] = max(memory[name], peak.megabytes)
    return {name: statistics.median(values) for name, values in times.items()}, memory


def matmul_peak(dtype, device, size=(4096, 768, 3072), repeats=30) -> float:
    """GFLOP/s of a ViT-MLP-shaped matrix product: the practical matrix-multiply peak of this machine. The best of
    many calls (a single call on a shared CPU can come out far below it) and, on CPU, of both kernels torch offers
    there: `F.linear` (MKL) and oneDNN with a packed weight."""
    m, k, n = size
    x = torch.randn(m, k, device=device, dtype=dtype)
    w = torch.randn(n, k, device=device, dtype=dtype)
    kernels = [lambda: F.linear(x, w)]
    if device.type == "cpu" and packed_linear_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        kernels.append(lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))
    best = float("inf")
    for kernel in kernels:
        for _ in range(5):
            kernel()
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            kernel()
            sync(device)
            best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best / 1e9


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
    parser.add_argument("--quick", action="store_true", help="tiny models: checks that the benchmark runs")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    batch_sizes = args.batch_sizes or ([1, 2] if args.quick else [1, 8, 32] + ([128] if device.type == "cuda" else []))
    repeats = 1 if args.quick else args.repeats

    ours32, peer32, image_size = build_models(args.quick)
    extra = {"ours": {"use_packed_linears": not args.plain_linears}, "peer": {}}
    rows = []
    print(f"device: {device} ({torch.get_num_threads()} threads), torch {torch.__version__}, {args.tokens} tokens per "
          f"caption, median of {repeats} call(s) after 2 warm-ups")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {"ours": ours32.to(device, dtype), "peer": peer32.to(device, dtype)}
        for batch in batch_sizes:
            pixel_values = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
            pixel_values = pixel_values.to(device, dtype)
            for mode in args.modes:
                seconds, memory = time_pair(models, pixel_values, mode, args.tokens, repeats, device, extra)
                rows.append((batch, mode, dtype_name, seconds, memory))
                print(f"  batch {batch:>3} {mode:<6} {dtype_name:<8} ours {batch / seconds['ours']:7.2f} img/s   "
                      f"peer {batch / seconds['peer']:7.2f} img/s   ratio {seconds['peer'] / seconds['ours']:.2f}x",
                      flush=True)
        ours32, peer32 = ours32.float(), peer32.float()

    print("\n| batch | decoding | dtype | ours / peer | ours img/s | peer img/s | ours peak MB | peer peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    for batch, mode, dtype_name, seconds, memory in rows:
        print(f"| {batch} | {mode} | {dtype_name} | **{seconds['peer'] / seconds['ours']:.2f}x** | "
              f"{batch / seconds['ours']:.2f} | {batch / seconds['peer']:.2f} | {memory['ours']:.0f} | "
              f"{memory['peer']:.0f} |")

    print("\nVision encoder (batch 8) against this machine's matrix-multiply peak (a 4096x768x3072 product, best "
          "kernel):")
    print("| dtype | matmul peak GFLOP/s | encoder | GFLOP/image | achieved GFLOP/s | share of peak |")
    print("|---|---|---|---|---|---|")
    pixel_values = torch.randn(2 if args.quick else 8, 3, image_size, image_size)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        peak = matmul_peak(dtype, device)
        ours, peer = ours32.to(device, dtype), peer32.to(device, dtype)
        encoders = {"ours": ours.get_vision_features, "peer": lambda px: peer.encoder(pixel_values=px)}
        fast_paths = {"ours": lambda: packed_linears(ours, enabled=not args.plain_linears),  # as generate() runs it
                      "peer": contextlib.nullcontext}
        for name, call in encoders.items():
            per_image, achieved = vision_gflops(call, pixel_values.to(device, dtype), fast_paths[name])
            print(f"| {dtype_name} | {peak:.0f} | {name} | {per_image:.3g} | {achieved:.0f} | "
                  f"{100 * achieved / peak:.0f}% |")
        ours32, peer32 = ours.float(), peer.float()


if __name__ == "__main__":
    main()
