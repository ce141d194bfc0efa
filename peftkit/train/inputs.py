"""Checks of the files a command reads, run before any model loads, so that a bad input costs
seconds, not a training run. Each raises `UserError` naming the file (and line), what is wrong
and what to do."""

from __future__ import annotations

import json
import os
import re
import zipfile

from .. import models
from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME
from ..config import PeftConfig
from ..errors import UserError

# A Hugging Face Hub repo id: `name` or `org/name`.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def read_text(path: str, what: str) -> str:
    """The UTF-8 text of file `path` (`what` names it in messages), without a leading BOM."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; {what} takes a file")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read {what} ({err.strerror})") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - data.rfind(b"\n", 0, err.start)
        raise UserError(f"{path}:{line}: byte 0x{data[err.start]:02x} at column {column} is not "
                        "UTF-8; save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def check_model(name: str | None) -> None:
    """`--model` must be a model folder or a hub id (`None` is the embedded default)."""
    if name is None or name == models.DEFAULT_MODEL:
        return
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise UserError(f"{name}: not a model folder (no config.json); pass a folder that "
                            "save_pretrained or `peftkit merge` wrote, or a hub id (org/name)")
    elif os.path.exists(name):
        raise UserError(f"{name}: is a file; --model takes a model folder or a hub id")
    elif not _HUB_ID.fullmatch(name):
        raise UserError(f"{name}: no such model folder, and not a hub id (org/name)")


def check_output_path(path: str) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--output-dir {path} is an existing file; pass a folder (new or empty)")


def check_safetensors(path: str) -> None:
    """A complete safetensors file: its header parses and its tensors fill the file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt"):
            pass
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a complete safetensors file ({err}); it was likely cut "
                        "short by an interrupted save or copy: save or copy it again") from None


def adapter_config(folder: str) -> PeftConfig:
    """The config of the adapter saved in `folder`, after checking its two files."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such adapter folder; --adapter takes the folder that "
                        "`peftkit train` or save_pretrained wrote")
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no {CONFIG_NAME}; --adapter takes the folder that "
                        "`peftkit train` or save_pretrained wrote")
    try:
        data = json.loads(read_text(path, "the adapter config"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg}); save the adapter "
                        "again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of config fields, got a "
                        f"{type(data).__name__}; save the adapter again")
    try:
        config = PeftConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise UserError(f"{path}: {err}") from None
    weights = os.path.join(folder, WEIGHTS_NAME)
    if os.path.isfile(weights):
        check_safetensors(weights)
    elif os.path.isfile(os.path.join(folder, "adapter_model.bin")):
        raise UserError(f"{folder}: holds only a pickled adapter_model.bin, which peftkit does "
                        "not load (unpickling can run code); re-save it with PEFT's "
                        "save_pretrained(..., safe_serialization=True)")
    else:
        raise UserError(f"{folder}: no {WEIGHTS_NAME} next to {CONFIG_NAME}")
    return config


def check_checkpoint(folder: str) -> None:
    """Every tensor file of a `checkpoint-N` folder is whole (`--resume` loads them mid-run)."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            check_safetensors(path)
        elif name.endswith((".pt", ".pth")) and not zipfile.is_zipfile(path):
            raise UserError(f"{path}: truncated or not a PyTorch file, so {folder} cannot be "
                            "resumed; pass an earlier checkpoint (--resume CHECKPOINT) or start "
                            "over (--overwrite)")
