"""transformers' `Trainer`, taught to checkpoint a `PeftModel` as an adapter in PEFT's layout.

A `PeftModel` is not a `PreTrainedModel`, so the stock `Trainer` would save its whole state dict.
`AdapterTrainer` saves (and on `--resume` loads) only the adapter tensors; everything else a
checkpoint holds (optimizer, scheduler, RNG states, `trainer_state.json`) is the stock Trainer's.
`trainer_state.json` is the last file a checkpoint gets, so a checkpoint folder without a readable
one is an interrupted save and `last_complete_checkpoint` skips it.
"""

from __future__ import annotations

import json
import os
import re

from transformers import Trainer

from ..model import PeftModel


class AdapterTrainer(Trainer):
    def _peft_model(self) -> PeftModel | None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        return model if isinstance(model, PeftModel) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        peft_model = self._peft_model()
        if peft_model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        peft_model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        peft_model = self._peft_model()
        if peft_model is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        peft_model._load_weights(peft_model.active_adapter, resume_from_checkpoint)


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step `checkpoint-N` folder whose save finished, or None."""
    if not os.path.isdir(output_dir):
        return None
    steps = sorted((int(m.group(1)) for name in os.listdir(output_dir)
                    if (m := re.fullmatch(r"checkpoint-(\d+)", name))), reverse=True)
    folders = (os.path.join(output_dir, f"checkpoint-{step}") for step in steps)
    return next((folder for folder in folders if is_complete(folder)), None)


def is_complete(folder: str) -> bool:
    """True when the checkpoint's last file, `trainer_state.json`, was written in full."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError):
        return False
    return True
