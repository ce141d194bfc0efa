"""`PeftModel`: a thin, method-agnostic wrapper around a transformers model.

The wrapped model sits at `peft_model.base_model.model`, so parameter names and adapter-file keys
are PEFT's (`base_model.model.<module path>...`). Everything a method knows lives in its module
(`peftkit.methods.*`); this class only asks the injected `TunerLayer`s to switch, disable,
merge, unload or hand over their tensors, and reads and writes the files.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from typing import Iterator

import torch
from torch import nn

from . import checkpoint, fast, hf_trainer, hub, mixed, quant
from .config import PeftConfig, PeftType, TaskType
from .fast import loss as fast_loss
from .methods import pissa
from .methods.base import TunerLayer, replace_module
from .methods.registry import injector_for

PREFIX = "base_model.model."
CLASSIFIER_HEADS = ("classifier", "score")


class TunedModel(nn.Module):
    """Holds the adapted transformers model as `.model`; unknown attributes come from it.

    Calling it runs the model's backbone (`model.base_model`, e.g. `LlamaModel`), which is what
    transformers-ecosystem code expects of `x.base_model(...)` on a model `x`: TRL's SFTTrainer
    runs its fused, chunked LM-head loss that way. (In PEFT it would run the whole model; peftkit's
    `PeftModel.forward` calls `.model` directly.)
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args, **kwargs):
        return self.model.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class _BoundForward:
    """A forward bound to one model that shows the wrapped model's signature to
    `inspect.signature`, so tools that read argument names (transformers' Trainer drops dataset
    columns the forward does not accept) see e.g. BERT's `token_type_ids` too."""

    def __init__(self, fn, owner: "PeftModel") -> None:
        self.fn, self.owner = fn, owner

    def __call__(self, *args, **kwargs):
        return self.fn(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.owner.get_base_model().forward)


def _class_signature(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                     **kwargs):
    """What `inspect.signature(PeftModel.forward)` shows: Trainer finds the `labels` column."""


class _WithBaseSignature:
    """Method decorator: on an instance, bind through `_BoundForward`; on the class, the plain
    function, showing `_class_signature`."""

    def __init__(self, fn) -> None:
        fn.__signature__ = inspect.signature(_class_signature)
        self.fn = fn

    def __get__(self, obj, objtype=None):
        return self.fn if obj is None else _BoundForward(self.fn, obj)


class PeftModel(nn.Module):
    """A transformers model with named adapters; one adapter is active at a time.

    Forward, `generate` and unknown attributes pass through to the wrapped model, with peftkit's
    speed layer (`peftkit.fast`, settings in `speed`): a training forward that asks only for the
    loss gets it from the fused output-head loss, without logits. Only the active
    adapter's tensors are trainable (none when its config has `inference_mode=True`). bitsandbytes
    4-bit layers are kept off its AVX512-BF16 CPU inference format, which has no backward
    (`quant.avoid_cpu_packing_`).

    `forward` and `generate` take `adapter_names=[...]`, one adapter name per row (`"__base__"`:
    the bare model, the residual base after a PiSSA/OLoRA init, as in PEFT), to run a batch
    whose rows use different adapters, in inference (`peftkit.mixed`); such a call takes the
    model's own forward, not the fused loss.
    """

    # transformers' Trainer reads this to accept training a quantized base with adapters on top.
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True) -> None:
        super().__init__()
        hf_trainer.install()
        self.base_model = TunedModel(model)
        model.requires_grad_(False)
        quant.avoid_cpu_packing_(model)
        self.peft_config: dict[str, PeftConfig] = {}
        self.active_adapter = adapter_name
        self._autocast_adapter_dtype = autocast_adapter_dtype
        self.speed = fast.Speed()
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- running ---------------------------------------------------------------------------
    @_WithBaseSignature
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is not None:
            with mixed.rows(self, adapter_names):
                return self.base_model.model(*args, **kwargs)
        if self.speed.loss and fast_loss.training_forward_loss(self, args, kwargs):
            return fast_loss.fused_forward(self, **kwargs)
        return self.base_model.model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        model = self.get_base_model()
        if adapter_names is None:
            return model.generate(*args, **kwargs)
        # transformers repeats each row max(num_beams, num_return_sequences) times, in place
        config = kwargs.get("generation_config") or model.generation_config
        repeat = max(kwargs.get("num_beams") or config.num_beams or 1,
                     kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        with mixed.rows(self, adapter_names, repeat):
            return model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        return self.base_model.model

    # -- adapters by name ------------------------------------------------------------------
    def _layers(self) -> Iterator[TunerLayer]:
        return (m for m in self.modules() if isinstance(m, TunerLayer))

    def add_adapter(self, adapter_name: str, peft_config: PeftConfig) -> None:
        """Inject a new adapter; it does not become active (call `set_adapter`)."""
        if adapter_name in self.peft_config:
            raise ValueError(f"an adapter named {adapter_name!r} exists; pick another name")
        model = self.get_base_model()
        if peft_config.task_type == TaskType.SEQ_CLS and hasattr(peft_config, "modules_to_save"):
            # As PEFT: a new classification head must train and be saved with the adapter.
            heads = (peft_config.modules_to_save or []) + list(CLASSIFIER_HEADS)
            peft_config.modules_to_save = list(dict.fromkeys(heads))
        if peft_config.base_model_name_or_path is None:
            peft_config.base_model_name_or_path = getattr(model, "name_or_path", None) or None
        try:
            injector_for(peft_config).inject(model, peft_config, adapter_name,
                                           autocast_adapter_dtype=self._autocast_adapter_dtype)
        except Exception:
            for layer in self._layers():
                if adapter_name in layer.adapter_names:
                    layer.delete_adapter(adapter_name)
            raise
        self.peft_config[adapter_name] = peft_config
        for layer in self._layers():
            layer.set_adapter([self.active_adapter])
        self._mark_trainable()
        fast.apply(self)

    def set_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r}; have {sorted(self.peft_config)}")
        self.active_adapter = adapter_name
        for layer in self._layers():
            layer.set_adapter([adapter_name])
        self._mark_trainable()

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"no adapter {adapter_name!r}; have {sorted(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ValueError("cannot delete the only adapter; use unload() to remove it")
        for layer in self._layers():
            if adapter_name in layer.adapter_names:
                layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.set_adapter(next(iter(self.peft_config)))

    @contextlib.contextmanager
    def disable_adapter(self):
        """Context manager: inside it the model computes exactly the base model's outputs, except
        after a LoRA init that changes the base (PiSSA, OLoRA: `methods.pissa`), where it gives
        the residual base's outputs, as in PEFT."""
        layers = list(self._layers())
        for layer in layers:
            layer.set_disabled(True)
        try:
            yield
        finally:
            for layer in layers:
                layer.set_disabled(False)

    # -- parameters ------------------------------------------------------------------------
    def adapter_tensors(self, adapter_name: str) -> dict[str, nn.Parameter]:
        """`{PEFT file key: parameter}` for adapter `adapter_name`: the explicit list of what it
        trains and saves."""
        out = {
            layer.file_key(path, key): tensor
            for path, layer in self.named_modules()
            if isinstance(layer, TunerLayer) and adapter_name in layer.adapter_names
            for key, tensor in layer.adapter_tensors(adapter_name).items()
        }
        config = self.peft_config[adapter_name]
        extra = injector_for(config).extra_tensors(self.get_base_model(), config)
        out.update({PREFIX + k: v for k, v in extra.items()})
        return out

    def _mark_trainable(self) -> None:
        """Only the active adapter's tensors train (none in inference mode); other adapters' are
        frozen. Parameters outside every adapter keep their flag: the base model is frozen once,
        at construction, and a parameter unfrozen by hand afterwards stays trainable."""
        for name in self.peft_config:
            for p in self.adapter_tensors(name).values():
                p.requires_grad_(False)
        if not self.peft_config[self.active_adapter].inference_mode:
            for p in self.adapter_tensors(self.active_adapter).values():
                p.requires_grad_(True)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all); a packed 4-bit tensor counts the weights it holds, as in PEFT."""
        trainable = total = 0
        for p in self.parameters():
            n = p.numel()
            if type(p).__name__ == "Params4bit":
                n *= 2 * p.element_size()
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- merging ---------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False):
        """Fold the adapters (default: the active one) into the base weights; idempotent."""
        for layer in self._layers():
            layer.merge(adapter_names or [self.active_adapter], safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for layer in self._layers():
            layer.unmerge()

    def _unload(self, merge: bool) -> nn.Module:
        model = self.get_base_model()
        fast.use_lean_mlps(model, False)
        for path, layer in list(model.named_modules()):
            if isinstance(layer, TunerLayer):
                replace_module(model, path, layer.unwrap(merge))
        return model

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None,
                         dequantize: bool = False) -> nn.Module:
        """Merge the adapters (default: the active one) and return the plain base model.

        `dequantize=True` first turns every quantized (bitsandbytes) layer into a full-precision
        `nn.Linear`, so the merge is exact and plain transformers loads the saved result.
        """
        if dequantize:
            quant.dequantize_model(self.get_base_model())
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging and return the original base model."""
        return self._unload(merge=False)

    # -- files -----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike,
                        selected_adapters: list[str] | None = None,
                        safe_serialization: bool = True, is_main_process: bool | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None,
                        path_initial_model_for_weight_conversion: str | None = None,
                        **kwargs) -> None:
        """Write each adapter as PEFT does: `default` in `save_directory/`, `X` in
        `save_directory/X/`; weights then config, each file atomically.

        `is_main_process`: whether this process writes. None (the default): every process,
        except in a `torch.distributed` run of more than one process, where rank 0 alone writes
        (PEFT's default, True, has every rank write the same files).

        A model sharded by FSDP2 (`fully_shard`: DTensor parameters) gathers each sharded
        adapter tensor (`full_tensor()`), which is collective: every rank must call
        `save_pretrained` (not only the writing one), as with `torch.distributed.checkpoint`.

        `state_dict`: the model's full state dict as a sharding or offloading engine gathered it
        (keys as in `self.state_dict()`), on the writing process; the adapter tensors are taken
        from it instead of from the parameters this process holds, and nothing is gathered.

        `path_initial_model_for_weight_conversion`: the folder of a PiSSA/OLoRA adapter saved
        right after init; each adapter is saved as the plain rank-2r LoRA that gives the same
        model on the untouched base (`methods.pissa.lora_from_mutated`), and, as PEFT does, that
        folder's config is rewritten with `init_lora_weights=True` once the conversion succeeded.
        LoRA adapters only: another type is a ValueError, raised before anything is written."""
        if not safe_serialization:
            warnings.warn("peftkit writes safetensors only; ignoring safe_serialization=False",
                          stacklevel=2)
        if kwargs:
            raise TypeError(f"save_pretrained() got unexpected arguments {sorted(kwargs)}")
        if is_main_process is None:
            is_main_process = _rank() == 0
        if not is_main_process and state_dict is not None:
            return  # an engine's gathered state dict: gathered already, nothing to join
        names = selected_adapters or list(self.peft_config)
        unknown = sorted(set(names) - set(self.peft_config))
        if unknown:
            raise ValueError(f"no adapters {unknown}; have {sorted(self.peft_config)}")
        if path_initial_model_for_weight_conversion is not None:
            for name in names:  # refuse before anything is written
                config = self.peft_config[name]
                if config.peft_type != PeftType.LORA:
                    raise ValueError(
                        f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA LoRA "
                        f"adapters; adapter {name!r} is {config.peft_type.value}: save it without "
                        "that argument (or select the LoRA adapters with selected_adapters)")
                pissa.check_convertible(config)
        for name in names:
            tensors = self.adapter_tensors(name)
            if state_dict:  # DeepSpeed hands over {} when it gathered nothing
                tensors = self._from_state_dict(tensors, state_dict)
            else:  # FSDP2: each rank holds a shard; every rank takes part in the gather
                tensors = checkpoint.full_tensors(tensors)
            if not is_main_process:
                continue
            config = self.peft_config[name]
            if path_initial_model_for_weight_conversion is not None:
                initial = path_initial_model_for_weight_conversion
                converted, tensors = pissa.lora_from_mutated(config, tensors,
                                                             checkpoint.load_tensors(initial))
                pissa.initial_config(config).save_pretrained(initial)  # only once converted
                config = converted
            out = save_directory if name == "default" else os.path.join(save_directory, name)
            os.makedirs(out, exist_ok=True)
            checkpoint.save_tensors(tensors, os.path.join(out, checkpoint.WEIGHTS_NAME))
            config.save_pretrained(out)

    def _from_state_dict(self, tensors: dict[str, torch.Tensor],
                         state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`{file key: state_dict[in-memory name of that tensor]}`. A frozen tensor the engine
        left out (DeepSpeed's `exclude_frozen_parameters`) is this process's own copy; a missing
        trainable one is an error."""
        names = {id(t): n for n, t in self.state_dict(keep_vars=True).items()}
        missing = [names[id(t)] for t in tensors.values()
                   if names[id(t)] not in state_dict and t.requires_grad]
        if missing:
            raise KeyError(f"state_dict lacks trainable adapter tensors {missing[:3]} "
                           f"({len(missing)} in all); pass the model's full state dict")
        return {key: state_dict.get(names[id(t)], t) for key, t in tensors.items()}

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike,
                        adapter_name: str = "default", is_trainable: bool = False,
                        config: PeftConfig | None = None, autocast_adapter_dtype: bool = True,
                        **kwargs) -> "PeftModel":
        """Wrap `model` and load the adapter in `model_id`: a folder (PEFT's or ours) or a Hub
        repo id, with `subfolder`, `revision`, `token`, `cache_dir`, `local_files_only` as PEFT
        takes them. `is_trainable=False` leaves the model in eval mode with nothing trainable."""
        directory = hub.adapter_folder(model_id, **kwargs)
        config = config or PeftConfig.from_pretrained(directory)
        config.inference_mode = not is_trainable
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype)
        peft_model._load_weights(adapter_name, directory)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str,
                     is_trainable: bool = False, **kwargs) -> None:
        """Load the adapter in `model_id` (folder or Hub repo id, as `from_pretrained`) under
        `adapter_name`. A new name is added, not activated; an existing adapter of that name
        gets the file's weights (what transformers' Trainer does on resume and best-model
        loading). `is_trainable=False` puts the model in eval mode, as PEFT does."""
        directory = hub.adapter_folder(model_id, **kwargs)
        if adapter_name in self.peft_config:
            self._load_weights(adapter_name, directory)
        else:
            config = PeftConfig.from_pretrained(directory)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config)
            try:
                self._load_weights(adapter_name, directory)
            except Exception:
                self.delete_adapter(adapter_name)
                raise
        if not is_trainable:
            self.eval()

    def _load_weights(self, adapter_name: str, directory: str | os.PathLike) -> None:
        """Copy the file's tensors into adapter `adapter_name`; every key and shape must match."""
        state = checkpoint.load_tensors(directory)
        # PEFT's bias="all" also writes the biases inside modules_to_save wrappers under their
        # in-memory names: a copy of `<path>.bias` and the frozen original. Nothing to load.
        state = {k: v for k, v in state.items()
                 if ".original_module." not in k and ".modules_to_save." not in k}
        params = self.adapter_tensors(adapter_name)
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"adapter file in {directory!s} does not fit this model and config: "
                f"missing {len(missing)} keys {missing[:3]}, unexpected {len(unexpected)} keys "
                f"{unexpected[:3]}. Was it saved from a different base model?"
            )
        bad = [(k, tuple(state[k].shape), tuple(p.shape)) for k, p in params.items()
               if state[k].shape != p.shape]
        if bad:
            raise ValueError(f"shape mismatch (key, file, model): {bad[:3]}")
        with torch.no_grad():
            for key, p in params.items():
                src = state[key].to(p.dtype)
                if getattr(p, "device_mesh", None) is not None:  # a DTensor sharded by FSDP2
                    from torch.distributed.tensor import distribute_tensor

                    # this process's part of the file's tensor, cut locally
                    src = distribute_tensor(src, p.device_mesh, p.placements, src_data_rank=None)
                p.copy_(src)


def _rank() -> int:
    """This process's rank in the default process group; 0 outside a distributed run."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_peft_model(model: nn.Module, peft_config: PeftConfig, adapter_name: str = "default",
                   autocast_adapter_dtype: bool = True, speed: bool = True,
                   **kwargs) -> PeftModel:
    """Inject `peft_config`'s method into `model` (in place) and wrap it in a `PeftModel`, with
    the speed layer on (`peftkit.fast`; `speed=False`: the stock computation)."""
    peft_model = PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)
    return peft_model if speed else fast.apply(peft_model, loss=False, mlp=False,
                                               lora_function=False)


hf_trainer.install()
