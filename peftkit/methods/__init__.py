"""One module per PEFT method; importing this package registers them all."""

from . import bottleneck, ia3, lora, prompt, qlora  # noqa: F401
from .base import METHODS, TunerLayer, Method, ModulesToSaveWrapper

__all__ = ["METHODS", "TunerLayer", "Method", "ModulesToSaveWrapper"]
