"""Adapter files in PEFT's layout, written atomically and read with safetensors only.

A folder holds `adapter_config.json` and `adapter_model.safetensors` (metadata
`{"format": "pt"}`, keys like `base_model.model.<module path>.lora_A.weight`). Each file is
written to a temporary name in the same folder, flushed to disk and renamed over the old one, so
a crash mid-save leaves the previous file intact. Files get the user's umask (0644 by default),
like every other file of the folder; a leftover temporary (`.<name>.<random>.peftkit-tmp`) is
removed by the next peftkit command that claims the folder (`peftkit.outdir`). Pickled
`adapter_model.bin` files are refused: loading a pickle can run arbitrary code.
"""

from __future__ import annotations

import os
import secrets

import torch
from safetensors.torch import load_file, save_file

from .outdir import TMP_SUFFIX

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    mode = os.fstat(fd).st_mode  # 0666 & ~umask; safetensors writes its files 0600
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, mode)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    _atomic_write(path, write)


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is a DTensor (e.g. a parameter sharded by FSDP2's `fully_shard`)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with each DTensor replaced by the whole tensor (`full_tensor()`, detached).
    Collective: every rank of a DTensor's mesh must call this with the same keys, in order."""
    return {k: v.detach().full_tensor() if is_sharded(v) else v for k, v in tensors.items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Save contiguous CPU copies of `tensors` as safetensors (`{"format": "pt"}`), atomically.
    A DTensor is refused: gather it with `full_tensors` on every rank first."""
    sharded = [k for k, v in tensors.items() if is_sharded(v)]
    if sharded:
        raise ValueError(f"{len(sharded)} tensors are DTensors (sharded), e.g. {sharded[0]}: "
                         "gather them with checkpoint.full_tensors on every rank first")
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(data, tmp, metadata={"format": "pt"}))


def load_tensors(directory: str | os.PathLike, device: str | torch.device = "cpu") -> dict:
    """Read `adapter_model.safetensors` from `directory`; never unpickle."""
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        return load_file(path, device=str(device))
    if os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        raise ValueError(
            f"{directory!s} holds only a pickled adapter_model.bin, which peftkit refuses to load "
            "(unpickling can run code). Re-save it with PEFT's save_pretrained(..., "
            "safe_serialization=True) to get adapter_model.safetensors."
        )
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!s}")
