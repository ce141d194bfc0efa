"""`peftkit train --fsdp`: the model sharded over the torchrun processes with PyTorch FSDP2
(`torch.distributed.fsdp.fully_shard`), trained by the stock Trainer.

Sharding: each decoder layer (the model's `_no_split_modules` classes, or
`--fsdp-transformer-layer-cls-to-wrap`) becomes one FSDP unit, the whole model the root unit
(embeddings, final norm, output head). Every parameter becomes a DTensor sharded on dim 0 over
a 1-D device mesh of all processes (`cuda` with NCCL, else `cpu` with gloo). A unit all-gathers
its weights just before its forward and frees them after it (`--fsdp-reshard-after-forward`,
FULL_SHARD; off: SHARD_GRAD_OP keeps them until backward); gradients of the trainable ones
(the adapter's, or all for `--method full`) are reduce-scattered as averages, so 2 processes at
batch b compute 1 process's step at batch 2b. Frozen units may mix dtypes (a 4-bit base, fp32
norms, fp32 LoRA); the trainable parameters of a unit must share one.

Inside a unit's forward its parameters are plain tensors again, so peftkit's fast paths (the
fused loss, the LoRA autograd function, the lean SwiGLU, the oneDNN frozen linears) run
unchanged; gradient checkpointing recomputes a layer inside its unit's all-gather.

The model is sharded before the Trainer sees it: `ShardedTrainer` tells accelerate to add only
mixed precision (no DDP; transformers' own FSDP branch would import Hugging Face PEFT), and saves
and resumes what FSDP2 holds in shards:
- adapter / model files: gathered with `torch.distributed.checkpoint.state_dict` (for an adapter
  only the trainable tensors), written by rank 0 in the usual layout, so a checkpoint or final
  save loads anywhere, sharded or not;
- optimizer state: gathered the same way to one `optimizer.pt` keyed by parameter names, and
  broadcast from rank 0 to the shards on resume.

QLoRA under FSDP loads the 4-bit base with `bnb_4bit_quant_storage` = the model dtype (PEFT's and
Answer.AI's recipe; `quant.kbit_load_kwargs(sharded=True)`).
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from ..errors import UserError
from .trainer import AdapterTrainer

OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"


def check_options(args: argparse.Namespace, spec, env=os.environ) -> None:
    """Refuse what sharded training cannot do, before anything loads."""
    if args.deepspeed or env.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise UserError("DeepSpeed is not supported by peftkit train: its ZeRO-3 saves of a "
                        "peftkit adapter would be empty. Shard with --fsdp (PyTorch FSDP2) "
                        "under torchrun instead")
    sub = [name for name in ("fsdp_cpu_offload", "fsdp_transformer_layer_cls_to_wrap")
           if getattr(args, name)]
    if args.fsdp_reshard_after_forward is False:
        sub.append("no_fsdp_reshard_after_forward")
    if not args.fsdp:
        if sub:
            raise UserError(f"--{sub[0].replace('_', '-')} applies to --fsdp only")
        return
    if "WORLD_SIZE" not in env:
        raise UserError("--fsdp shards the model over the processes of a torchrun launch: run "
                        "`torchrun --nproc-per-node N -m peftkit.cli train --fsdp ...`")
    if not spec.shardable:
        raise UserError(f"--fsdp does not support --method {spec.name}")
    if args.test_data:
        raise UserError("--test-data generates on rank 0 alone, which a sharded model cannot; "
                        "evaluate the saved adapter with `peftkit eval` after training")
    if args.fsdp_cpu_offload and not torch.cuda.is_available():
        raise UserError("--fsdp-cpu-offload moves shards from GPU memory to CPU memory; without "
                        "a GPU they are in CPU memory already")


def layer_classes(model: nn.Module, names: list[str] | None) -> set[str]:
    """The class names of the modules that become FSDP units: `names`, else the model's
    `_no_split_modules` (its decoder layer)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    found = set(names or getattr(base, "_no_split_modules", None) or ())
    if not found:
        raise UserError(f"{type(base).__name__} names no decoder layer class (_no_split_modules); "
                        "pass --fsdp-transformer-layer-cls-to-wrap")
    return found


def shard(model: nn.Module, *, layers: list[str] | None = None, reshard_after_forward: bool = True,
          cpu_offload: bool = False) -> nn.Module:
    """`fully_shard` every module of `layer_classes(model, layers)` and then `model`, in place,
    over all processes of the default process group; returns `model`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    classes = layer_classes(model, layers)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    units = [m for m in model.modules() if type(m).__name__ in classes]
    if not units:
        raise UserError(f"--fsdp: no module of class {sorted(classes)} in "
                        f"{type(model).__name__}; check --fsdp-transformer-layer-cls-to-wrap")
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward,
                    offload_policy=offload)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward,
                offload_policy=offload)
    if dist.get_rank() == 0:
        print(f"peftkit train: --fsdp: {len(units)} {'/'.join(sorted(classes))} units and the "
              f"root sharded over {dist.get_world_size()} processes ({device}, "
              f"{dist.get_backend()})", flush=True)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict on rank 0's CPU, `{}` on the other ranks; for a peftkit
    `PeftModel` only its trainable tensors (the adapter), else every tensor. Every rank must
    call it (it gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ..model import PeftModel

    options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                               ignore_frozen_params=isinstance(model, PeftModel))
    return get_model_state_dict(model, options=options)


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy full tensors (every rank holds `state`) into the shards of `model`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                strict=False))


class ShardedTrainer(AdapterTrainer):
    """`AdapterTrainer` for a model sharded by `shard` (module docstring)."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        stock = self.accelerator.prepare_model

        # The model owns placement and gradient reduction: accelerate adds autocast only.
        def prepare_model(model, device_placement=None, evaluation_mode=False):
            return stock(model, device_placement=False, evaluation_mode=True)

        self.accelerator.prepare_model = prepare_model

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        state = full_state_dict(self.model)
        if self.args.should_save:
            self._save(output_dir, state_dict=state)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        if checkpoint is None:
            return
        state = (torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), weights_only=True)
                 if self.args.process_index == 0 else {})
        set_optimizer_state_dict(self.model, self.optimizer, state, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))
        self.lr_scheduler.load_state_dict(
            torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """An adapter loads through `PeftModel.load_adapter` (which fills shards); a whole
        model's files are read by every rank and copied into its shards."""
        from ..model import PeftModel

        model = model if model is not None else self.model
        if isinstance(model, PeftModel):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_full_state_dict(model, _read_model_files(resume_from_checkpoint))


def _read_model_files(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers `save_pretrained` folder (one file or an index of them)."""
    import json

    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return load_file(os.path.join(folder, "model.safetensors"))
    with open(index, encoding="utf-8") as fh:
        files = sorted(set(json.load(fh)["weight_map"].values()))
    return {k: v for name in files for k, v in load_file(os.path.join(folder, name)).items()}
