import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generation_benchmark_runs_end_to_end_in_quick_mode(capsys):
    load("bench_generate").main(["--quick", "--batch-sizes", "2", "--tokens", "4"])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| 2 |")]
    assert len(table) == 4  # greedy and 5 beams, fp32 and bf16
    assert all(line.count("|") == 9 and "x** |" in line for line in table)
    assert "| float32 |" in out and "| bfloat16 |" in out and "share of peak" in out
    # Both models have the same ViT (the peer's adds a pooler), so both encoder rows must count about the same FLOPs
    # (oneDNN's packed op is not in torch's FLOP counter: counting under the fast path would report almost none).
    encoder_rows = [line.split("|") for line in out.splitlines() if line.startswith(("| float32 |", "| bfloat16 |"))]
    per_image = {(row[1].strip(), row[3].strip()): float(row[4]) for row in encoder_rows}
    assert per_image[("float32", "ours")] == pytest.approx(per_image[("float32", "peer")], rel=0.02)
    assert per_image[("float32", "ours")] > 0
