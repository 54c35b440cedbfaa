"""Native bf16 detection, and what the demo, training, `vision-gpt caption` and the app do on a CPU without it.

This machine has AVX-512 BF16, so the CPU without it is forced by replacing `hardware.cpu_bf16_is_native`.
"""

import logging

import pytest
import torch

from vision_gpt.inference import hardware
from vision_gpt.app.server import Captioner
from vision_gpt.cli.commands import main as cli_main
from vision_gpt.demo import training_argv, training_precision
from vision_gpt.training.arguments import emulated_bf16_warning, parse_arguments
from vision_gpt.training.train import main as train

from .conftest import random_images

# Shortened /proc/cpuinfo texts (first core only) of the machines in question.
EPYC_AVX2_ONLY = """\
processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7763 64-Core Processor
flags		: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht \
syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl cpuid pni pclmulqdq ssse3 fma cx16 sse4_1 \
sse4_2 movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm cmp_legacy abm sse4a misalignsse 3dnowprefetch \
fsgsbase bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero \
xsaveerptr rdpid fsrm
bugs		: sysret_ss_attrs null_seg spectre_v1 spectre_v2 spec_store_bypass srso
"""
EPYC_AVX512_BF16 = """\
processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 9654 96-Core Processor
flags		: fpu vme de pse tsc msr sse sse2 avx f16c avx2 avx512f avx512dq avx512ifma avx512cd avx512bw avx512vl \
avx512_bf16 clzero avx512vbmi umip pku avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg avx512_vpopcntdq
"""
# AMX counts on its own (real Sapphire Rapids also lists avx512_bf16).
XEON_AMX = """\
processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme de pse tsc msr sse sse2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni \
amx_bf16 avx512_fp16 amx_tile amx_int8
vmx flags	: vnmi preemption_timer posted_intr invvpid ept_x_only ept_ad
"""
GRAVITON3 = """\
processor	: 0
BogoMIPS	: 2100.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop \
sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng
CPU implementer	: 0x41
CPU part	: 0xd40
"""
GRAVITON2 = """\
processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer	: 0x41
CPU part	: 0xd0c
"""
POWER9 = "processor\t: 0\ncpu\t\t: POWER9, altivec supported\nclock\t\t: 2300.000000MHz\n"


@pytest.mark.parametrize("text, expected", [
    (EPYC_AVX2_ONLY, False), (EPYC_AVX512_BF16, True), (XEON_AMX, True), (GRAVITON3, True), (GRAVITON2, False),
    (POWER9, None), ("", None),
], ids=["epyc-avx2-only", "epyc-avx512-bf16", "xeon-amx", "arm-bf16", "arm-without-bf16", "no-flags", "empty"])
def test_cpuinfo_names_native_bf16(text, expected):
    assert hardware.native_bf16_in_cpuinfo(text) is expected


@pytest.fixture
def fresh_cache():
    hardware.cpu_bf16_is_native.cache_clear()
    yield
    hardware.cpu_bf16_is_native.cache_clear()


def test_without_cpuinfo_flags_bf16_is_measured_once(fresh_cache, monkeypatch, tmp_path):
    probes = []
    monkeypatch.setattr(hardware, "_bf16_matmul_is_faster", lambda: probes.append(1) or True)
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")  # macOS, Windows
    assert hardware.cpu_bf16_is_native() and hardware.cpu_bf16_is_native()
    assert probes == [1]
    hardware.cpu_bf16_is_native.cache_clear()
    (tmp_path / "cpuinfo").write_text(EPYC_AVX2_ONLY)
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "cpuinfo")
    assert not hardware.cpu_bf16_is_native() and probes == [1]


def test_the_measurement_runs_here():
    assert hardware._bf16_matmul_is_faster(size=32, repeats=1) in (True, False)


@pytest.fixture(params=[False, True], ids=["no-native-bf16", "native-bf16"])
def native(request, monkeypatch):
    """A CPU (and no accelerator) with or without native bf16."""
    monkeypatch.setattr(hardware, "cpu_bf16_is_native", lambda: request.param)
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    return request.param


# ----- the demo ------------------------------------------------------------------------------------------------------


def test_demo_trains_in_bf16_only_on_a_cpu_with_native_bf16(native, tmp_path):
    settings = dict(batch_size=32, num_val=200, seed=0, max_steps=0, epochs=2.0)
    argv = training_argv("vit", "gpt2", tmp_path, tmp_path / "model", settings)
    assert argv[argv.index("--use_cpu") + 1] == "true"
    assert (argv[argv.index("--bf16") + 1] == "true") if native else "--bf16" not in argv
    precision, reason = training_precision()
    assert precision == ("bf16" if native else "float32")
    assert ("has native bfloat16" if native else "has no native bfloat16 (no AVX-512 BF16 or AMX") in reason


# ----- training ------------------------------------------------------------------------------------------------------


def test_bf16_training_on_a_cpu_without_native_bf16_warns_and_goes_on(native, tmp_path):
    output = tmp_path / "out"
    missing = str(tmp_path / "no-such-tower")
    # The warning comes before anything is loaded; the run then goes on, and stops here only at the missing tower.
    with pytest.raises(SystemExit, match="no-such-tower"):
        train(["--vision_model", missing, "--text_model", missing, "--data_dir", str(tmp_path), "--output_dir",
               str(output), "--report_to", "none", "--bf16", "true", "--use_cpu", "true"])
    log = (output / "train.log").read_text()
    if native:
        assert "--bf16" not in log
    else:
        assert "--bf16 on the CPU: this CPU has no native bfloat16" in log
        assert "68.8 s with --bf16 and 1.71 s without" in log and "Drop --bf16 to run in float32" in log


def test_float32_training_gets_no_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "cpu_bf16_is_native", lambda: False)
    _, _, training_args = parse_arguments(["--vision_model", "vit", "--text_model", "gpt2", "--data_dir",
                                           str(tmp_path), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    assert emulated_bf16_warning(training_args) is None


# ----- inference -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bf16", "float32"])
def test_caption_warns_about_bf16_on_a_cpu_without_native_bf16_and_goes_on(native, dtype, tiny_model_dir, tmp_path,
                                                                            capsys, caplog):
    image = tmp_path / "a.png"
    random_images(1)[0].save(image)
    # The warning is the loader's, one for every command: a log record, which a terminal shows on stderr.
    with caplog.at_level(logging.WARNING, logger="vision_gpt.inference.loading"):
        cli_main(["caption", str(image), "--model", str(tiny_model_dir), "--dtype", dtype, "--device", "cpu",
                  "--num-workers", "0", "--num-beams", "1", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    warned = any("dtype bfloat16 on the CPU: this CPU has no native bfloat16" in r.getMessage() for r in caplog.records)
    assert warned == (dtype == "bf16" and not native)
    # It goes on: the model is loaded in the dtype asked for, and captioning starts.
    assert f"captioning 1 images with {tiny_model_dir} on cpu ({'bfloat16' if dtype == 'bf16' else 'float32'})" in err


def test_app_warns_about_bf16_on_a_cpu_without_native_bf16(native, tiny_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="vision_gpt.inference.loading"):
        captioner = Captioner.from_pretrained(str(tiny_model_dir), dtype="bfloat16", device="cpu")
    assert captioner.model.dtype == torch.bfloat16
    warned = any("dtype bfloat16 on the CPU: this CPU has no native bfloat16" in r.getMessage() for r in caplog.records)
    assert warned == (not native)


def test_help_names_the_cpu_feature_bf16_needs(capsys):
    for command in ("caption", "app"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        assert "AVX-512 BF16 or AMX" in " ".join(capsys.readouterr().out.split())
