"""The merged model as a full GGUF, and the Ollama `Modelfile` that serves a GGUF export.

The merged GGUF is the base GGUF with every tensor dequantized (a QLoRA or Q4 base included),
each LoRA delta `scaling * B @ A` added and each full adapter tensor (`modules_to_save`, biases)
put in place, then stored as `outtype` (1-D tensors stay f32, as llama.cpp wants norms). All
metadata (hyper-parameters, tokenizer, chat template) is the base GGUF's, `general.file_type`
aside. A LoRA on an `lm_head` that the GGUF ties to `token_embd` unties it: `output.weight` is
written.
"""

from __future__ import annotations

import numpy as np

from .adapter import Adapter
from .base_gguf import BaseGGUF
from .gguf_lora import add_tensor

FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # gguf.LlamaFileType values

CHATML = '''TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""'''


def changes(adapter: Adapter | None, base: BaseGGUF) -> dict[str, np.ndarray]:
    """GGUF tensor name -> its merged value (float32, GGUF row order)."""
    out: dict[str, np.ndarray] = {}
    if adapter is None:
        return out
    for hf_name, t in adapter.full_tensors().items():
        name = base.gguf_name(hf_name)
        out[name] = base.to_gguf_rows(name, t.float().numpy())
    for m in adapter.modules():
        name = base.gguf_name(m.path + ".weight")
        if name not in out:
            out[name] = base.weight(_source(base, name))
        out[name] = out[name] + base.to_gguf_rows(name, m.delta().numpy())
    return out


def _source(base: BaseGGUF, name: str) -> str:
    """The base tensor llama.cpp computes `name` with: itself, or for a tied output head the
    embeddings."""
    if name not in base.tensors and name == "output.weight" and "token_embd.weight" in base.tensors:
        return "token_embd.weight"
    return name


def write(adapter: Adapter | None, base: BaseGGUF, path: str, outtype: str = "f16") -> dict:
    """Write the merged GGUF (the dequantized base when `adapter` is None); returns a summary."""
    import gguf

    merged = changes(adapter, base)
    writer = gguf.GGUFWriter(path, arch=base.arch)
    for field in base.reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture",
                                                             "general.file_type"):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(FILE_TYPES[outtype])
    names = list(base.tensors) + [n for n in merged if n not in base.tensors]
    for name in names:
        w = merged[name] if name in merged else base.weight(name)
        if w.ndim == 1:
            writer.add_tensor(name, w.astype(np.float32))
        else:
            add_tensor(writer, name, w.astype(np.float32), outtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"tensors": len(names), "merged": sorted(merged)}


def modelfile(base: BaseGGUF, model: str, adapter: str | None = None) -> str:
    """An Ollama Modelfile: FROM `model` (and ADAPTER `adapter`), the chat template when it is
    ChatML (Ollama templates are Go templates; for any other, Ollama derives one from the GGUF's
    own `tokenizer.chat_template`), and the end-of-turn token as a stop."""
    lines = [f"FROM {model}"] + ([f"ADAPTER {adapter}"] if adapter else [])
    if "<|im_start|>" in (base.field("tokenizer.chat_template") or ""):
        lines.append(CHATML)
    eos = base.field("tokenizer.ggml.eos_token_id")
    if eos is not None:
        lines.append(f'PARAMETER stop "{base.reader.fields["tokenizer.ggml.tokens"].contents(eos)}"')
    return "\n".join(lines) + "\n"
