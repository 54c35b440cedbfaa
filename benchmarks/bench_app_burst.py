"""`vision-gpt app` under bursts of visitors: latency of N requests sent at once, failures, and the server's memory.

Starts `vision-gpt app` as a process of its own (on a model folder or Hub id, or on a random model the size of
`vision-gpt assemble --tiny`, built here), sends one warm-up request, then fires bursts of N requests at once through
`gradio_client`, each from its own client (its own session), as visitors opening the page together would. After each
burst it reads the server process's resident memory (VmRSS and its peak, VmHWM, in /proc/PID/status), so one can see
whether memory settles or grows with every burst. The clients run on the same machine and take some of its CPU.

    python benchmarks/bench_app_burst.py                                   # 3 bursts of 50, random tiny model
    python benchmarks/bench_app_burst.py --base --concurrency 2            # random ViT-B/16 + GPT-2 small
    python benchmarks/bench_app_burst.py --model vision-gpt-demo/model --requests 100 --concurrency 2
    python benchmarks/bench_app_burst.py --requests 10 --bursts 2          # a quick check that it runs
"""

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vision_gpt.app.server import DEFAULT_QUEUE_SIZE, EXAMPLES_DIR

START_TIMEOUT_S = 300  # loading a large model from a slow disk


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`python -m vision_gpt.cli app ...` in a subprocess, stopped with Ctrl-C (SIGINT) as a user would."""

    def __init__(self, model: str, args):
        self.port = free_port()
        command = [sys.executable, "-m", "vision_gpt.cli", "app", "--model", model, "--port", str(self.port),
                   "--max-queue", str(args.max_queue), "--concurrency", str(args.concurrency), "--dtype", args.dtype,
                   "--device", args.device]
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines = []
        threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True).start()

    def wait_until_serving(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("vision-gpt app: serving" in line for line in self.lines):
            if self.process.poll() is not None:
                sys.exit("the app exited before serving:\n" + "".join(self.lines))
            if time.monotonic() > deadline:
                self.stop()
                sys.exit(f"the app did not start within {START_TIMEOUT_S} s:\n" + "".join(self.lines))
            time.sleep(0.2)
        return f"http://127.0.0.1:{self.port}/"

    def memory_mb(self) -> tuple[float, float] | None:
        """(resident, peak resident) in MB, from /proc (Linux); None elsewhere."""
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def visitors(url: str, count: int) -> list:
    from gradio_client import Client

    def visitor(_):
        # httpx's default 5 s timeout would count a join answered late by a busy server as a failure; a browser waits.
        return Client(url, verbose=False, analytics_enabled=False, download_files=False,
                      httpx_kwargs={"timeout": 600})

    with ThreadPoolExecutor(8) as pool:  # each client first reads the page's config: start them side by side
        return list(pool.map(visitor, range(count)))


def ask(client, image: Path, args) -> str:
    """One Caption press; returns the results HTML."""
    from gradio_client import handle_file

    _, results, _ = client.predict([handle_file(str(image))], "", args.beams, args.beams, args.max_new_tokens, False,
                                   1.0, 0.9, 0, api_name="/caption")
    return results


def burst(url: str, images: list[Path], args) -> dict:
    """N requests sent at once, each from a new client; latencies of those captioned, and what went wrong."""
    from gradio_client.utils import QueueError

    clients = visitors(url, args.requests)
    together = threading.Barrier(args.requests)

    def visit(i):
        together.wait()
        started = time.perf_counter()
        try:
            results = ask(clients[i], images[i % len(images)], args)
        except QueueError:
            return "refused", time.perf_counter() - started
        except Exception as error:  # counted and reported, never raised: one failure must not hide the others
            return f"{type(error).__name__}: {error}", time.perf_counter() - started
        return ("ok" if 'class="vg-caption"' in results else "answer without a caption"), time.perf_counter() - started

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.requests) as pool:
            outcomes = list(pool.map(visit, range(args.requests)))
    finally:
        for client in clients:
            client.close()
    wall = time.perf_counter() - started
    latencies = sorted(seconds for outcome, seconds in outcomes if outcome == "ok")
    other = [outcome for outcome, _ in outcomes if outcome not in ("ok", "refused")]
    return dict(ok=len(latencies), refused=sum(outcome == "refused" for outcome, _ in outcomes), other=other,
                latencies=latencies, wall=wall)


def percentile(sorted_values: list[float], share: float) -> float:
    """Nearest-rank percentile: the smallest value with at least `share` of the values at or below it."""
    if not sorted_values:
        return float("nan")
    rank = max(1, math.ceil(round(len(sorted_values) * share, 6)))  # round: 0.9 x 10 must be 9, not 9.000...1
    return sorted_values[rank - 1]


def save_random_model(folder: str, base: bool) -> str:
    """A random model saved in `folder`: the size of `vision-gpt assemble --tiny`, or with `base` ViT-B/16 and GPT-2
    small in the default design (240M parameters), as a real captioner would be."""
    from vision_gpt.assembly.build import build_tiny

    model, processor = build_tiny()
    if base:
        import torch
        from transformers import GPT2Config, ViTConfig

        from vision_gpt import VisionGPTConfig, VisionGPTForConditionalGeneration

        torch.manual_seed(0)
        config = VisionGPTConfig(vision_config=ViTConfig().to_dict(), text_config=GPT2Config().to_dict())
        model = VisionGPTForConditionalGeneration(config)
        processor.image_processor = processor.default_image_processor(config.vision_config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder or Hub id (default: a random model the size of "
                                        "`vision-gpt assemble --tiny`, built here)")
    parser.add_argument("--base", action="store_true", help="without --model: a random ViT-B/16 + GPT-2 small model "
                                                            "(240M parameters) instead of the tiny one")
    parser.add_argument("--requests", type=int, default=50, help="requests sent at once in each burst (default 50)")
    parser.add_argument("--bursts", type=int, default=3, help="bursts, one after another (default 3)")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between bursts (default 2)")
    parser.add_argument("--concurrency", type=int, default=1, help="the app's --concurrency (default 1)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_QUEUE_SIZE,
                        help=f"the app's --max-queue (default {DEFAULT_QUEUE_SIZE})")
    parser.add_argument("--beams", type=int, default=3, help="beams and captions per image (default 3)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="caption length limit (default 20)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", nargs="+", type=Path, help="images to caption, in turn (default: the app's "
                                                               "examples)")
    args = parser.parse_args(argv)
    for name in ("requests", "bursts", "concurrency", "max_queue", "beams", "max_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    images = args.images or sorted(EXAMPLES_DIR.glob("*.jpg"))

    with tempfile.TemporaryDirectory() as folder:
        model = args.model or save_random_model(folder, args.base)
        server = Server(model, args)
        try:
            url = server.wait_until_serving()
            (warm,) = visitors(url, 1)
            ask(warm, images[0], args)  # the first caption pays one-time costs (oneDNN kernels, packed weights)
            warm.close()
            before = server.memory_mb()
            rows = []
            for index in range(args.bursts):
                if index:
                    time.sleep(args.pause)
                rows.append((burst(url, images, args), server.memory_mb()))
        finally:
            server.stop()

    name = args.model or ("random ViT-B/16 + GPT-2 small model" if args.base else
                          "random tiny model (ViT 4x192 at 96 px, GPT-2 4x256)")
    print(f"\n{name}, {args.dtype}, --concurrency {args.concurrency}, --max-queue {args.max_queue}; bursts of "
          f"{args.requests} requests sent at once, one image each, {args.beams} beams, up to {args.max_new_tokens} "
          f"new tokens; {os.cpu_count()} CPUs shared by the server and the clients")
    if before:
        print(f"server memory after the warm-up request: {before[0]:.0f} MB resident")
    print("| burst | captioned | refused (queue full) | other failures | p50 s | p90 s | max s | burst s | "
          "server RSS MB | server peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, (result, memory) in enumerate(rows, 1):
        latencies = result["latencies"]
        rss, peak = (f"{memory[0]:.0f}", f"{memory[1]:.0f}") if memory else ("n/a", "n/a")
        print(f"| {index} | {result['ok']}/{args.requests} | {result['refused']} | {len(result['other'])} | "
              f"{percentile(latencies, 0.5):.2f} | {percentile(latencies, 0.9):.2f} | "
              f"{percentile(latencies, 1.0):.2f} | {result['wall']:.1f} | {rss} | {peak} |")
    failures = [message for result, _ in rows for message in result["other"]]
    if failures:
        print(f"\nfirst of {len(failures)} other failures: {failures[0]}")
    return rows


if __name__ == "__main__":
    main()
