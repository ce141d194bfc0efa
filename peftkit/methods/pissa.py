"""LoRA inits that move part of the base weight into the adapter: PiSSA (Meng et al., 2024,
arXiv:2404.02948) and OLoRA (Büyükakyüz, 2024, arXiv:2406.01775), as Hugging Face PEFT 0.21.2
computes them (`LoraConfig(init_lora_weights="pissa" | "pissa_niter_N" | "olora")`).

With the base weight W (out, in) (transposed from GPT-2's `Conv1D` (in, out)), rank r and
scaling s (`lora_alpha / r`, or `/ sqrt(r)` with rsLoRA), in fp32:

    PiSSA:   W = U S V^T (full SVD; `pissa_niter_N`: `torch.svd_lowrank(W, r, niter=N)`)
             B = U_r sqrt(S_r / s)      (out, r)      A = sqrt(S_r / s) V_r^T      (r, in)
    OLoRA:   W = Q R (reduced QR)
             B = Q[:, :r]               (out, r)      A = R[:r]                    (r, in)

and the base becomes the residual W_res = W - s * B @ A, rounded to the base dtype, so the model
is unchanged at init up to that rounding. A and B are rounded to the base dtype too (PEFT moves
the adapter to the base layer's dtype before `autocast_adapter_dtype` upcasts it).

OLoRA also works over a bitsandbytes 4-bit or 8-bit base, as in PEFT: W is the dequantized
weight, the base is re-quantized from the fp32 W_res with the layer's own settings
(`quant.requantize_`), so the model at init is off by that re-quantization, and A, B are rounded
to a 4-bit layer's compute dtype. PiSSA is refused there (PEFT refuses it too).

Because the base is changed, a PiSSA adapter file describes W_res + s * B @ A: loading one
re-runs the init on the untouched base (exact again for "pissa" and "olora", which are
deterministic; a different random residual for `pissa_niter_N`). `lora_from_mutated` turns the
trained adapter into a plain LoRA on the untouched base, given the initial adapter A0, B0:

    W_res + s * B @ A = W + s * (B @ A - B0 @ A0) = W + s * [B, -B0] @ [A; A0]

a rank-2r LoRA with r and lora_alpha doubled (rsLoRA: alpha * sqrt(2)), so s is unchanged
(`PeftModel.save_pretrained(dir, path_initial_model_for_weight_conversion=INIT_DIR)`).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .. import checkpoint, quant
from ..errors import UserError

if TYPE_CHECKING:
    from torch import nn

    from .lora import LoraConfig, LoraLinear

_PISSA = re.compile(r"pissa(_niter_(\d+))?")
INITIAL_DIR = "initial_adapter"  # `peftkit train`: the adapter at init, in the output dir


def valid(init: Any) -> bool:
    """Whether `init` is an `init_lora_weights` value this module computes."""
    return isinstance(init, str) and (init == "olora" or _PISSA.fullmatch(init) is not None)


def mutates_base(config: Any) -> bool:
    """Whether `config` is a LoRA config whose init changes the base weights."""
    return valid(getattr(config, "init_lora_weights", None))


def init_from_base(layer: "LoraLinear", name: str, init: str) -> None:
    """Set adapter `name`'s A and B on `layer` from its base weight and replace the base weight
    by the residual (the module docstring's formulas), in place."""
    base = layer.base_layer
    weight = base.weight
    if weight.device.type == "meta":  # `peftkit estimate` counts parameters only
        return
    kind = quant.kbit_kind(base)
    if kind is not None and init != "olora":
        raise UserError(
            f"init_lora_weights={init!r} needs a full-precision base, not a bitsandbytes k-bit "
            "layer: PEFT refuses PiSSA there too. Initialise on the fp16/bf16/fp32 model, save "
            "the residual model (`unload()`), and quantize that instead")
    if kind is None and weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise UserError(f"init_lora_weights={init!r}: the base weight is {weight.dtype}; "
                        "load the model in float32, float16 or bfloat16")
    if init == "olora" and layer.fan_in_fan_out:
        raise UserError(
            "init_lora_weights='olora' on a GPT-2 Conv1D layer (fan_in_fan_out): PEFT 0.21.2's "
            "OLoRA ignores the transposed layout and fails or gives a wrong init there, so its "
            "files would not load in PEFT. Use 'pissa', or target nn.Linear layers")
    r, s = layer.r[name], layer.scaling[name]
    w = layer.dense_weight().to(torch.float32)  # (out, in); a k-bit weight dequantized
    if r > min(w.shape):
        raise UserError(f"init_lora_weights={init!r}: r={r} exceeds the smaller side "
                        f"{min(w.shape)} of a {tuple(w.shape)} weight; use a smaller r")
    if init == "olora":
        q, rr = torch.linalg.qr(w)
        b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    else:
        niter = _PISSA.fullmatch(init).group(2)
        if niter is None:
            u, sv, vh = torch.linalg.svd(w, full_matrices=False)
            u, sv, vh = u[:, :r], sv[:r] / s, vh[:r]
        else:
            u, sv, v = torch.svd_lowrank(w, r, niter=int(niter))
            sv, vh = sv / s, v.t()
        a = torch.diag(torch.sqrt(sv)) @ vh  # PEFT's expressions, for the same bits
        b = u @ torch.diag(torch.sqrt(sv))
    # PEFT then casts A, B to the base's float dtype: a 4-bit layer's compute dtype, none for 8-bit
    dtype = weight.dtype if kind is None else getattr(base, "compute_dtype", None) or torch.float32
    with torch.no_grad():
        _set_residual(layer, b, a, s, w)
        layer.lora_A[name].weight.copy_(a.to(dtype))
        layer.lora_B[name].weight.copy_(b.to(dtype))


def _set_residual(layer: "LoraLinear", b: torch.Tensor, a: torch.Tensor, scaling: float,
                  w: torch.Tensor | None = None) -> None:
    """Replace `layer`'s base weight W by W_res = W - scaling * B @ A, computed in fp32 and
    rounded to the base dtype, in the base layout; a k-bit base is re-quantized from the fp32
    W_res with its own settings, as PEFT's OLoRA does. B (out, r), A (r, in); `w`: W as
    (out, in) fp32 (dequantized), if the caller has it."""
    base = layer.base_layer
    w = layer.dense_weight().to(torch.float32) if w is None else w
    residual = w - scaling * b.float() @ a.float()
    if quant.kbit_kind(base) is not None:
        quant.requantize_(base, residual, dtype=torch.float32)
    else:
        base.weight.data = layer.out_in(residual.to(base.weight.dtype)).contiguous()


def check_convertible(config: "LoraConfig") -> None:
    """Refuse a config whose trained adapter `lora_from_mutated` cannot turn into plain LoRA:
    DoRA (its magnitude does not add up), and rsLoRA with rank_pattern or alpha_pattern (as in
    PEFT). `peftkit train` converts at the end of a PiSSA/OLoRA run, so it checks before
    training (`start_run`)."""
    if config.use_dora:
        raise UserError("a PiSSA/OLoRA adapter with use_dora=True cannot be converted to plain "
                        "LoRA (DoRA's magnitude does not add up), as `peftkit train` and "
                        "save_pretrained(path_initial_model_for_weight_conversion=...) do: use "
                        "DoRA with another init, or (Python API) save without the conversion "
                        "and keep the residual model")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise UserError("converting a PiSSA/OLoRA adapter to plain LoRA (`peftkit train` does at "
                        "its end; save_pretrained(path_initial_model_for_weight_conversion=...)) "
                        "does not work with use_rslora together with rank_pattern or "
                        "alpha_pattern (as in PEFT): train without one of them")


def lora_from_mutated(config: "LoraConfig", tensors: dict[str, torch.Tensor],
                      initial: dict[str, torch.Tensor]) -> tuple["LoraConfig", dict]:
    """The plain LoRA (config, file tensors) equal on the untouched base to a PiSSA/OLoRA
    adapter `tensors` (file keys) whose initial A0, B0 are in `initial` (the module docstring).

    Other tensors (biases, modules_to_save) are kept as they are; PEFT drops them."""
    check_convertible(config)
    init = config.init_lora_weights
    if not (init is True or valid(init)):
        warnings.warn(f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters; "
                      f"this one has init_lora_weights={init!r}", stacklevel=3)
    out = {}
    for key, t in tensors.items():
        pair = key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")
        if pair and key not in initial:
            raise UserError(f"the initial adapter has no {key!r}: pass the folder saved right "
                            "after initialising this adapter")
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([t, initial[key].to(t)], dim=0)  # (2r, in)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([t, -initial[key].to(t)], dim=1)  # (out, 2r)
        else:
            out[key] = t
    converted = copy.deepcopy(config)
    converted.init_lora_weights = True
    converted.r *= 2
    converted.lora_alpha *= 2 ** 0.5 if config.use_rslora else 2
    converted.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    converted.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    return converted, out


def initial_config(config: "LoraConfig") -> "LoraConfig":
    """`config` with `init_lora_weights=True`: loading the initial adapter must not change the
    base again (PEFT writes this config into the initial folder when converting)."""
    out = copy.deepcopy(config)
    out.init_lora_weights = True
    return out


def save_initial(peft_model: "nn.Module", directory: str) -> None:
    """Save every adapter of `peft_model` as it is now, with `initial_config`s."""
    configs = dict(peft_model.peft_config)
    peft_model.peft_config.update({k: initial_config(c) for k, c in configs.items()})
    try:
        peft_model.save_pretrained(directory)
    finally:
        peft_model.peft_config.update(configs)


def convert_saved(directory: str, initial_dir: str) -> None:
    """Rewrite the adapter saved in `directory` (PiSSA/OLoRA, as trained) as plain LoRA."""
    from ..config import PeftConfig

    config = PeftConfig.from_pretrained(directory)
    tensors = checkpoint.load_tensors(directory)
    config, tensors = lora_from_mutated(config, tensors, checkpoint.load_tensors(initial_dir))
    checkpoint.save_tensors(tensors, os.path.join(directory, checkpoint.WEIGHTS_NAME))
    config.save_pretrained(directory)


def get_peft_model_from_initial(model: "nn.Module", config: "LoraConfig",
                                initial_dir: str) -> "nn.Module":
    """`get_peft_model(model, config)` with the residual base rebuilt from the initial adapter
    in `initial_dir` (W_res = W - s * B0 @ A0) instead of a new init: a PiSSA run resumes on the
    residual it started with, also for the random `pissa_niter_N`. The adapter holds A0, B0."""
    from ..model import get_peft_model

    if not _has_adapter(initial_dir):
        raise UserError(f"resuming a run with init_lora_weights={config.init_lora_weights!r} "
                        f"needs its initial adapter in {initial_dir}; start the run again "
                        "with --overwrite")
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        peft_model = get_peft_model(model, config)
    finally:
        config.init_lora_weights = init
    peft_model.load_adapter(initial_dir, "default", is_trainable=True)
    from .lora import LoraLinear

    with torch.no_grad():
        for layer in peft_model.modules():
            if isinstance(layer, LoraLinear) and "default" in layer.lora_A:
                _set_residual(layer, layer.lora_B["default"].weight,
                              layer.lora_A["default"].weight, layer.scaling["default"])
    return peft_model


def _has_adapter(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, checkpoint.WEIGHTS_NAME))


def resumed_initial(resume: str, output_dir: str) -> str:
    """The initial adapter of the run that wrote checkpoint `resume`: `initial_adapter/` next to
    it (`--resume /other/run/checkpoint-N`), else the one in `output_dir` with a warning (a
    checkpoint copied out of its run: right for the deterministic "pissa" and "olora", a
    different residual for `pissa_niter_N` unless it is the same run's)."""
    beside = os.path.join(os.path.dirname(os.path.normpath(resume)), INITIAL_DIR)
    here = os.path.join(output_dir, INITIAL_DIR)
    if _has_adapter(beside):
        return beside
    if _has_adapter(here):
        warnings.warn(f"no {INITIAL_DIR} next to {resume}; resuming on the initial adapter in "
                      f"{here}, which must be the init of the run that wrote it", stacklevel=3)
        return here
    places = beside if os.path.abspath(beside) == os.path.abspath(here) \
        else f"{beside} nor in {here}"
    raise UserError(f"resuming {resume}, a PiSSA/OLoRA run, needs the initial adapter it started "
                    f"from; there is none in {places}. Copy that run's {INITIAL_DIR}/ next to "
                    "the checkpoint, or start again with --overwrite")


def start_run(model: "nn.Module", config: Any, output_dir: str, resume: str | None,
              main: bool) -> "nn.Module":
    """`peftkit train`'s `get_peft_model`. For a PiSSA/OLoRA config the main process saves the
    init in `output_dir/initial_adapter/`, and a resumed run rebuilds its residual base from the
    one next to its checkpoint (`resumed_initial`, copied into `output_dir`).
    The `checkpoint-N/` folders hold the adapter as trained (config `init_lora_weights="pissa"`):
    loading one onto the untouched base re-runs the init, exact for "pissa" and "olora" only."""
    from ..model import get_peft_model

    if not mutates_base(config):
        return get_peft_model(model, config)
    check_convertible(config)  # `finish_run` converts; refuse now rather than after training
    initial = os.path.join(output_dir, INITIAL_DIR)
    if resume:
        found = resumed_initial(resume, output_dir)
        peft_model = get_peft_model_from_initial(model, config, found)
        if main and os.path.abspath(found) != os.path.abspath(initial):
            shutil.copytree(found, initial, dirs_exist_ok=True)  # for `finish_run`
        return peft_model
    peft_model = get_peft_model(model, config)
    if main:
        save_initial(peft_model, initial)
    return peft_model


def finish_run(config: Any, output_dir: str) -> None:
    """After `peftkit train` saved its adapter in `output_dir`: convert a PiSSA/OLoRA one to
    plain LoRA for the untouched base model."""
    if mutates_base(config):
        convert_saved(output_dir, os.path.join(output_dir, INITIAL_DIR))
