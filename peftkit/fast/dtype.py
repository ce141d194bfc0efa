"""Which dtype `peftkit train` loads the base model in when `--dtype auto`: bf16 where the
hardware multiplies bf16 matrices natively, fp32 elsewhere.

On x86 CPUs bf16 matmuls run in hardware with AVX512-BF16 or AMX-BF16 (Intel Xeon since Cooper
Lake / Sapphire Rapids); without them oneDNN emulates bf16 and a training step is many times
slower than in fp32 (docs/benchmarks.md). On CUDA, devices of compute capability 8.0 and above.
"""

from __future__ import annotations

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return next((set(line.split(":", 1)[1].split()) for line in fh
                         if line.startswith(("flags", "Features"))), set())
    except OSError:
        return set()


def training_dtype(cuda: bool | None = None, flags: set[str] | None = None) -> tuple[torch.dtype, str]:
    """(dtype, why): bf16 where it runs fast, else fp32. `cuda`, `flags`: what to decide for
    (default: this machine)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if cuda:
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "the CUDA device computes bf16 natively"
        return torch.float32, "the CUDA device has no native bf16"
    flags = cpu_flags() if flags is None else flags
    found = [f for f in BF16_CPU_FLAGS if f in flags]
    if found:
        return torch.bfloat16, f"the CPU multiplies bf16 in hardware ({', '.join(found)})"
    return torch.float32, ("the CPU has neither amx_bf16 nor avx512_bf16, so bf16 matmuls are "
                           "emulated and much slower than fp32")


def describe() -> str:
    """One line for logs and `peftkit doctor`: the dtype `--dtype auto` picks here, and why."""
    dtype, why = training_dtype()
    return f"training dtype: {str(dtype).removeprefix('torch.')} ({why}; --dtype overrides)"
