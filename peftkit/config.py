"""Configuration base shared by every method, and `adapter_config.json` I/O.

A config is a dataclass that validates itself on construction (the error names the bad field)
and round-trips through PEFT's JSON layout: sorted keys, enums as their string values,
`inference_mode` written as true. Reading accepts files written by Hugging Face PEFT and fails
closed: a PEFT field peftkit does not implement is ignored only while it holds PEFT's default (each
config class lists those fields and defaults in `UNSUPPORTED_DEFAULTS`, so no `peft` install is
needed), and a key unknown to both is ignored only while it is None, false or empty. Anything else
is refused with the keys named, so an adapter is never loaded with different semantics.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from typing import Any, ClassVar

from .checkpoint import CONFIG_NAME, atomic_write_text


class TaskType(str, enum.Enum):
    """The task heads PEFT knows; stored in `adapter_config.json` as the member's name."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(str, enum.Enum):
    """Method names as written in `adapter_config.json` (`BOTTLENECK` is peftkit's own)."""

    LORA = "LORA"
    PROMPT_TUNING = "PROMPT_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    IA3 = "IA3"
    BOTTLENECK = "BOTTLENECK"


_CONFIGS: dict[str, type["PeftConfig"]] = {}


def register_config(cls: type["PeftConfig"]) -> type["PeftConfig"]:
    """Make `PeftConfig.from_dict` able to build `cls` from its `peft_type` (`methods.registry`
    calls it for each method's config class)."""
    _CONFIGS[cls.PEFT_TYPE.value] = cls
    return cls


@dataclasses.dataclass
class PeftConfig:
    """Fields every method shares. Subclasses set `PEFT_TYPE` and extend `validate`."""

    PEFT_TYPE: ClassVar[PeftType]
    # Every field of the matching peft config class that this class does not implement, with
    # peft's default as written in adapter_config.json (tests check it against the real peft).
    UNSUPPORTED_DEFAULTS: ClassVar[dict[str, Any]] = {}
    # Keys PEFT writes as provenance only; they never change what an adapter computes.
    METADATA_KEYS: ClassVar[frozenset[str]] = frozenset({"auto_mapping", "peft_version"})

    task_type: TaskType | str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.task_type, str) and not isinstance(self.task_type, TaskType):
            try:
                self.task_type = TaskType(self.task_type)
            except ValueError:
                raise ValueError(
                    f"task_type={self.task_type!r} is not known; use one of "
                    f"{[t.value for t in TaskType]} or None"
                ) from None
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

    @property
    def peft_type(self) -> PeftType:
        return self.PEFT_TYPE

    @property
    def is_prompt_learning(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            out[f.name] = value
        out["peft_type"] = self.PEFT_TYPE.value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PeftConfig":
        """Build the config class named by `data["peft_type"]` (or `cls` when it is concrete)."""
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        if cls is PeftConfig:
            if peft_type not in _CONFIGS:
                raise ValueError(
                    f"adapter_config.json has peft_type={peft_type!r}; peftkit reads "
                    f"{sorted(_CONFIGS)}: load this adapter with Hugging Face PEFT"
                )
            cls = _CONFIGS[peft_type]
        elif peft_type is not None and peft_type != cls.PEFT_TYPE.value:
            raise ValueError(f"expected peft_type {cls.PEFT_TYPE.value!r}, got {peft_type!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in cls.METADATA_KEYS:
            data.pop(key, None)
        refused, ignored = [], []
        for key in sorted(set(data) - names):
            value = data.pop(key)
            if key in cls.UNSUPPORTED_DEFAULTS:
                if not _same(value, cls.UNSUPPORTED_DEFAULTS[key]):
                    refused.append(f"{key}={value!r} (PEFT's default: "
                                   f"{cls.UNSUPPORTED_DEFAULTS[key]!r})")
            elif any(_same(value, off) for off in (None, False, {}, [])):
                ignored.append(key)
            else:
                refused.append(f"{key}={value!r} (a key peftkit does not know)")
        if refused:
            raise NotImplementedError(
                f"this {cls.PEFT_TYPE.value} adapter sets {', '.join(refused)}, which peftkit does "
                "not implement; loading it anyway would compute something else. Load it with "
                "Hugging Face PEFT (peft.PeftModel.from_pretrained), or merge it into the base "
                "model with PEFT first (merge_and_unload) and use the merged model"
            )
        if ignored:
            warnings.warn(f"ignoring {cls.__name__} keys peftkit does not know, each None, false "
                          f"or empty: {ignored}", stacklevel=2)
        return cls(**data)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write `adapter_config.json` atomically, as sorted-key JSON with inference_mode true."""
        data = self.to_dict()
        data["inference_mode"] = True
        os.makedirs(directory, exist_ok=True)
        text = json.dumps(data, indent=2, sort_keys=True) + "\n"
        atomic_write_text(os.path.join(directory, CONFIG_NAME), text)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PeftConfig":
        path = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no {CONFIG_NAME} in {directory!s}: pass the folder that save_pretrained wrote"
            )
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON: {err}") from None
        return cls.from_dict(data)


def _same(value: Any, default: Any) -> bool:
    """Equal as JSON values: 0 is not false, 1 is not true, 16.0 is not 16."""
    return json.dumps(value, sort_keys=True, default=repr) == json.dumps(
        default, sort_keys=True, default=repr)


def check(condition: bool, field: str, message: str) -> None:
    """Validation helper: raise `ValueError('<field>: <message>')` unless `condition`."""
    if not condition:
        raise ValueError(f"{field}: {message}")
