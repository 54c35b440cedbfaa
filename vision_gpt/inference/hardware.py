"""What this machine's CPU does fast: whether bfloat16 matrix multiplies run natively or are emulated.

Where bf16 is emulated (x86 with AVX2 only, for one) it is not a little slower than float32 but many times slower: a
demo training step took 68.8 s in bf16 autocast and 1.71 s in float32 on an AVX2-only AMD EPYC. So bf16 is chosen from
what the CPU has, never assumed.
"""

import functools
import time
from pathlib import Path

# The instruction sets that multiply bf16 in hardware, by the /proc/cpuinfo line that lists them: x86's AVX-512 BF16
# (Cooper Lake, Zen 4 and later) and AMX (Sapphire Rapids and later); Arm's BF16 extension (Armv8.6-A: Neoverse V1/N2,
# Graviton 3 and later), which has its own matrix-multiply instruction, BFMMLA.
NATIVE_BF16_FLAGS = {"flags": {"avx512_bf16", "amx_bf16"}, "features": {"bf16"}}
CPUINFO = Path("/proc/cpuinfo")


def native_bf16_in_cpuinfo(text: str) -> bool | None:
    """Whether a /proc/cpuinfo text lists an instruction set that multiplies bf16 natively; None when it lists no CPU
    flags at all (some architectures and containers), so that nothing can be told from it."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in NATIVE_BF16_FLAGS:
            # Every core of a machine has the same instruction sets: the first core's line is enough.
            return bool(NATIVE_BF16_FLAGS[key] & set(value.split()))
    return None


def _bf16_matmul_is_faster(size: int = 256, repeats: int = 3) -> bool:
    """Measured: whether a bf16 matrix multiply beats a float32 one here (a few milliseconds, or ~0.1 s emulated)."""
    import torch

    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size).to(dtype)
        a @ a  # the first call selects and builds the kernel
        start = time.perf_counter()
        for _ in range(repeats):
            a @ a
        seconds[dtype] = time.perf_counter() - start
    return seconds[torch.bfloat16] < seconds[torch.float32]


@functools.cache
def cpu_bf16_is_native() -> bool:
    """True where bf16 matrix multiplies run natively on this CPU, so bf16 is faster than float32 (and not many times
    slower). Read from /proc/cpuinfo; without one (macOS, Windows) or where it lists no flags, measured once instead:
    neither has a file that names the instruction sets, and the comparison is far from close either way."""
    try:
        native = native_bf16_in_cpuinfo(CPUINFO.read_text())
    except OSError:
        native = None
    return _bf16_matmul_is_faster() if native is None else native


@functools.cache
def cpu_name() -> str:
    """This CPU in words, for figures that depend on it: "AMD EPYC, 2 cores, native bf16" (or "bf16 emulated")."""
    import os
    import platform

    name = platform.processor() or platform.machine() or "unknown CPU"
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                name = value.strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, {'native bf16' if cpu_bf16_is_native() else 'bf16 emulated'}"


def describe_cpu_bf16() -> str:
    """One line for messages: whether bf16 is fast on this CPU, and why."""
    if cpu_bf16_is_native():
        return ("this CPU has native bfloat16 (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm): bf16 matrix "
                "multiplies are faster than float32")
    return ("this CPU has no native bfloat16 (no AVX-512 BF16 or AMX on x86, no BF16 extension on Arm): bf16 is "
            "emulated and slower than float32")


__all__ = ["cpu_bf16_is_native", "cpu_name", "describe_cpu_bf16", "native_bf16_in_cpuinfo"]
