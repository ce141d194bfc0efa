"""Where an adapter lives: a local folder, or a Hugging Face Hub repo fetched into the local cache.

`adapter_folder(model_id, subfolder=..., revision=..., token=..., cache_dir=...)` takes the
arguments PEFT's `from_pretrained` takes and returns a local folder holding `adapter_config.json`
and `adapter_model.safetensors`. A repo id goes through one `huggingface_hub.snapshot_download` of
those two files (one revision resolved for both; `HF_HUB_OFFLINE` and `local_files_only`
honoured); the pickled `adapter_model.bin` is never fetched.
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
    from huggingface_hub import snapshot_download

    hub_args = set(inspect.signature(snapshot_download).parameters) - {
        "repo_id", "allow_patterns", "ignore_patterns", "local_dir", "repo_type"}
    unknown = sorted(set(kwargs) - hub_args - NO_EFFECT)
    if unknown:
        raise TypeError(f"unexpected arguments {unknown} for loading an adapter; peftkit takes "
                        f"{sorted(NO_EFFECT | {'subfolder', 'revision', 'token', 'cache_dir'})} "
                        "and the other arguments of huggingface_hub.snapshot_download")
    hub_kwargs = {k: v for k, v in kwargs.items() if k in hub_args}
    local = os.path.join(model_id, subfolder) if subfolder else str(model_id)
    if os.path.isdir(local):
        if hub_kwargs:
            warnings.warn(f"{local} is a local folder; ignoring Hub arguments {sorted(hub_kwargs)}",
                          stacklevel=3)
        return local
    return _download(str(model_id), subfolder, hub_kwargs)


def _download(repo_id: str, subfolder: str | None, hub_kwargs: dict) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    where = f"{repo_id}/{subfolder}" if subfolder else repo_id
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        snapshot = snapshot_download(repo_id, allow_patterns=[prefix + CONFIG_NAME,
                                                              prefix + WEIGHTS_NAME], **hub_kwargs)
    except HFValidationError:
        raise FileNotFoundError(f"no folder {repo_id!s} (and it is not a Hub repo id 'org/name'): "
                                f"pass the folder that save_pretrained wrote, which holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError) as err:
        raise FileNotFoundError(
            f"no adapter folder {where} here, and the Hub gave none "
            f"({type(err).__name__}: {str(err).splitlines()[0]}). Pass a folder that "
            "save_pretrained wrote, or a Hub repo id (with revision/token if needed)") from None
    folder = os.path.join(snapshot, subfolder) if subfolder else snapshot
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"Hub repo {where} has no {name}; peftkit reads "
                                    f"{CONFIG_NAME} with {WEIGHTS_NAME} (safetensors) only")
    return folder
