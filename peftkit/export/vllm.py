"""A LoRA adapter as a PEFT folder that vLLM loads with the same result as peftkit, and the
`vllm serve` line for it.

vLLM's rules (`vllm/lora/peft_helper.py` PEFTHelper; `vllm/config/lora.py` LoRAConfig):
it reads r, lora_alpha, target_modules, bias, modules_to_save, use_rslora, use_dora from
adapter_config.json and drops every other key, `rank_pattern` and `alpha_pattern` included; it
scales every module by `lora_alpha / r` (rsLoRA: `/ sqrt(r)`) of the config; it refuses
`modules_to_save` and DoRA, and a rank above `--max-lora-rank` (default 16, one of
1, 8, 16, 32, 64, 128, 256, 320, 512). So patterns and rsLoRA are folded here: every module is
zero-padded to the largest rank R (B @ A is unchanged), B is multiplied by
`scaling * R / lora_alpha`, and the config says r=R, use_rslora=false, no patterns.
"""

from __future__ import annotations

import json
import os

import torch

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ..errors import UserError
from .adapter import PREFIX, Adapter

MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORA_RANK = 16


def folded_tensors(adapter: Adapter) -> tuple[dict[str, torch.Tensor], int]:
    """(tensors in PEFT's layout, rank R) with each module's scaling folded for one alpha / R."""
    modules = adapter.modules()
    rank = max(m.rank for m in modules)
    scale = float(adapter.config.lora_alpha) / rank
    tensors = {}
    for m in modules:
        dtype = adapter.tensors[f"{PREFIX}{m.path}.lora_A.weight"].dtype
        a = torch.zeros(rank, m.a.shape[1])
        b = torch.zeros(m.b.shape[0], rank)
        a[:m.rank], b[:, :m.rank] = m.a, m.b * (m.scaling / scale)
        tensors[f"{PREFIX}{m.path}.lora_A.weight"] = a.to(dtype)
        tensors[f"{PREFIX}{m.path}.lora_B.weight"] = b.to(dtype)
    return tensors, rank


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` value vLLM accepts that holds `rank`."""
    fits = [n for n in MAX_LORA_RANKS if n >= rank]
    if not fits:
        raise UserError(f"rank {rank} exceeds vLLM's largest --max-lora-rank "
                        f"({MAX_LORA_RANKS[-1]}); train a smaller rank or merge the adapter")
    return fits[0]


def write(adapter: Adapter, out: str, base_model: str, name: str, served_path: str) -> dict:
    """Write the adapter folder into `out`; returns the serve command, rank and folds."""
    from safetensors.torch import save_file

    config = dict(adapter.raw)
    folds = adapter.folds()
    if folds:
        tensors, rank = folded_tensors(adapter)
        config.update(r=rank, use_rslora=False, rank_pattern={}, alpha_pattern={})
    else:
        tensors, rank = dict(adapter.tensors), int(config["r"])
    config["base_model_name_or_path"] = base_model
    save_file({k: t.contiguous() for k, t in tensors.items()}, os.path.join(out, WEIGHTS_NAME),
              metadata={"format": "pt"})
    with open(os.path.join(out, CONFIG_NAME), "w", encoding="utf-8") as fh:
        fh.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    command = f"vllm serve {base_model} --enable-lora --lora-modules {name}={served_path}"
    needed = max_lora_rank(rank)
    if needed > DEFAULT_MAX_LORA_RANK:
        command += f" --max-lora-rank {needed}"
    return {"command": command, "rank": rank, "folds": folds,
            "over_default_rank": needed > DEFAULT_MAX_LORA_RANK}
