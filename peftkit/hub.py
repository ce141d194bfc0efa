"""Where an adapter lives: a local folder, or a Hugging Face Hub repo fetched into the local cache.

`adapter_folder(model_id, subfolder=..., revision=..., token=..., cache_dir=...)` takes the
arguments PEFT's `from_pretrained` takes and returns a local folder holding `adapter_config.json`
and `adapter_model.safetensors`. A repo id goes through `huggingface_hub.hf_hub_download` (which
honours `HF_HUB_OFFLINE` and `local_files_only`); the pickled `adapter_model.bin` is never fetched.
"""

from __future__ import annotations

import inspect
import os
import warnings

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME

# PEFT loading arguments that change nothing here: the weights are copied into the adapter's
# parameters wherever those already live.
NO_EFFECT = frozenset({"torch_device", "low_cpu_mem_usage"})


def adapter_folder(model_id: str | os.PathLike, subfolder: str | None = None, **kwargs) -> str:
    """The local folder of adapter `model_id` (`model_id/subfolder` when given)."""
    from huggingface_hub import hf_hub_download

    hub_args = set(inspect.signature(hf_hub_download).parameters) - {
        "repo_id", "filename", "subfolder", "local_dir", "repo_type"}
    unknown = sorted(set(kwargs) - hub_args - NO_EFFECT)
    if unknown:
        raise TypeError(f"unexpected arguments {unknown} for loading an adapter; peftkit takes "
                        f"{sorted(NO_EFFECT | {'subfolder', 'revision', 'token', 'cache_dir'})} "
                        "and the other arguments of huggingface_hub.hf_hub_download")
    hub_kwargs = {k: v for k, v in kwargs.items() if k in hub_args}
    local = os.path.join(model_id, subfolder) if subfolder else str(model_id)
    if os.path.isdir(local):
        if hub_kwargs:
            warnings.warn(f"{local} is a local folder; ignoring Hub arguments {sorted(hub_kwargs)}",
                          stacklevel=3)
        return local
    return _download(str(model_id), subfolder, hub_kwargs)


def _download(repo_id: str, subfolder: str | None, hub_kwargs: dict) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, HFValidationError
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        config = hf_hub_download(repo_id, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
    except HFValidationError:
        raise FileNotFoundError(f"no folder {repo_id!s} (and it is not a Hub repo id 'org/name'): "
                                f"pass the folder that save_pretrained wrote, which holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except (LocalEntryNotFoundError, EntryNotFoundError, HfHubHTTPError) as err:
        where = f"{repo_id}/{subfolder}" if subfolder else repo_id
        raise FileNotFoundError(
            f"no adapter folder {where} here, and the Hub gave no {CONFIG_NAME} for it "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). Pass a folder that "
            "save_pretrained wrote, or a Hub repo id (with revision/token if needed)") from None
    try:
        hf_hub_download(repo_id, WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs)
    except (LocalEntryNotFoundError, EntryNotFoundError) as err:
        raise FileNotFoundError(
            f"Hub repo {repo_id} has {CONFIG_NAME} but no {WEIGHTS_NAME} "
            f"({type(err).__name__}); peftkit reads safetensors adapters only") from None
    return os.path.dirname(config)
