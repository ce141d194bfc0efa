"""One module per PEFT method; importing this package registers them all."""

from . import adapter, ia3, lora, prompt, qlora  # noqa: F401
from .base import METHODS, AdapterLayer, Method, ModulesToSaveWrapper

__all__ = ["METHODS", "AdapterLayer", "Method", "ModulesToSaveWrapper"]
