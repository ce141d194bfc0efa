"""peftkit: parameter-efficient fine-tuning in native PyTorch, file-compatible with HF PEFT."""

from .config import PeftConfig, PeftType, TaskType
from .loraplus import create_loraplus_optimizer
from .methods.bottleneck import AdapterConfig
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.prompt import PromptTuningConfig, PromptTuningInit
from .model import PeftModel, get_peft_model
from .prepare import prepare_model_for_kbit_training

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig",
    "IA3Config",
    "LoraConfig",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "create_loraplus_optimizer",
    "get_peft_model",
    "prepare_model_for_kbit_training",
]
