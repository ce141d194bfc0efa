"""The Trainer's `checkpoint-N` folders: which of them finished saving.

`trainer_state.json` is the last file a checkpoint gets, so a folder without a readable one is a
save cut short (a stopped or killed run): `--resume` and the ui's Try tab skip it.
"""

from __future__ import annotations

import json
import os
import re


def checkpoint_folders(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders in `output_dir` (paths), lowest step first; [] without it."""
    if not os.path.isdir(output_dir):
        return []
    steps = sorted(int(m.group(1)) for name in os.listdir(output_dir)
                   if (m := re.fullmatch(r"checkpoint-(\d+)", name)))
    return [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The highest-step `checkpoint-N` folder whose save finished, or None."""
    return next((f for f in reversed(checkpoint_folders(output_dir)) if is_complete(f)), None)


def is_complete(folder: str) -> bool:
    """True when the checkpoint's last file, `trainer_state.json`, was written in full."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as fh:
            json.load(fh)
    except (OSError, ValueError):
        return False
    return True
