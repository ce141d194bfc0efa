"""Causal-LM loss without full logits: the output head and cross-entropy fused, chunked over
tokens (the idea of Liger Kernel's fused linear cross-entropy, Hsu et al., 2024,
arXiv:2410.10989).

`model(input_ids, labels=...)` materializes logits (N, V) in fp32 plus their log-softmax and its
gradient: for SmolLM2 at 8 x 256 tokens and V = 49,152 that is about 1.2 GB. `causal_lm_loss`
computes the same loss as transformers' `ForCausalLMLoss` (labels shifted left, -100 ignored,
mean over the counted tokens, or sum / `num_items_in_batch`) from the decoder's hidden states,
`chunk_size` tokens at a time. A batch with no counted token gets what the stock loss gives it:
nan for the mean, 0 / `num_items_in_batch` for the sum, zero gradients. Each chunk's
logits, log-softmax and gradient are formed in one reused (chunk_size, V) fp32 buffer during the
forward pass, so that buffer is all the logits memory there is, and backward only scales the
stored gradients.

`PeftModel.forward` returns this loss (and no logits) for a training forward that asks only for
the loss (`training_forward_loss`); every other call (evaluation, no labels, extra inputs such as
TRL's `fused_lm_head`) runs the model's own forward and returns its logits.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from .amp import custom_bwd, custom_fwd, first_order_only
from .hooks import bypassable

IGNORE_INDEX = -100
# Scored tokens per chunk: a (512, V) fp32 buffer, 100 MB for a 49,152-token vocabulary (the
# choice is measured in docs/benchmarks.md).
CHUNK_SIZE = 512
# Model types whose logits are `get_output_embeddings()(decoder output)`, nothing more, scored by
# transformers' ForCausalLMLoss; tests/test_fused_lora.py checks each against model(...).loss.
FUSABLE_MODEL_TYPES = ("gemma", "gpt2", "llama", "mistral", "olmo2", "phi3", "qwen2", "qwen3",
                       "smollm3")
# What a training forward may be given for `training_forward_loss` to apply: the inputs the fused
# loss passes on to the decoder, and what transformers' Trainer and TRL add.
FUSED_INPUTS = {"input_ids", "attention_mask", "position_ids", "labels", "num_items_in_batch",
                "use_cache"}
# Config attributes that change the logits after the output head (Gemma2's softcapping, Cohere's
# logit_scale, Granite's logits_scaling): a model that sets one takes its own forward.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class LinearCrossEntropy(torch.autograd.Function):
    """sum over valid rows of cross_entropy(hidden @ W^T + b, target) / divisor.

    hidden: (N, H); weight: (V, H); bias: (V,) or None; target: (N,) int64 with -100 = ignore.
    Logits are computed in the weight's dtype and upcast to fp32, as transformers does.
    Rows whose target is ignored get no logits (their loss and gradient are 0), so a masked
    prompt costs nothing here. Saved for backward: grad wrt hidden (N, H) and, only if they
    require grad, wrt weight (V, H) and bias (V,); all already divided by `divisor`.
    """

    @staticmethod
    @custom_fwd
    def forward(ctx, hidden, weight, bias, target, divisor, chunk_size: int):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        rows = (target != IGNORE_INDEX).nonzero().squeeze(1)  # ignored rows need no logits
        row_loss = hidden.new_empty(rows.numel(), dtype=torch.float32)  # summed once, at the end
        # One (chunk, V) fp32 buffer for every chunk; the log-softmax and gradient are formed in it
        buffer = hidden.new_empty((min(chunk_size, rows.numel()), weight.shape[0]),
                                  dtype=torch.float32)
        scale = divisor.reciprocal()
        for start in range(0, rows.numel(), chunk_size):
            idx = rows[start:start + chunk_size]
            h = hidden.index_select(0, idx)
            t = target.index_select(0, idx).unsqueeze(1)
            logits = _logits_into(buffer[:idx.numel()], h, weight, bias)  # (C, V)
            # log_softmax in place: the values cross_entropy computes, without a second buffer
            log_probs = torch._log_softmax(logits, 1, False, out=logits)
            row_loss[start:start + idx.numel()] = log_probs.gather(1, t).squeeze(1).neg_()
            if not (need_h or need_w or need_b):
                continue
            # d loss / d logits = (softmax - onehot(target)) / divisor
            grad = log_probs.exp_()
            grad.scatter_add_(1, t, torch.full_like(t, -1, dtype=grad.dtype))
            grad.mul_(scale)
            g = grad.to(weight.dtype)
            if need_h:
                grad_h.index_copy_(0, idx, (g @ weight).to(hidden.dtype))
            if need_w:
                grad_w.addmm_(grad.t(), h.float())
            if need_b:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return row_loss.sum() / divisor

    @staticmethod
    @first_order_only  # saved tensors are constants to autograd: no 2nd derivative
    @custom_bwd
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_bias = ctx.saved_tensors
        out = [None if g is None else (g * grad_loss).to(dtype)
               for g, dtype in ((grad_h, ctx.dtypes[0]), (grad_w, ctx.dtypes[1]),
                                (grad_bias, ctx.dtypes[1]))]
        return (*out, None, None, None)


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """out[:] = h @ weight^T + bias, computed in the weight's dtype (or autocast's); out: (C, V)
    fp32."""
    if (h.dtype != out.dtype or weight.dtype != out.dtype
            or torch.is_autocast_enabled(h.device.type)):
        return out.copy_(nn.functional.linear(h, weight, bias))
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   attention_mask: torch.Tensor | None = None,
                   num_items_in_batch: int | torch.Tensor | None = None,
                   chunk_size: int = CHUNK_SIZE, **kwargs) -> torch.Tensor:
    """The loss `model(input_ids, labels=labels, ...).loss` would give, without full logits.

    model: a transformers causal LM (or a PeftModel around one) whose logits are
    `get_output_embeddings()(last hidden state)`, e.g. Llama, Mistral, Qwen2, GPT-2.
    input_ids, labels: (B, T). Returns a scalar fp32 loss.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config
    attr = _logit_transform(config)
    if attr is not None:
        raise ValueError(f"causal_lm_loss does not apply {attr}; use model(...).loss")
    head = lm.get_output_embeddings()
    out = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    target = nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:].reshape(-1)
    target = target.to(hidden.device)
    if num_items_in_batch is None:  # no counted token: 0 / 0 = nan, as cross_entropy's mean
        divisor = (target != IGNORE_INDEX).sum().float()
    else:
        divisor = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=hidden.device)
    weight, bias = head.weight, getattr(head, "bias", None)
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, target,
                                    divisor, chunk_size)


def _logit_transform(config) -> str | None:
    """The first of `LOGIT_TRANSFORMS` that `config` sets to something other than None / 1."""
    return next((attr for attr in LOGIT_TRANSFORMS
                 if getattr(config, attr, None) not in (None, 1.0)), None)


def fusable(model: nn.Module) -> bool:
    """Whether `causal_lm_loss(model, ...)` computes `model(..., labels=...).loss`: a model type in
    `FUSABLE_MODEL_TYPES` whose config transforms no logits (`LOGIT_TRANSFORMS`), scored by
    transformers' causal-LM loss, with a plain `nn.Linear` output
    head (or a `modules_to_save` copy of one) that has no hooks, as the model itself (the fused
    loss calls neither), and no prompt-learning adapter active (its virtual tokens take part in
    the model's loss)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from ..methods.modules_to_save import ModulesToSaveWrapper

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) not in FUSABLE_MODEL_TYPES:
        return False
    if _logit_transform(config) is not None:
        return False
    if getattr(lm, "loss_function", None) is not ForCausalLMLoss:
        return False
    # Only transformers' own classes: a subclass's forward (an extra loss term, say) must run.
    if not type(lm).__module__.startswith("transformers.") or not bypassable(lm, type(lm)):
        return False
    adapter = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    if adapter is not None and adapter.is_prompt_learning:
        return False
    head = lm.get_output_embeddings()
    if isinstance(head, ModulesToSaveWrapper):
        head = head._current()
    return bypassable(head, nn.Linear)


def training_forward_loss(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether `model(*args, **kwargs)` may return `fused_forward`'s output: a training forward
    (train mode, grad enabled) given labels and no input beyond `FUSED_INPUTS`, of a fusable
    model. Evaluation, `generate`, a forward without labels, or one asking for more (hidden
    states, attentions, TRL's `fused_lm_head`) gets the model's own forward and its logits."""
    return (not args and kwargs.get("labels") is not None and "input_ids" in kwargs
            and set(kwargs) <= FUSED_INPUTS
            and model.training and torch.is_grad_enabled() and fusable(model))


def fused_forward(model: nn.Module, labels: torch.Tensor, **kwargs) -> CausalLMOutputWithPast:
    """`model(**kwargs, labels=labels)` with the loss from `causal_lm_loss` and `logits` None."""
    kwargs.pop("use_cache", None)
    return CausalLMOutputWithPast(loss=causal_lm_loss(model, labels=labels, use_cache=False,
                                                      **kwargs))
