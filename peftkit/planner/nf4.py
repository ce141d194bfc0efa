"""Bytes of frozen weights stored in NF4 (QLoRA: Dettmers et al., 2023, arXiv:2305.14314, Sec. 3).

bitsandbytes' layout for a tensor of n weights (blocksize 64; `quantize_4bit` in bnb 0.4x-0.50):
- packed codes: two 4-bit codes per byte, ceil(n / 2) bytes;
- one absmax per 64-weight block. Without double quantization it is fp32: 4 * ceil(n / 64) bytes.
  With double quantization the absmaxes, minus their mean (one fp32 offset), are quantized to
  8 bits in blocks of 256 with one fp32 absmax each: ceil(n / 64) + 4 * ceil(ceil(n / 64) / 256)
  + 4 bytes. Per weight that is 8/64 + 32/(64*256) = 0.127 bits instead of 32/64 = 0.5 bits, the
  paper's figures.
The 16-entry NF4 code and the 256-entry 8-bit code are shared lookup tables (< 1.1 KiB) and not
counted.
"""

from __future__ import annotations

BLOCK = 64  # weights per absmax
BLOCK2 = 256  # absmaxes per second-level constant (double quantization)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def nf4_bytes(n: int) -> int:
    """Packed 4-bit codes of n weights."""
    return ceil_div(n, 2)


def nf4_constant_bytes(n: int, double_quant: bool) -> int:
    """Quantization constants of n weights (see the module docstring)."""
    blocks = ceil_div(n, BLOCK)
    if not double_quant:
        return 4 * blocks
    return blocks + 4 * ceil_div(blocks, BLOCK2) + 4
