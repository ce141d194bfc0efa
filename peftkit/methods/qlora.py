"""QLoRA: LoRA over a frozen k-bit base (Dettmers et al., 2023, arXiv:2305.14314).

`SPEC` is LoRA's with the base loaded in 4-bit (`--quant-type`, double-quantized, blocks of 64)
and prepared for k-bit training; the adapter and its files are LoRA's.

The base weight W0 (out, in) stays quantized in a bitsandbytes layer: `Linear4bit` (NF4 or FP4
codes, blocks of 64, optionally double-quantized scales) or `Linear8bitLt` (LLM.int8). The
base matmul runs in the layer's compute dtype with bitsandbytes' kernels; the LoRA branch is
`LoraLinear`'s (`peftkit.fast.lora_fn`): it runs in the adapter dtype (fp32 by default, the
compute dtype with `autocast_adapter_dtype=False`), adds the base output in that dtype and rounds
the sum once to the compute dtype:

    y = cast(base(x) + B @ A @ dropout(x) * scaling)      x: (..., in), y: (..., out)

Nothing else differs from `LoraLinear` until merging: a merged k-bit weight cannot hold
W0 + scaling * B @ A exactly, so `merge` dequantizes, adds the delta in fp32 and re-quantizes
with the layer's own settings, warning about the rounding. Each re-quantized weight is within
half the widest codebook gap times its block's absmax of the exact sum (NF4: 0.152 * absmax,
FP4: 0.167 * absmax; int8: 0.5 / 127 * the row's absmax), plus the rounding of the stored
absmax itself under double quantization. For an exact merge,
`PeftModel.merge_and_unload(dequantize=True)` first turns every k-bit layer into an `nn.Linear`
(see `peftkit.quant.dequantize_model`); these layers then merge like plain LoRA.

DoRA (`use_dora=True`, QDoRA) works on these layers unchanged: its norm ||W0 + s B A||_row and,
with dropout, W0 x_d use the dequantized W0 (`dense_weight`), as PEFT's `dequantize_module_weight`
does; merging scales the dequantized W0 + delta by m / norm and re-quantizes, as PEFT's
`Linear4bit.merge` does (the same codes; `tests/test_qlora.py`).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import quant
from . import lora
from .lora import LoraLinear, register_wrapper


class KbitLoraLinear(LoraLinear):
    """LoRA adapters on a bitsandbytes `Linear4bit` / `Linear8bitLt` (kept as `base_layer`)."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """4-bit: the layer's `compute_dtype` (else the dtype quantized from); 8-bit: fp16, the
        input dtype of bitsandbytes' int8 matmul."""
        kind = quant.kbit_kind(self.base_layer)
        if kind == "4bit":
            return self.base_layer.compute_dtype or quant.source_dtype(self.base_layer)
        if kind == "8bit":
            return torch.float16
        return super().compute_dtype

    def dense_weight(self) -> torch.Tensor:
        """The dequantized base weight (out, in) (for DoRA's norm)."""
        if quant.kbit_kind(self.base_layer) is None:
            return super().dense_weight()
        return quant.dequantize_weight(self.base_layer)

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Fold adapters into the k-bit weight by re-quantizing W0 + delta (lossy, warned)."""
        if quant.kbit_kind(self.base_layer) is None:  # dequantized by dequantize_model
            return super().merge(names, safe_merge)
        for name in names:
            if name not in self.lora_A:
                continue
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; not merging it again",
                              stacklevel=3)
                continue
            merged = self.merged_weight(name, quant.dequantize_weight(self.base_layer).float())
            if safe_merge and not torch.isfinite(merged).all():
                self.merged_norms.pop(name, None)
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; not merged")
            warnings.warn(
                f"merging adapter {name!r} into a k-bit weight re-quantizes it: each weight moves "
                "by up to half a codebook step, so outputs differ slightly from the unmerged "
                "model. Use merge_and_unload(dequantize=True) for an exact full-precision merge.",
                stacklevel=3,
            )
            quant.requantize_(self.base_layer, merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if quant.kbit_kind(self.base_layer) is None:
            return super().unmerge()
        if self.merged_adapters:
            warnings.warn("unmerging from a k-bit weight re-quantizes it; the restored base "
                          "weight differs from the original by rounding", stacklevel=3)
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            restored = self.unmerged_weight(name, quant.dequantize_weight(self.base_layer).float())
            quant.requantize_(self.base_layer, restored)
            self.merged_norms.pop(name, None)


register_wrapper(lambda layer: quant.kbit_kind(layer) is not None, KbitLoraLinear)

SPEC = dataclasses.replace(
    lora.SPEC, name="qlora", help="LoRA over a frozen 4-bit base (Dettmers et al., 2023)",
    flags={**lora.FLAGS, "quant_type": dict(
        default="nf4", choices=list(quant.QLORA_TYPES),
        help="4-bit data type of the frozen base (double-quantized, blocks of 64)")},
    kbit_base=True, compare_flags={**lora.SPEC.compare_flags, "quant_type": "nf4"},
)
