"""The training memory plan: weights, gradients, optimizer states, activations, logits, total.

- weights: frozen base tensors in the compute dtype, or NF4 + constants for QLoRA (`nf4`);
  trainable tensors in their own dtype (LoRA adapters are fp32, PEFT's autocast_adapter_dtype).
- gradients: one per trainable parameter, in its dtype.
- optimizer: torch AdamW keeps exp_avg and exp_avg_sq in the parameter's dtype (8 bytes for fp32);
  bitsandbytes' 8-bit AdamW keeps two uint8 states with one fp32 absmax per 256 values, and
  32-bit states for tensors under 4096 values (its `min_8bit_size`).
- activations: `activations` (Korthikanti et al., 2022), with or without checkpointing.
- logits (`loss_bytes`): transformers' causal-LM loss upcasts the logits to fp32; at the start
  of backward the fp32 log-probabilities (saved by log_softmax), their gradient and the logits'
  gradient are alive: 12 * vocab bytes per token, plus the int64 labels. `peftkit train`'s fused
  loss (`peftkit.fast.loss`, where `fusable`) instead holds, at the end of the forward pass, the final
  hidden states and their gradient (2*e*h per token), the labels and their shifted copy (16 bytes
  per token), the scored rows' indices and losses (12 bytes each), one (chunk, vocab) fp32
  buffer (+ the chunk's logits, or their gradient, in a 16-bit compute dtype) and the chunk's
  hidden rows and their gradient; with a trainable head also its fp32 gradient. (Every token is
  taken as scored: masked prompt tokens cost less.)
- total: weights + optimizer + the larger of two moments of the step (the profiler on CPU puts
  the peak in the first for every case of `tests/test_planner.py`):
  - the loss: all activations (under checkpointing: the layers' inputs and the once-per-step
    tensors, no layer's internals yet) + logits (stock: at the start of backward, in
    LogSoftmaxBackward; fused: at the end of the forward pass);
  - a layer's backward: the once-per-step tensors, that layer's (recomputed) activations, the
    layers' inputs under checkpointing, all gradients (a bound: they are complete only at the
    end), and QLoRA's dequantized weight.
  The fused AdamW step (transformers' default `adamw_torch_fused`) needs no extra memory.
Not counted: the CUDA context and kernels' workspaces, allocator fragmentation, data batches.
"""

from __future__ import annotations

import dataclasses

import torch

from ..fast.loss import CHUNK_SIZE, FUSABLE_MODEL_TYPES
from . import nf4
from .activations import Activations, Arch, activations

OPTIMIZERS = ("adamw", "adamw8bit")


@dataclasses.dataclass(frozen=True)
class Settings:
    batch_size: int = 1
    seq_len: int = 2048
    dtype: torch.dtype = torch.bfloat16
    optimizer: str = "adamw"
    checkpointing: bool = False
    double_quant: bool = True
    # peftkit train's training step (False: transformers' own forward and loss, as PEFT uses):
    fused_loss: bool = True  # the fused chunked loss where `loss.fusable` (--no-fused-loss)
    lean_mlp: bool = True  # gated SiLU MLPs through fast.swiglu.SiluMul (peftkit.fast)


@dataclasses.dataclass
class Plan:
    weights: dict[str, int]  # label ("bf16", "fp32", "nf4", "nf4 constants") -> bytes
    gradients: int
    optimizer: int
    activations: Activations
    checkpointing: bool
    logits: int
    dequant: int  # QLoRA: the largest frozen weight dequantized to the compute dtype
    tokens: int

    @property
    def weight_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def activation_bytes(self) -> int:
        a = self.activations
        return a.checkpointed if self.checkpointing else a.plain

    @property
    def total(self) -> int:
        a = self.activations
        kept = a.fixed + (a.checkpoints if self.checkpointing else 0)
        start = (kept if self.checkpointing else a.plain) + self.logits
        layer = kept + a.largest_layer + self.gradients + self.dequant
        return self.weight_bytes + self.optimizer + max(start, layer)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(
        dtype, str(dtype).removeprefix("torch."))


def _adam8bit_bytes(n: int) -> int:
    if n < 4096:
        return 8 * n
    return 2 * (n + 4 * nf4.ceil_div(n, 256))


def stored_dtype(t, settings: Settings, method_full: bool) -> torch.dtype:
    """The dtype a non-quantized tensor is held in: adapters keep their own (fp32), the base
    model and a fully fine-tuned model the compute dtype."""
    return t.dtype if t.trainable and not method_full else settings.dtype


def weight_bytes(t, settings: Settings, method_full: bool) -> int:
    """Bytes tensor `t` (a `params.Tensor`) occupies: NF4 codes and constants when quantized."""
    if t.quantized and not t.trainable:
        return nf4.nf4_bytes(t.numel) + nf4.nf4_constant_bytes(t.numel, settings.double_quant)
    return t.numel * stored_dtype(t, settings, method_full).itemsize


def memory_plan(census, model_config, settings: Settings, method_full: bool) -> Plan:
    """The plan for `census` (a `params.Census`) of `model_config` under `settings`."""
    e = settings.dtype.itemsize
    weights: dict[str, int] = {}
    grads = opt = dequant = 0
    for t in census.tensors:
        if t.quantized and not t.trainable:
            weights["nf4"] = weights.get("nf4", 0) + nf4.nf4_bytes(t.numel)
            key = "nf4 constants"
            weights[key] = weights.get(key, 0) + nf4.nf4_constant_bytes(
                t.numel, settings.double_quant)
            dequant = max(dequant, t.numel * e)
            continue
        dtype = stored_dtype(t, settings, method_full)
        name = _dtype_name(dtype)
        weights[name] = weights.get(name, 0) + t.numel * dtype.itemsize
        if t.trainable:
            grads += t.numel * dtype.itemsize
            opt += (2 * t.numel * dtype.itemsize if settings.optimizer == "adamw"
                    else _adam8bit_bytes(t.numel))
    peft = census.peft_config
    virtual = getattr(peft, "num_virtual_tokens", 0) if peft is not None and \
        peft.is_prompt_learning else 0
    seq = settings.seq_len + virtual
    tokens = settings.batch_size * seq
    arch = Arch.of(model_config)
    lean = settings.lean_mlp and getattr(model_config, "hidden_act", None) == "silu"
    acts = activations(arch, e, settings.batch_size, seq, full=method_full,
                       input_grad=method_full or virtual > 0, lora_sites=census.lora,
                       lean_mlp=lean)
    head_adapted = any(site.path.rsplit(".", 1)[-1] == "lm_head" for site in census.lora)
    fused = (settings.fused_loss and arch.model_type in FUSABLE_MODEL_TYPES and not virtual
             and not head_adapted)
    head_trains = any(t.trainable and "lm_head" in t.name.split(".") for t in census.tensors)
    logits = loss_bytes(arch, e, settings.batch_size, seq, fused, head_trains or (
        method_full and getattr(model_config, "tie_word_embeddings", False)))
    return Plan(weights, grads, opt, acts, settings.checkpointing, logits, dequant, tokens)


def loss_bytes(arch: Arch, e: int, batch: int, seq: int, fused: bool, head_trains: bool) -> int:
    """Bytes the loss holds at its peak besides the activations (module docstring)."""
    tokens = batch * seq
    if not fused:
        return tokens * (12 * arch.vocab + 8)
    scored = batch * (seq - 1)  # the last token of a sequence has no next token to predict
    chunk = min(scored, CHUNK_SIZE)  # the buffer, and the chunk's hidden rows and gradient
    buffer = chunk * (arch.vocab * (4 + (e if e != 4 else 0)) + 2 * e * arch.hidden)
    head_grad = 4 * arch.vocab * arch.hidden if head_trains else 0
    return tokens * (2 * e * arch.hidden + 16) + scored * 12 + buffer + head_grad
