"""transformers' stock `Trainer` (and its subclasses: TRL's `SFTTrainer`, peftkit's own) treats a
peftkit `PeftModel` exactly as it treats a Hugging Face PEFT model.

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
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

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
    """Finds nothing itself; when `transformers.trainer` is being imported, it lets the other finders
    find it and runs `_patch` right after the module's code has run. Removes itself on first use."""

    def find_spec(self, name, path, target=None):
        if name != TRAINER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _patch(trainer_module) -> None:
    if getattr(trainer_module, _PATCHED, False):
        return
    from transformers import trainer_utils

    from .model import PeftModel

    stock_is_peft = trainer_utils._is_peft_model

    def _is_peft_model(model) -> bool:
        return isinstance(model, PeftModel) or stock_is_peft(model)

    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.") and getattr(module, "_is_peft_model", None) is stock_is_peft:
            module._is_peft_model = _is_peft_model

    trainer_cls = trainer_module.Trainer
    stock_save = trainer_cls._save

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, PeftModel):
            return stock_save(self, output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        model.save_pretrained(output_dir, state_dict=state_dict,
                              is_main_process=self.args.should_save)
        if not self.args.should_save:
            return
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        import torch

        torch.save(self.args, os.path.join(output_dir, trainer_module.TRAINING_ARGS_NAME))

    _save.__doc__ = stock_save.__doc__
    trainer_cls._save = _save
    setattr(trainer_module, _PATCHED, True)
