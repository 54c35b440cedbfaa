import importlib.util
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from vision_gpt.modeling.packed_linear_vision_gpt import packed_linear_available

from .conftest import tiny_model
from .data_fixtures import write_flickr8k

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", [[], ["--unfused-gelu", "--bf16-logits", "--fusion", "cross_attention",
                                          "--visual-tokens", "merged"]])
def test_generation_benchmark_runs_end_to_end_in_quick_mode(variant, capsys):
    load("bench_generate").main(["--quick", "--batch-sizes", "2", "--tokens", "4", *variant])
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
    assert_decoding_table(out)


def assert_decoding_table(out):
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| F.linear |", "| packed oneDNN |"))]
    kernels = {(row[0].strip(), row[1].strip()) for row in rows}
    expected = {"F.linear"} | ({"packed oneDNN"} if packed_linear_available() else set())
    assert kernels == {(kernel, dtype) for kernel in expected for dtype in ("float32", "bfloat16")}
    megabytes = {row[1].strip(): float(row[2]) for row in rows}
    assert megabytes["float32"] == pytest.approx(2 * megabytes["bfloat16"], rel=0.01)  # same layers, half the bytes
    assert all(float(row[3]) > 0 and float(row[4]) > 0 for row in rows)


def test_generation_benchmark_measures_only_the_tables_asked_for(capsys):
    load("bench_generate").main(["--quick", "--tables", "decoding"])
    out = capsys.readouterr().out
    assert "| batch |" not in out and "matmul peak" not in out
    assert_decoding_table(out)


def test_peak_memory_counts_memory_that_malloc_reuses_from_earlier_calls():
    bench = load("bench_generate")
    if bench._mallinfo2() is None:
        pytest.skip("needs glibc's mallinfo2 (elsewhere the benchmark falls back to resident set size)")
    cpu = torch.device("cpu")
    # From the third time on glibc serves 16 MB from memory the earlier ones freed, already resident: resident set
    # size would not grow at all.
    for _ in range(4):
        with bench.PeakMemory(cpu) as peak:
            block = torch.ones(16 * 2**20 // 4)
            time.sleep(0.01)
            del block  # freed before the block ends: only the sampled peak sees it
        assert 15 < peak.megabytes < 20
    with bench.PeakMemory(cpu) as idle:
        time.sleep(0.01)
    assert abs(idle.megabytes) < 2


def test_generation_benchmark_refuses_contradictory_flags():
    with pytest.raises(SystemExit):
        load("bench_generate").main(["--quick", "--plain-linears", "--unfused-gelu"])


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_bf16_agreement_benchmark_compares_each_bf16_variant_with_float32(tmp_path, processor, capsys):
    model_dir = tmp_path / "model"
    tiny_model().save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    data = write_flickr8k(tmp_path / "f8k", train=2, val=1, test=3)
    load("bench_bf16_agreement").main(["--model", str(model_dir), "--data-dir", str(data), "--split", "test",
                                       "--batch-size", "2", "--max-new-tokens", "4"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [row[0].strip() for row in rows[1:]] == ["float32", "bfloat16", "bfloat16, bf16 logits"]
    assert rows[1][1].strip() == "3/3 (100.0%)"  # float32 against itself
    assert all(re.fullmatch(r"[0-3]/3 \(\d+\.\d%\)", row[1].strip()) for row in rows[1:])
    assert all(row[2].strip() == "-" for row in rows[1:])  # no ONNX export asked for


def test_bf16_agreement_benchmark_scores_each_graph_of_an_onnx_export(tmp_path, processor, capsys):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is in the onnx and test extras")
    from vision_gpt.export.onnx import export_onnx

    model_dir = tmp_path / "model"
    model = tiny_model()
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    export_onnx(model, processor, tmp_path / "onnx", quantize="int8")  # fp32 and int8, no fp16
    data = write_flickr8k(tmp_path / "f8k", train=2, val=1, test=3)
    load("bench_bf16_agreement").main(["--model", str(model_dir), "--data-dir", str(data), "--split", "test",
                                       "--batch-size", "2", "--max-new-tokens", "4", "--onnx", str(tmp_path / "onnx")])
    rows = {row[0].strip(): [cell.strip() for cell in row[1:]] for row in
            (line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| "))}
    assert list(rows)[-2:] == ["ONNX fp32", "ONNX int8"]
    assert rows["ONNX fp32"][:2] == ["3/3 (100.0%)", "3/3 (100.0%)"]  # ONNX fp32 greedy equals PyTorch's
    assert re.fullmatch(r"[0-3]/3 \(\d+\.\d%\)", rows["ONNX int8"][1])
    assert rows["bfloat16"][1] == "-"
    with pytest.raises(SystemExit, match="no onnx/decoder_model_merged"):
        load("bench_bf16_agreement").main(["--model", str(model_dir), "--data-dir", str(data), "--onnx",
                                           str(model_dir)])


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_fusion_benchmark_trains_and_scores_each_design_then_reuses_them(tmp_path, capsys):
    from vision_gpt.demo import run_demo

    run_demo(tmp_path, num_train=16, num_val=4, num_test=4, max_steps=1, batch_size=8, require_improvement=False,
             show=1)
    capsys.readouterr()
    bench = load("bench_fusions")
    designs = ["--designs", "cross_attention/patches", "prefix/merged", "prefix/queries/3"]
    bench.main(["--workdir", str(tmp_path), *designs, "--max-steps", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    # The demo's towers: a 6x6 grid of patches after CLS at 96 px with 16 px patches.
    assert [(r[0].strip(), r[1].strip(), int(r[2])) for r in rows] == [
        ("cross_attention", "patches", 37), ("prefix", "merged", 9), ("prefix", "queries (K=3)", 3)]
    assert all(0 <= float(r[6]) and r[7].strip() != "reused" for r in rows)
    bench.main(["--workdir", str(tmp_path), "--designs", "prefix/merged", "--max-steps", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [(r[1].strip(), r[7].strip()) for r in rows] == [("merged", "reused")]


@pytest.mark.parametrize("design", ["prefix", "prefix/cls", "concat/patches", "prefix/queries/0", "prefix/queries/x"])
def test_fusion_benchmark_names_a_bad_design(design, tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("bench_fusions").main(["--workdir", str(tmp_path), "--designs", design])
    assert f"design {design!r}" in capsys.readouterr().err


def test_fusion_benchmark_refuses_a_step_count_below_one(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("bench_fusions").main(["--workdir", str(tmp_path), "--max-steps", "0"])
    assert "--max-steps 0" in capsys.readouterr().err


def test_fusion_benchmark_needs_a_demo_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        load("bench_fusions").main(["--workdir", str(tmp_path)])
    assert "run `vision-gpt demo" in capsys.readouterr().err


def test_app_burst_benchmark_reports_each_burst_and_the_servers_memory(tiny_model_dir, capsys):
    pytest.importorskip("gradio", reason="the app needs Gradio: pip install -e '.[app]'")
    load("bench_app_burst").main(["--model", str(tiny_model_dir), "--requests", "3", "--bursts", "2", "--pause", "0",
                                  "--beams", "1", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert [[cell.strip() for cell in row[:4]] for row in rows] == [["1", "3/3", "0", "0"], ["2", "3/3", "0", "0"]]
    p50, p90, slowest = (float(cell) for cell in rows[0][4:7])
    assert 0 < p50 <= p90 <= slowest
    if Path("/proc/self/status").exists():  # Linux: the server's memory is read from /proc
        assert all(float(row[8]) > 100 for row in rows), "the server's resident memory, in MB (torch alone is more)"


def test_serve_benchmark_reports_batched_and_one_at_a_time_servers(tiny_model_dir, capsys):
    pytest.importorskip("ray.serve", reason="the server needs Ray Serve: pip install -e '.[serve]'")
    load("bench_serve").main(["--model", str(tiny_model_dir), "--requests", "4", "--clients", "4", "--batch-sizes",
                              "4", "1", "--max-tokens", "3"])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith(("| 4 |", "| 1 |"))]
    assert [row[:2] for row in rows] == [["4", "no"], ["4", "yes"], ["1", "no"], ["1", "yes"]]
    for size, streamed, rate, p50, p90, first, mean_batch in rows:
        assert float(rate) > 0 and 0 < float(p50) <= float(p90)
        assert 1 <= float(mean_batch) <= int(size)
        assert (first != "") == (streamed == "yes")


def test_scale_benchmark_times_each_engine_and_reports_where_it_overtakes(capsys):
    pytest.importorskip("ray", reason="Ray Data is in the test extras; `pip install 'ray[data]'`")
    results = load("bench_scale").main(["--quick", "--images", "8", "--batch-size", "2", "--runs", "cli", "ray1"])
    assert [result["run"] for result in results] == ["cli", "ray1"]
    for result in results:
        # The first row came after start-up, the last before the command ended (a tiny model may write them all at
        # once, between two looks at the file).
        assert 0 < result["first"] <= result["last"] <= result["wall"]
        assert 0 < result["first_rows"] <= 8
    out = capsys.readouterr().out
    assert "| vision-gpt caption |" in out and "| --engine ray, 1 actor |" in out


def test_onnx_benchmark_times_every_runtime_and_checks_onnx_against_pytorch(capsys):
    pytest.importorskip("onnxruntime", reason="ONNX Runtime is in the onnx and test extras")
    result = load("bench_onnx").main(["--quick", "--batch-sizes", "2", "--tokens", "4", "--profile"])
    assert result["parity"] == {"ours": (2, 2), "peer": (2, 2)}
    runtimes = {f"{model} {runtime}" for model in ("ours", "peer")
                for runtime in ("ONNX fp32", "ONNX int8", "PyTorch fp32", "PyTorch bf16")}
    assert [(batch, mode) for batch, mode, _ in result["rows"]] == [(2, "greedy"), (2, "beam5")]
    for _, _, rates in result["rows"]:
        assert set(rates) == runtimes and all(rate > 0 for rate in rates.values())
    out = capsys.readouterr().out
    ratios = [line for line in out.splitlines() if line.startswith(("| 2 | greedy | **", "| 2 | beam5 | **"))]
    assert len(ratios) == 2 and all(re.search(r"\(peer (fp32|bf16)\)", line) for line in ratios)
    for graph in ("ours encoder_model", "ours decoder_model_merged", "peer decoder_with_past_model"):
        assert f"| {graph} |" in out
    assert "| encoder op | ms | share |" in out and "| decoder op | ms | share |" in out
    # 4 tokens: the first step, then 3 with the cache, timed in the call after the warm-up one.
    assert re.search(r"decoder: 4 run\(s\), [\d.]+ ms in all; the first step [\d.]+ ms, later ones [\d.]+ ms each", out)
    assert out.count("| all ops |") == 2


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")
def test_decoder_benchmark_compares_gpt2_a_frozen_decoder_and_lora(tmp_path, capsys, llama_checkpoints):
    load("bench_decoders").main(["--workdir", str(tmp_path), "--text-model", llama_checkpoints[1], "--max-steps", "1",
                                 "--lora-r", "2", "--train-images", "16", "--val-images", "4", "--test-images", "4"])
    out = capsys.readouterr().out
    table = out[out.index("| decoder |"):].split("\n\n")[0].splitlines()[2:]  # each demo run prints its own first
    rows = [line.split("|")[1:-1] for line in table]
    assert [row[0].strip() for row in rows[:3]] == ["GPT-2 4x256 from scratch, trained", "llama, frozen",
                                                    "llama, LoRA r=2"]
    assert rows[3][0].strip().startswith('baseline: "')
    assert all(0 <= float(row[5]) and re.fullmatch(r"\d+\.\d\dx", row[1].strip()) for row in rows)  # CIDEr-D, ratio
    assert (tmp_path / "model-llama-lora2" / "model.safetensors").is_file()
    assert "llama, LoRA r=2: '" in out  # the captions, one line per decoder
