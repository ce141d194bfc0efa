"""The base model's GGUF, which llama.cpp loads under a LoRA GGUF and which the merged GGUF is
built from: its architecture, tensor names and shapes, and its weights dequantized.

Names follow llama.cpp's converter (`gguf.get_tensor_name_map`): `model.layers.3.self_attn.q_proj`
is `blk.3.attn_q`, `lm_head` is `output`, `model.embed_tokens` is `token_embd`. For the `llama`
architecture that converter also permutes the rows of q_proj and k_proj (its `LlamaModel.permute`,
so that llama.cpp's RoPE works on adjacent pairs); a LoRA B (out_features, r) and a delta get the
same row permutation.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UserError

# llama.cpp architectures whose tensors export maps, and whether q/k rows are permuted.
PERMUTED_QK = {"llama": True, "qwen2": False, "qwen3": False}


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` on the first axis: per head, the two halves of the
    rotary dimension interleave."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class BaseGGUF:
    def __init__(self, path: str) -> None:
        import gguf

        if not os.path.isfile(path):
            raise UserError(f"base GGUF {path} does not exist; pass --base-gguf with the GGUF "
                            "file of the model the adapter was trained on")
        self.path = os.path.abspath(path)
        self.reader = gguf.GGUFReader(path)
        self.arch = self.field("general.architecture")
        if self.field("general.type", "model") != "model":
            raise UserError(f"{path} is not a model GGUF (general.type="
                            f"{self.field('general.type')!r}); pass the base model's GGUF")
        if self.arch not in PERMUTED_QK:
            raise UserError(
                f"{path} is a {self.arch!r} model; peftkit exports to {sorted(PERMUTED_QK)}. For "
                "other architectures use llama.cpp's convert_lora_to_gguf.py (check first that "
                "`peftkit doctor --adapter` finds nothing it would get wrong)")
        self.n_head = self.field(f"{self.arch}.attention.head_count")
        self.n_head_kv = self.field(f"{self.arch}.attention.head_count_kv", self.n_head)
        arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == self.arch)
        self.names = gguf.get_tensor_name_map(arch_enum, self.field(f"{self.arch}.block_count"))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default=None):
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def gguf_name(self, hf_name: str) -> str:
        """`model.layers.0.self_attn.q_proj.weight` -> `blk.0.attn_q.weight`."""
        name = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"llama.cpp has no tensor for {hf_name} in a {self.arch!r} model; "
                            "export the merged model (--format gguf) only if it is a weight of "
                            "the base model, else this adapter cannot go to llama.cpp")
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        """numpy (row-major) shape, e.g. (out_features, in_features)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape))

    def to_gguf_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a Hugging Face tensor (or LoRA B / delta) in the order `name` has in GGUF."""
        if PERMUTED_QK[self.arch]:
            if ".attn_q." in name:
                return permute_rows(rows, self.n_head)
            if ".attn_k." in name:
                return permute_rows(rows, self.n_head_kv)
        return rows

    def weight(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, numpy shape."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        return dequantize(t.data, t.tensor_type).reshape(self.shape(name)).astype(np.float32)
