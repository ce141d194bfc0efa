"""peftkit: parameter-efficient fine-tuning in native PyTorch, file-compatible with HF PEFT."""

from .config import PeftConfig, PeftType, TaskType
from .methods.adapter import AdapterConfig
from .methods.lora import LoraConfig
from .methods.prompt import PromptTuningConfig, PromptTuningInit
from .model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "get_peft_model",
]
