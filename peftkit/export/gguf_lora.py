"""A LoRA adapter as a llama.cpp LoRA GGUF, as llama.cpp's `convert_lora_to_gguf.py` writes one.

Metadata: `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`,
`general.architecture` of the base. Tensors: `<base tensor>.lora_a` with numpy shape
(r, in_features) and `<base tensor>.lora_b` (out_features, r), e.g. `blk.0.attn_q.weight.lora_a`;
B's rows permuted like the base tensor's (`BaseGGUF.to_gguf_rows`).

llama.cpp scales every pair by `alpha / r`, with one alpha for the file and r read from the pair
(`llama_adapter_lora_weight::get_scale`). peftkit's scaling is per module (rank_pattern,
alpha_pattern) and `alpha / sqrt(r)` under rsLoRA, so B is multiplied by
`scaling * r / alpha`: exactly 1 for a plain adapter, whose tensors are then copied unchanged.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .adapter import Adapter
from .base_gguf import BaseGGUF

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def qtype(outtype: str):
    import gguf

    return {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0}[outtype]


def add_tensor(writer, name: str, data: np.ndarray, outtype: str) -> str:
    """Add `data` (float32) as `outtype`; q8_0 needs rows of a multiple of 32 values, and a
    tensor whose rows are shorter is stored f16 (as llama.cpp's converter does). Returns the
    type used."""
    import gguf

    kind = qtype(outtype)
    try:
        raw = gguf.quants.quantize(data, kind)
    except gguf.QuantError:
        outtype, kind = "f16", gguf.GGMLQuantizationType.F16
        raw = gguf.quants.quantize(data, kind)
    writer.add_tensor(name, raw, raw_dtype=kind)
    return outtype


def write(adapter: Adapter, base: BaseGGUF, path: str, outtype: str = "f16") -> dict:
    """Write the LoRA GGUF to `path`; returns what was done (alpha, folded modules, types)."""
    import gguf

    modules = adapter.modules()
    if not modules:
        raise UserError(f"{adapter.directory} holds no LoRA pairs; nothing to export")
    alpha = float(adapter.config.lora_alpha)
    writer = gguf.GGUFWriter(path, arch=base.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    folded, types = [], set()
    for m in modules:
        name = base.gguf_name(m.path + ".weight")
        shape = (m.b.shape[0], m.a.shape[1])
        if name not in base.tensors or base.shape(name) != shape:
            have = base.shape(name) if name in base.tensors else "no such tensor"
            raise UserError(
                f"{m.path} (delta {shape}) does not fit {name} in {base.path} ({have}); pass the "
                "GGUF of the model the adapter was trained on with --base-gguf, or, for a LoRA "
                "on an output head that the GGUF ties to the embeddings, --format gguf")
        factor = m.scaling * m.rank / alpha
        b = m.b.numpy() * np.float32(factor) if factor != 1 else m.b.numpy()
        if factor != 1:
            folded.append(m.path)
        types.add(add_tensor(writer, name + ".lora_a", m.a.numpy(), outtype))
        types.add(add_tensor(writer, name + ".lora_b", base.to_gguf_rows(name, b), outtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"alpha": alpha, "modules": len(modules), "folded": folded, "types": sorted(types)}
