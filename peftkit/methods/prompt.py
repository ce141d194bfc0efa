"""Prompt tuning: Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning"
(arXiv:2104.08691).

A frozen model gets n trainable virtual-token embeddings P: (n, d), prepended to its input
embeddings. With B the batch, T the input length:

    input_ids (B, T) -> input embeddings E (B, T, d)
    inputs_embeds   [P expanded to (B, n, d) ; E]        (B, n + T, d)
    attention_mask  [ones (B, n) ; attention_mask]       (B, n + T)
    labels          [-100 (B, n) ; labels]               (B, n + T)   token-level labels only
    position_ids    [0 .. n-1 ; position_ids + n]        (B, n + T)   when given
    token_type_ids  [zeros (B, n) ; token_type_ids]      (B, n + T)   when given

The model returns outputs for all n + T positions, as PEFT does. The rewrite is a forward pre-hook
on the wrapped model, so `generate` needs nothing special: the prompt enters on the step that
starts from an empty KV cache (every step when `use_cache=False`); a step that continues a cache
only shifts its attention mask and positions by n, since the prompt's keys and values are
already in the cache.

The backbone (`model.base_model`, e.g. `LlamaModel`) is hooked too, for callers that run it
alone, as TRL's fused LM-head loss does: such a call gets the same prompt, and its
`last_hidden_state` comes back for the T real positions, (B, T, d), so it lines up with the
caller's unpadded labels. Inside a call of the whole model the backbone hooks stand aside.

Init (`prompt_tuning_init`): RANDOM draws P ~ N(0, 1) (nn.Embedding's default); TEXT uses the
input embeddings of `prompt_tuning_init_text` tokenized with `tokenizer_name_or_path`, repeated
or cut to n tokens; SAMPLE_VOCAB uses the embeddings of n vocabulary tokens drawn uniformly.
Files are PEFT's: one tensor `prompt_embeddings` (n, d) and PEFT's config keys.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
from typing import Any

import torch
from torch import nn

from ..config import PeftConfig, PeftType, TaskType, check
from ..train.ranges import positive_int
from .base import Injector, TunerLayer
from .modules_to_save import ModulesToSaveWrapper, add_modules_to_save
from .spec import MethodSpec

ATTRIBUTE = "prompt_encoder"  # where the prompt layer sits on the wrapped model


class PromptTuningInit(str, enum.Enum):
    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


@dataclasses.dataclass
class PromptTuningConfig(PeftConfig):
    """Prompt tuning with Hugging Face PEFT's keys and defaults.

    `token_dim`, `num_layers`, `num_attention_heads` and `num_transformer_submodules` describe the
    base model and are filled in from it when left None. `modules_to_save` (e.g. the new head of a
    SEQ_CLS model, added automatically) are trained in full and saved with the prompt.
    """

    PEFT_TYPE = PeftType.PROMPT_TUNING

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None
    modules_to_save: list[str] | None = None

    @property
    def is_prompt_learning(self) -> bool:
        return True

    def validate(self) -> None:
        check(_is_pos_int(self.num_virtual_tokens), "num_virtual_tokens",
              f"must be a positive integer, got {self.num_virtual_tokens!r}")
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            check(value is None or _is_pos_int(value), name,
                  f"must be a positive integer or None, got {value!r}")
        check(self.num_transformer_submodules in (None, 1), "num_transformer_submodules",
              f"peftkit prompt-tunes decoder-only and encoder-only models (1 submodule), got "
              f"{self.num_transformer_submodules!r}; load this adapter with Hugging Face PEFT")
        check(self.task_type != TaskType.SEQ_2_SEQ_LM, "task_type",
              "peftkit does not prompt-tune encoder-decoder models (SEQ_2_SEQ_LM); load this "
              "adapter with Hugging Face PEFT")
        try:
            self.prompt_tuning_init = PromptTuningInit(self.prompt_tuning_init)
        except ValueError:
            raise ValueError(
                f"prompt_tuning_init: must be one of {[i.value for i in PromptTuningInit]}, got "
                f"{self.prompt_tuning_init!r}"
            ) from None
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text:
            check(bool(self.prompt_tuning_init_text), "prompt_tuning_init_text",
                  "prompt_tuning_init='TEXT' needs the text to initialise the prompt from")
            check(bool(self.tokenizer_name_or_path), "tokenizer_name_or_path",
                  "prompt_tuning_init='TEXT' needs a tokenizer (name or folder) for the text")
        check(text or not self.tokenizer_kwargs, "tokenizer_kwargs",
              "only used with prompt_tuning_init='TEXT'")
        save = self.modules_to_save
        check(save is None or isinstance(save, list) and all(isinstance(m, str) for m in save),
              "modules_to_save", f"expected a list of module names, got {save!r}")


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


class PromptEncoder(TunerLayer):
    """The named soft prompts of a model, and the hooks that prepend the active one.

    `embedding[name].weight`: (n, d). It is saved under PEFT's global key `prompt_embeddings`.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embedding = nn.ModuleDict()
        self._input_embeddings = [model.get_input_embeddings()]  # a list: not a submodule
        self._in_model = False  # inside a call of the whole model
        self._strip = 0  # virtual positions to cut from the running backbone call's output
        backbone = getattr(model, "base_model", model)
        self._model_args = list(inspect.signature(model.forward).parameters)
        self._backbone_args = list(inspect.signature(backbone.forward).parameters)
        self._handles = [model.register_forward_pre_hook(self._model_pre, with_kwargs=True),
                         model.register_forward_hook(self._model_post, always_call=True)]
        if backbone is not model:
            self._handles += [
                backbone.register_forward_pre_hook(self._backbone_pre, with_kwargs=True),
                backbone.register_forward_hook(self._backbone_post, always_call=True),
            ]

    def add(self, name: str, weight: torch.Tensor) -> None:
        self.embedding[name] = nn.Embedding(*weight.shape, _weight=weight, _freeze=False)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.embedding)

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        return {"prompt_embeddings": self.embedding[name].weight}

    def file_key(self, path: str, key: str) -> str:
        return key

    def delete_adapter(self, name: str) -> None:
        del self.embedding[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        held = [n for n in names if n in self.embedding]
        if held:
            raise NotImplementedError(
                f"prompt-tuning adapters {held} cannot be merged into the base weights: a soft "
                "prompt is extra input, not a weight change. Keep the PeftModel, or use unload() "
                "to get the base model back without it."
            )

    def unwrap(self, merge: bool) -> None:
        for handle in self._handles:
            handle.remove()
        return None

    def _prompt(self) -> torch.Tensor | None:
        if self.disabled or not self.active_adapters:
            return None
        return self.embedding[self.active_adapters[0]].weight

    def _model_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        prompt = self._prompt()
        if prompt is None:
            return None
        self._in_model = True
        kwargs = dict(kwargs, **dict(zip(self._model_args, args)))
        return (), self._prepend(prompt, kwargs, pad_labels=True)[0]

    def _model_post(self, module: nn.Module, args: tuple, output) -> None:
        self._in_model = False

    def _backbone_pre(self, module: nn.Module, args: tuple, kwargs: dict):
        prompt = self._prompt()
        if prompt is None or self._in_model:
            return None
        kwargs = dict(kwargs, **dict(zip(self._backbone_args, args)))
        kwargs, prepended = self._prepend(prompt, kwargs, pad_labels=False)
        self._strip = prompt.shape[0] if prepended else 0
        return (), kwargs

    def _backbone_post(self, module: nn.Module, args: tuple, output):
        n, self._strip = self._strip, 0
        if not n:
            return None
        if isinstance(output, tuple):
            return (output[0][:, n:],) + output[1:]
        output["last_hidden_state"] = output["last_hidden_state"][:, n:]
        return output

    def _prepend(self, prompt: torch.Tensor, kwargs: dict, pad_labels: bool) -> tuple[dict, bool]:
        """The call's kwargs rewritten as in the module docstring, and whether the prompt was
        prepended (False when continuing a KV cache that holds it already)."""
        n = prompt.shape[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        continuing = cache is not None and cache.get_seq_length() > 0
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        batch = (ids if embeds is None else embeds).shape[0]
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                raise ValueError("prompt tuning needs a 2-D attention_mask (batch, length)")
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        pos = kwargs.get("position_ids")
        if pos is not None:
            prefix = torch.arange(n, device=pos.device, dtype=pos.dtype).expand(batch, n)
            kwargs["position_ids"] = pos + n if continuing else torch.cat([prefix, pos + n], 1)
        if continuing:
            return kwargs, False
        if embeds is None:
            embeds = self._input_embeddings[0](ids)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype).expand(batch, n, -1), embeds],
                                            dim=1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        labels = kwargs.get("labels")
        if pad_labels and labels is not None and labels.dim() == 2 \
                and labels.shape[1] == embeds.shape[1]:
            kwargs["labels"] = torch.cat([labels.new_full((batch, n), -100), labels], dim=1)
        return kwargs, True


class PromptModulesToSave(ModulesToSaveWrapper):
    """`modules_to_save` of a prompt-tuning adapter, under PEFT's prompt-learning file keys:
    `base_model.<module path>.weight` (PEFT does not wrap the model a second time there)."""

    def file_key(self, path: str, key: str) -> str:
        return super().file_key(path, key).replace("base_model.model.", "base_model.", 1)


def _init_weight(config: PromptTuningConfig, embeddings: nn.Module, dtype: torch.dtype):
    """(n, d) initial prompt; TEXT and SAMPLE_VOCAB only when training (as PEFT does)."""
    n, d = config.num_virtual_tokens, config.token_dim
    weight = embeddings.weight
    init = config.prompt_tuning_init
    if config.inference_mode or init == PromptTuningInit.RANDOM:
        return torch.randn(n, d, device=weight.device, dtype=dtype)
    if init == PromptTuningInit.SAMPLE_VOCAB:
        ids = torch.randint(0, embeddings.num_embeddings, (n,), dtype=torch.long)
    else:
        from transformers import AutoTokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # loading an adapter must not run remote code
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
        text_ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        check(len(text_ids) > 0, "prompt_tuning_init_text", "tokenizes to no tokens")
        ids = torch.tensor((text_ids * math.ceil(n / len(text_ids)))[:n], dtype=torch.long)
    with torch.no_grad():
        return embeddings(ids.to(weight.device)).detach().clone().to(dtype)


class PromptTuningInjector(Injector):
    def inject(self, model: nn.Module, config: PromptTuningConfig, name: str,
               autocast_adapter_dtype: bool = True) -> None:
        embeddings = model.get_input_embeddings()
        text_config = model.config.get_text_config()
        d = embeddings.weight.shape[1]
        check(config.token_dim in (None, d), "token_dim",
              f"is {config.token_dim} but the model's input embeddings have width {d}")
        config.token_dim = d
        config.num_transformer_submodules = 1
        config.num_layers = config.num_layers or text_config.num_hidden_layers
        config.num_attention_heads = config.num_attention_heads or text_config.num_attention_heads
        encoder = getattr(model, ATTRIBUTE, None)
        if encoder is None:
            encoder = PromptEncoder(model)
            model.add_module(ATTRIBUTE, encoder)
        elif not isinstance(encoder, PromptEncoder):
            raise ValueError(f"the model already has an attribute {ATTRIBUTE!r}")
        dtype = embeddings.weight.dtype
        if autocast_adapter_dtype or not dtype.is_floating_point:
            dtype = torch.float32
        encoder.add(name, _init_weight(config, embeddings, dtype))
        add_modules_to_save(model, config.modules_to_save, name, PromptModulesToSave)


SPEC = MethodSpec(
    name="prompt", help="a trained soft prompt before the input (Lester et al., 2021)",
    config_cls=PromptTuningConfig, injector=PromptTuningInjector(),
    flags={
        "num_virtual_tokens": dict(type=positive_int, default=20, help="soft prompt length"),
        "prompt_tuning_init": dict(default="RANDOM", choices=["RANDOM", "TEXT", "SAMPLE_VOCAB"],
                                   help="how the soft prompt starts"),
        "prompt_tuning_init_text": dict(default=None, help="text whose embeddings start the "
                                        "prompt (with --prompt-tuning-init TEXT)"),
    },
    merges=False, learning_rate=3e-2,
    compare_flags={"num_virtual_tokens": 20, "prompt_tuning_init": "TEXT",
                   "prompt_tuning_init_text": "Answer with the exact result only."},
)
