"""`--method` dispatch: one table entry per training method.

An entry names the flags that apply to the method (argparse options, each with its default) and
builds the method's config from the parsed options (`None` = train every weight). A flag set for
a method it does not apply to is an error. `model_kwargs` and `prepare` let a method change how
the base model is loaded (e.g. 4-bit) and prepared before its adapters are injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..config import PeftConfig, TaskType
from ..methods.bottleneck import AdapterConfig
from ..methods.lora import LoraConfig
from ..methods.prompt import PromptTuningConfig
from .ranges import fraction, positive_float, positive_int


def csv_list(text: str) -> list[str] | str:
    """`q_proj,v_proj` -> a list; `all-linear` stays a string (PEFT's keyword)."""
    return text if text == "all-linear" else [t.strip() for t in text.split(",") if t.strip()]


LORA_FLAGS: dict[str, dict[str, Any]] = {
    "r": dict(type=positive_int, default=8, help="LoRA rank"),
    "lora_alpha": dict(type=positive_float, default=16.0, help="LoRA alpha (scaling = alpha / r)"),
    "lora_dropout": dict(type=fraction, default=0.05, help="dropout on the LoRA branch"),
    "target_modules": dict(type=csv_list, default=None,
                           help="comma-separated module names, or all-linear (default: the "
                                "model type's PEFT default, q_proj,v_proj for Llama)"),
    "use_rslora": dict(action="store_true", default=False, help="rsLoRA scaling alpha/sqrt(r)"),
}


QLORA_FLAGS: dict[str, dict[str, Any]] = {
    **LORA_FLAGS,
    "quant_type": dict(default="nf4", choices=["nf4", "fp4"],
                       help="4-bit data type of the frozen base (double-quantized, blocks of 64)"),
}

ADAPTER_FLAGS: dict[str, dict[str, Any]] = {
    "variant": dict(default="houlsby", choices=["houlsby", "pfeiffer"],
                    help="houlsby: after attention and MLP; pfeiffer: after the MLP only"),
    "reduction_factor": dict(type=positive_float, default=16.0,
                             help="bottleneck size = hidden size / reduction factor"),
    "non_linearity": dict(default="relu", choices=["relu", "gelu", "silu"],
                          help="activation inside the bottleneck"),
}

PROMPT_FLAGS: dict[str, dict[str, Any]] = {
    "num_virtual_tokens": dict(type=positive_int, default=20, help="soft prompt length"),
    "prompt_tuning_init": dict(default="RANDOM", choices=["RANDOM", "TEXT", "SAMPLE_VOCAB"],
                               help="how the soft prompt starts"),
    "prompt_tuning_init_text": dict(default=None, help="text whose embeddings start the prompt "
                                                       "(with --prompt-tuning-init TEXT)"),
}


def _config(cls: type[PeftConfig]):
    """Build `cls` from the options that are its fields (`tokenizer_name_or_path` included: the
    run adds the model's, which prompt tuning's TEXT init reads)."""
    def build(opts: dict[str, Any]) -> PeftConfig:
        fields = cls.__dataclass_fields__
        return cls(task_type=TaskType.CAUSAL_LM, **{k: v for k, v in opts.items() if k in fields})
    return build


def qlora_model_kwargs(opts: dict[str, Any]) -> dict[str, Any]:
    """Load the base in 4-bit on this process's device (`quant.kbit_device_map`: LOCAL_RANK's
    GPU under torchrun): bf16 compute on CUDA; fp32 on CPU, where bf16 matmuls are emulated
    (10x slower) on processors without AVX512-BF16."""
    from ..quant import bnb_config, kbit_device_map

    cuda = torch.cuda.is_available()
    compute = torch.bfloat16 if cuda else torch.float32
    return {"quantization_config": bnb_config(opts["quant_type"], compute_dtype=compute),
            "device_map": kbit_device_map(cuda=cuda)}


def _prepare_kbit(model):
    from ..prepare import prepare_model_for_kbit_training

    # Gradient checkpointing follows --gradient-checkpointing, like every other method.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@dataclass(frozen=True)
class MethodSpec:
    flags: dict[str, dict[str, Any]]
    config: Callable[[dict[str, Any]], PeftConfig | None]
    model_kwargs: Callable[[dict[str, Any]], dict[str, Any]] = field(default=lambda opts: {})
    prepare: Callable[[Any], Any] | None = None  # base model -> base model, before injection


METHODS: dict[str, MethodSpec] = {
    "full": MethodSpec(flags={}, config=lambda opts: None),
    "lora": MethodSpec(flags=LORA_FLAGS, config=_config(LoraConfig)),
    "qlora": MethodSpec(flags=QLORA_FLAGS, config=_config(LoraConfig),
                        model_kwargs=qlora_model_kwargs, prepare=_prepare_kbit),
    "adapter": MethodSpec(flags=ADAPTER_FLAGS, config=_config(AdapterConfig)),
    "prompt": MethodSpec(flags=PROMPT_FLAGS, config=_config(PromptTuningConfig)),
}


def all_flags() -> dict[str, dict[str, Any]]:
    """Every method flag once (methods may share flags, e.g. LoRA's for QLoRA)."""
    out: dict[str, dict[str, Any]] = {}
    for spec in METHODS.values():
        out.update(spec.flags)
    return out


def resolve(method: str, opts: dict[str, Any]) -> tuple[MethodSpec, dict[str, Any]]:
    """The method's spec and its options with defaults filled in. `opts` holds every method flag,
    `None` where the user did not set it."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    for name, value in opts.items():
        if value is not None and name not in spec.flags:
            users = [m for m, s in METHODS.items() if name in s.flags]
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --method {method} "
                             f"(it applies to: {', '.join(users)})")
    filled = {k: (opts.get(k) if opts.get(k) is not None else f["default"])
              for k, f in spec.flags.items()}
    return spec, filled
