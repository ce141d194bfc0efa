"""transformers' stock `Trainer` (and its subclasses: TRL's `SFTTrainer`, peftkit's own) checkpoints,
resumes and reloads a peftkit `PeftModel` as it does a Hugging Face PEFT model.

transformers recognises PEFT models with `isinstance(model, peft.PeftModel)` in `_is_peft_model`,
and `Trainer._save` writes anything that is neither that nor a `PreTrainedModel` as one raw
`state_dict`: the whole base model in every checkpoint, and a crash on tied embeddings. So when
`transformers.trainer` is imported (before or after peftkit), two of its functions are wrapped:

- `_is_peft_model(model)` is also true for a peftkit `PeftModel`. Resume, `load_best_model_at_end`,
  label smoothing's label shift, the dataset-column filter and NEFTune then take PEFT's branches,
  which call what both libraries share: `load_adapter`, `active_adapters`, `get_base_model`,
  `base_model.model`.
- `Trainer._save` saves a peftkit model (after unwrapping DDP/accelerate) with `save_pretrained`
  (the adapter alone, in PEFT's layout; a `state_dict` handed in by a sharding engine is honoured),
  then the processing class and the training arguments, as the stock method does.

For any other model both call the original functions, so transformers' behaviour is unchanged.
accelerate's own `is_peft_model` (which TRL reads too) is not wrapped, and the Trainer's FSDP and
DeepSpeed branches for PEFT models import `peft` itself: those branches do not work for peftkit
models. Sharded training shards the model before the Trainer sees it (`peftkit.train.fsdp`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import warnings

TRAINER_MODULE = "transformers.trainer"
_PATCHED = "_peftkit_patched"


def install() -> None:
    """Patch `transformers.trainer` now if it is imported, else as soon as it is."""
    module = sys.modules.get(TRAINER_MODULE)
    if module is not None:
        _patch(module)
    elif not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Finds `transformers.trainer` where the path finder does, with a loader that runs `_patch`
    right after the module's code. Stays in `sys.meta_path` until then, so a mere
    `importlib.util.find_spec` does not use it up."""

    def find_spec(self, name, path, target=None):
        if name != TRAINER_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _PatchingLoader(spec.loader)
        return spec


class _PatchingLoader(importlib.abc.Loader):
    """Wraps the module's own loader; everything but `exec_module` is the wrapped loader's."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PatchOnImport)]
        _patch(module)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _patch(trainer_module) -> None:
    if getattr(trainer_module, _PATCHED, False):
        return
    from transformers import trainer_utils

    from . import checkpoint
    from .model import PeftModel

    # transformers < 4.58 defines it in trainer.py itself.
    stock_is_peft = (getattr(trainer_utils, "_is_peft_model", None)
                     or getattr(trainer_module, "_is_peft_model", None))
    stock_save = getattr(getattr(trainer_module, "Trainer", None), "_save", None)
    if stock_is_peft is None or stock_save is None:
        warnings.warn("this transformers version's Trainer does not have the functions peftkit "
                      "teaches about peftkit models (_is_peft_model, Trainer._save): its "
                      "checkpoints of a peftkit model would hold the whole model; save with "
                      "model.save_pretrained instead", stacklevel=2)
        return

    def _is_peft_model(model) -> bool:
        return isinstance(model, PeftModel) or stock_is_peft(model)

    for name, module in list(sys.modules.items()):
        if name.startswith("transformers") and getattr(module, "_is_peft_model", None) is stock_is_peft:
            module._is_peft_model = _is_peft_model

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return stock_save(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is None and any(map(checkpoint.is_sharded, model.parameters())):
            # the stock Trainer saves from rank 0 alone: a gather there would wait forever
            raise RuntimeError("this PeftModel is sharded (FSDP2 `fully_shard` by hand), and the "
                               "Trainer saves it from one rank, which cannot gather the shards; "
                               "train with `peftkit train --fsdp`, or save with "
                               "model.save_pretrained(...) called on every rank")
        model.save_pretrained(output_dir, state_dict=state_dict,
                              is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        tokenizer = self.processing_class
        if tokenizer is None:
            tokenizer = getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, trainer_module.TRAINING_ARGS_NAME))

    _save.__doc__ = stock_save.__doc__
    trainer_module.Trainer._save = _save
    setattr(trainer_module, _PATCHED, True)
