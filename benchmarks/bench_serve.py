"""`vision-gpt serve` under concurrent clients: throughput, latency and time to first token, with batching and
without it.

Starts `vision-gpt serve` as a process of its own for each `--max-batch-size` given (default 16, then 1: one request
at a time), on a model folder or Hub id, or on a random ViT-B/16 + GPT-2 small model built here. Against each server
it sends one warm-up request, then `--requests` requests from `--clients` concurrent clients through the `openai`
client: greedy (temperature 0) captions of `--max-tokens` tokens of distinct random 224 x 224 JPEG images, first
whole, then streamed. It reports images per second (requests / wall time), p50 and p90 latency, and for the streamed
run the p50 and p90 time to the first token. The clients run on the same machine and take some of its CPU.

    python benchmarks/bench_serve.py                                   # random ViT-B/16 + GPT-2 small, 64 x 16
    python benchmarks/bench_serve.py --model vision-gpt-demo/model --batch-sizes 8 1
    python benchmarks/bench_serve.py --requests 8 --clients 4          # a quick check that it runs
"""

import argparse
import base64
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    from bench_app_burst import free_port, save_random_model
except ImportError:  # run as a module from the repository root
    from benchmarks.bench_app_burst import free_port, save_random_model

START_TIMEOUT_S = 300


class Server:
    """`python -m vision_gpt.cli serve MODEL ...` in a subprocess, stopped with Ctrl-C (SIGINT) as a user would."""

    def __init__(self, model: str, max_batch_size: int, args):
        self.port = free_port()
        command = [sys.executable, "-m", "vision_gpt.cli", "serve", model, "--served-model-name", "bench",
                   "--port", str(self.port), "--max-batch-size", str(max_batch_size), "--batch-timeout",
                   str(args.batch_timeout), "--dtype", args.dtype]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_until_serving(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                pass
            if self.process.poll() is not None:
                sys.exit("the server exited before serving:\n" + "".join(self.lines))
            if time.monotonic() > deadline:
                self.stop()
                sys.exit(f"the server did not start within {START_TIMEOUT_S} s:\n" + "".join(self.lines))
            time.sleep(0.5)

    def batches(self) -> dict:
        with urllib.request.urlopen(self.url + "/metrics") as response:
            lines = response.read().decode().splitlines()
        return {line.split()[0].removeprefix("vision_gpt_"): float(line.split()[1])
                for line in lines if line.startswith("vision_gpt_")}

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def image_urls(count: int) -> list[str]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    urls = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load(server: Server, urls: list[str], clients: int, max_tokens: int, stream: bool) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

    def one(url: str) -> tuple[float, float | None]:
        started = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        if not stream:
            client.chat.completions.create(model="bench", messages=messages, temperature=0, max_tokens=max_tokens)
            return time.perf_counter() - started, None
        first = None
        for chunk in client.chat.completions.create(model="bench", messages=messages, temperature=0,
                                                    max_tokens=max_tokens, stream=True):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - started
        return time.perf_counter() - started, first

    before = server.batches()
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        timings = list(pool.map(one, urls))
    wall = time.perf_counter() - started
    after = server.batches()
    latencies = [latency for latency, _ in timings]
    firsts = [first for _, first in timings if first is not None]
    batches = after["batches"] - before["batches"]
    return {"images_per_s": len(urls) / wall, "wall_s": wall, "p50_s": percentile(latencies, 50),
            "p90_s": percentile(latencies, 90),
            "ttft_p50_s": percentile(firsts, 50) if firsts else None,
            "ttft_p90_s": percentile(firsts, 90) if firsts else None,
            "batches": batches, "mean_batch": (after["batched_requests"] - before["batched_requests"]) / batches}


def cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    features = ", ".join(f"{name}: {'yes' if flag in flags else 'no'}" for name, flag in
                         (("AVX2", "avx2"), ("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx_tile")))
    return f"{os.cpu_count()} x {model} ({features})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or Hub id (default: a random ViT-B/16 + GPT-2 small, built "
                                        "here)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 1], metavar="N",
                        help="the servers' --max-batch-size, one server each (default: 16 1)")
    parser.add_argument("--batch-timeout", type=float, default=100.0, metavar="MS",
                        help="the servers' --batch-timeout (default: its default, 100)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    import torch
    import transformers

    results = []
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or save_random_model(folder, base=True)  # requests ask for greedy: temperature 0
        urls = image_urls(args.requests)
        for size in args.batch_sizes:
            server = Server(model, size, args)
            try:
                server.wait_until_serving()
                load(server, urls[:1], 1, args.max_tokens, stream=False)  # warm-up
                for stream in (False, True):
                    row = load(server, urls, args.clients, args.max_tokens, stream)
                    results.append({"max_batch_size": size, "stream": stream, **row})
                    print(json.dumps(results[-1]), flush=True)
            finally:
                server.stop()
    name = args.model or "random ViT-B/16 + GPT-2 small (cross-attention)"
    print(f"\n{name}, {args.dtype}, greedy, max_tokens {args.max_tokens}, {args.requests} requests from "
          f"{args.clients} concurrent clients, --batch-timeout {args.batch_timeout:g} ms")
    print(f"{cpu_description()}; torch {torch.__version__}, transformers {transformers.__version__}\n")
    print("| --max-batch-size | streamed | images/s | p50 latency (s) | p90 latency (s) | p50 / p90 first token (s) "
          "| mean batch |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for row in results:
        first = (f"{row['ttft_p50_s']:.2f} / {row['ttft_p90_s']:.2f}" if row["ttft_p50_s"] is not None else "")
        print(f"| {row['max_batch_size']} | {'yes' if row['stream'] else 'no'} | {row['images_per_s']:.2f} | "
              f"{row['p50_s']:.2f} | {row['p90_s']:.2f} | {first} | {row['mean_batch']:.1f} |")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
