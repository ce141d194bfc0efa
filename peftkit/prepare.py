"""`prepare_model_for_kbit_training`: the QLoRA recipe's preparation step (Dettmers et al.,
2023, arXiv:2305.14314, section 4), with a deliberate choice of what to upcast.

Before adapters are injected into a k-bit model: freeze every base parameter, run the
normalisation layers in fp32 (their statistics are what half precision hurts), make the input
embeddings' output require grad (so gradients reach adapters through checkpointed blocks), turn
on gradient checkpointing, and keep 4-bit layers on bitsandbytes' differentiable path on every CPU
(`quant.avoid_cpu_packing_`: its packed AVX512-BF16 inference format has no gradient).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .quant import avoid_cpu_packing_

UPCAST_MODES = ("norms", "all", "none")
HALF = (torch.float16, torch.bfloat16)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    upcast: str = "norms") -> nn.Module:
    """Prepare a (k-bit) transformers model for adapter training, in place; returns it.

    upcast: which half-precision (fp16/bf16) parameters become fp32.
      - `"norms"` (default): those of normalisation layers (modules whose class name contains
        "Norm": LayerNorm, RMSNorm, GroupNorm, ...), a few thousand weights. Such a layer then
        computes in fp32 (its input is upcast) and returns its output in its former dtype, so
        activations, the unquantized lm_head and everything else keep the model's dtype.
      - `"all"`: every non-quantized half-precision parameter, embeddings and lm_head included
        (Hugging Face PEFT's behaviour); activations then run in fp32 too. For an 8B Llama that
        adds about 2 GB of weights (two 128k x 4096 tables going from 2 to 4 bytes per weight)
        for frozen tensors: transformers' loss upcasts the logits anyway.
      - `"none"`: no casting.
      Quantized weights (bitsandbytes Params4bit / Int8Params) are never touched.
    use_gradient_checkpointing: recompute each block in the backward pass instead of storing its
      activations; `gradient_checkpointing_kwargs` go to `torch.utils.checkpoint.checkpoint`
      (`use_reentrant` defaults to False, torch's recommendation). Input grads are enabled with
      it, since the reentrant variant drops gradients of blocks whose inputs do not require grad.
      A model that does not support it is left without it, with a warning (PEFT skips it).
    """
    if upcast not in UPCAST_MODES:
        raise ValueError(f"upcast={upcast!r} is not known; use one of {UPCAST_MODES}")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in model.modules():
        if upcast == "none" or (upcast == "norms" and "Norm" not in type(module).__name__):
            continue
        half = [p for p in module.parameters(recurse=False) if p.dtype in HALF]
        if half and upcast == "norms":
            _compute_in_fp32(module, out_dtype=half[0].dtype)
        for p in half:
            p.data = p.data.float()
    if use_gradient_checkpointing:
        kwargs = dict(gradient_checkpointing_kwargs or {})
        kwargs.setdefault("use_reentrant", False)
        _enable_checkpointing(model, kwargs)
    return avoid_cpu_packing_(model)


def _compute_in_fp32(module: nn.Module, out_dtype: torch.dtype) -> None:
    """Hooks: floating inputs of `module` become fp32, its floating output `out_dtype`."""

    def upcast_inputs(_, args):
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                     for a in args)

    def restore_output(_, args, output):
        if torch.is_tensor(output) and output.is_floating_point():
            return output.to(out_dtype)
        return output

    module.register_forward_pre_hook(upcast_inputs)
    module.register_forward_hook(restore_output)


def _enable_checkpointing(model: nn.Module, kwargs: dict) -> None:
    if not getattr(model, "supports_gradient_checkpointing", False):
        warnings.warn(f"{type(model).__name__} does not support gradient checkpointing; training "
                      "it without (pass use_gradient_checkpointing=False to silence this)",
                      stacklevel=3)
        return
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if getattr(model, "_require_grads_hook", None) is None:
        model.enable_input_require_grads()
