"""peftkit: parameter-efficient fine-tuning in native PyTorch, file-compatible with HF PEFT."""

from .config import PeftConfig, PeftType, TaskType
from .methods.lora import LoraConfig
from .model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "TaskType",
    "get_peft_model",
]
