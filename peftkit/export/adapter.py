"""A saved adapter as the exporters see it: its config, its LoRA pairs with their scalings, its
full tensors, and what each serving target cannot take.

On disk a LoRA module `<path>` is `base_model.model.<path>.lora_A.weight` (r, in_features) and
`...lora_B.weight` (out_features, r); it adds `scaling * B @ A` to the module's weight, with
`scaling = alpha / r` (rsLoRA: `alpha / sqrt(r)`) and r, alpha per module after `rank_pattern` /
`alpha_pattern` (`LoraConfig.scaling_for`). Any other tensor (`modules_to_save` copies, biases)
replaces the base tensor of the same name.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..checkpoint import CONFIG_NAME, load_tensors
from ..errors import UserError

PREFIX = "base_model.model."
MERGE_WAY_OUT = ("`peftkit merge --adapter {dir} --output-dir MERGED` and serve MERGED as a plain "
                 "model")


@dataclasses.dataclass
class LoraModule:
    """One adapted linear layer: `delta() = scaling * B @ A` in (out_features, in_features)."""

    path: str  # e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor  # (r, in_features), fp32
    b: torch.Tensor  # (out_features, r), fp32
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        return (self.b @ self.a) * self.scaling


@dataclasses.dataclass
class Adapter:
    directory: str
    raw: dict  # adapter_config.json as written
    tensors: dict[str, torch.Tensor]

    @classmethod
    def load(cls, directory: str) -> "Adapter":
        from ..train.inputs import adapter_config

        adapter_config(directory)  # the folder, the config and the weights file, checked
        with open(os.path.join(directory, CONFIG_NAME), encoding="utf-8") as fh:
            raw = json.load(fh)
        return cls(directory, raw, load_tensors(directory))

    @property
    def method(self) -> str:
        return str(self.raw.get("peft_type"))

    @property
    def config(self):
        """The `LoraConfig` (call only when `blockers` found no DoRA and the method is LoRA)."""
        from ..methods.lora import LoraConfig

        return LoraConfig.from_dict(self.raw)

    def modules(self) -> list[LoraModule]:
        """The LoRA pairs, in file order, each with its own scaling."""
        config = self.config
        out = []
        for key in self.tensors:
            if key.endswith(".lora_A.weight"):
                path = key[len(PREFIX):-len(".lora_A.weight")]
                b = self.tensors.get(f"{PREFIX}{path}.lora_B.weight")
                if b is None:
                    raise UserError(f"{self.directory}: {key} has no lora_B partner; the file is "
                                    "incomplete, save the adapter again")
                out.append(LoraModule(path, self.tensors[key].float(), b.float(),
                                      config.scaling_for(path)[2]))
        return out

    def full_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors that replace base tensors, by the base model's name (`lm_head.weight`, ...)."""
        return {key[len(PREFIX):].replace(".base_layer.", "."): t
                for key, t in self.tensors.items()
                if ".lora_A." not in key and ".lora_B." not in key}

    def folds(self) -> list[str]:
        """What a single-alpha consumer would get wrong unless export folds it into the tensors."""
        raw = self.raw
        return [name for name, on in (("rsLoRA", raw.get("use_rslora")),
                                      ("rank_pattern", raw.get("rank_pattern")),
                                      ("alpha_pattern", raw.get("alpha_pattern"))) if on]


def blockers(adapter: Adapter, target: str) -> list[str]:
    """Why `adapter` cannot go to `target` ("gguf-lora", "gguf", "vllm"), each with the way out;
    empty when it can (possibly after the folds export makes)."""
    method, raw, d = adapter.method, adapter.raw, adapter.directory
    merge = MERGE_WAY_OUT.format(dir=d)
    if method in ("PROMPT_TUNING", "PREFIX_TUNING", "BOTTLENECK"):
        return [f"a {method} adapter adds computation (virtual tokens or adapter layers) that "
                "llama.cpp and vLLM do not have, and it cannot be merged into the weights; serve "
                "it with peftkit (`peftkit generate --adapter`) or Hugging Face PEFT"]
    if method != "LORA":
        return [f"llama.cpp's and vLLM's adapters are LoRA only, and export merges LoRA only; for "
                f"this {method} adapter run {merge}, or convert MERGED with llama.cpp's "
                "convert_hf_to_gguf.py"]
    if raw.get("use_dora"):
        return ["DoRA's magnitude vector is read by neither llama.cpp nor vLLM (vLLM: 'does not "
                f"yet support DoRA'); run {merge} (DoRA merges exactly), or convert MERGED with "
                "llama.cpp's convert_hf_to_gguf.py"]
    found = []
    full = sorted(adapter.full_tensors())
    if target == "gguf-lora" and full:
        found.append(f"llama.cpp's LoRA GGUF holds LoRA pairs only, and this adapter also "
                     f"replaces {', '.join(full)} (modules_to_save / bias); export the merged "
                     f"model instead: --format gguf")
    if target == "vllm":
        if raw.get("modules_to_save"):
            found.append(f"vLLM accepts modules_to_save=None only, and this adapter saves "
                         f"{raw['modules_to_save']}; run {merge}")
        if raw.get("bias", "none") != "none":
            found.append(f"vLLM loads LoRA pairs without biases, and this adapter trains "
                         f"bias={raw['bias']!r}; run {merge}")
    return found


def serving_targets(adapter: Adapter) -> list[tuple[str, str]]:
    """(target, verdict) for each export format: whether the engine takes the adapter as it is
    (its own converter / loader gets it right), only through `peftkit export`, or not at all."""
    from .vllm import DEFAULT_MAX_LORA_RANK

    out = []
    for target in ("gguf-lora", "gguf", "vllm"):
        found = blockers(adapter, target)
        if found:
            out.append((target, "no: " + " | ".join(found)))
            continue
        export = f"`peftkit export --format {target}`"
        folds = adapter.folds()
        if target == "vllm":
            folds = [f for f in folds if f != "rsLoRA"]  # vLLM applies use_rslora itself
        if target == "gguf":
            verdict = f"through {export} (the merged model, from the base model's GGUF)"
        elif folds:
            engine = "llama.cpp's converter" if target == "gguf-lora" else "vLLM"
            verdict = (f"only through {export}: {engine} keeps one alpha / r for all modules "
                       f"and would get {', '.join(folds)} wrong")
        else:
            verdict = f"as it is (or through {export})"
        if target == "vllm" and int(adapter.raw.get("r", 0)) > DEFAULT_MAX_LORA_RANK:
            verdict += f"; rank {adapter.raw['r']} needs vllm serve --max-lora-rank"
        out.append((target, verdict))
    return out
