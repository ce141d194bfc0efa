"""Activation memory: the bytes autograd keeps for backward in one training step.

Method: Korthikanti et al., 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), Sec. 4: add up the tensors each layer saves for its backward pass. For GPT
they get 34*s*b*h bytes per layer in 16-bit (plus 5*a*s^2*b for attention scores, which SDPA /
flash attention never store), and 2*s*b*h per layer with full recomputation (checkpointing).

For the Llama family (llama, mistral, qwen2: RMSNorm, SwiGLU MLP, grouped-query attention, rotary,
SDPA) we count the tensors of transformers' implementation exactly. Per token and layer, with e the
bytes of the compute dtype, h the hidden size, hq = heads*head_dim, hkv = kv_heads*head_dim,
I the MLP size, a the LoRA dtype's bytes:

    2 RMSNorms     2 * (4h + 4)                fp32 upcast of the input, and rsqrt
                   + 2 * e*h                    normalized input, if the norm weights train
    attention      e*(2*hq + 2*hkv) + 4*heads   q, k, v, output (= o_proj input), log-sum-exp
    MLP            3 * e*I                      gate, silu(gate), up
    linear inputs  e*h (q/k/v), e*h (gate/up), e*I (down), for each group whose weights train
    each LoRA      a*r (A's output), plus its input x: nothing extra when x is already saved or
                   can be shared (same dtype, no dropout: one copy per input, e.g. q/k/v share);
                   a*in for the cast to the adapter dtype; with dropout a*in + its mask (1 byte
                   per element on CUDA, a bytes on CPU, where dropout is not fused)

Once per step: the final norm (4h + 4, + 2*e*h if it and the head train), the input ids (8 per token, if the
embedding trains) and rotary cos/sin (2*head_dim*e per position). The first layer's input norm
saves nothing when the model's input needs no gradient (frozen embeddings, no prompt).
`tests/test_planner.py` checks this count against the tensors autograd actually saves.

Other architectures (GPT-2, ...) use Korthikanti's count without the score term: (16e + 2)*h per
token and layer (34h at e = 2: 16-bit tensors plus 1-byte dropout masks), and e*h for the rest.

With gradient checkpointing (one checkpoint per decoder layer, as transformers does) each layer
keeps only its input, e*h per token, and backward recomputes one layer at a time: L*e*h + the
largest layer's count + the once-per-step terms.
"""

from __future__ import annotations

import dataclasses

from .. import targets

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
# LoRA-wrapped linear -> (input group, saved anyway?) in the Llama family; q/k/v share one input.
_INPUT_GROUP = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in",
                "o_proj": "attn_out", "gate_proj": "mlp_in", "up_proj": "mlp_in",
                "down_proj": "mlp_act"}


@dataclasses.dataclass(frozen=True)
class Arch:
    """The shape facts of a decoder-only transformer that activation memory depends on."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def of(cls, config) -> "Arch":
        hidden = config.hidden_size
        heads = config.num_attention_heads
        return cls(
            model_type=config.model_type,
            layers=config.num_hidden_layers,
            hidden=hidden,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or hidden // heads,
            intermediate=getattr(config, "intermediate_size", None)
            or getattr(config, "n_inner", None) or 4 * hidden,
            vocab=config.vocab_size,
        )

    @property
    def exact(self) -> bool:
        return self.model_type in LLAMA_FAMILY


def _layer_bytes(arch: Arch, e: int, full: bool, lora: list, mask: int, input_grad: bool) -> int:
    """Bytes per token saved by one decoder layer (module docstring). `lora`: its LoraSites;
    `mask`: bytes per element of a dropout mask; `input_grad`: the layer's input needs a grad."""
    if not arch.exact:
        return (16 * e + 2) * arch.hidden + _lora_bytes(lora, e, mask, input_grad, {})[0]
    h, inter = arch.hidden, arch.intermediate
    hq, hkv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    norm_in = 4 * h + 4
    total = norm_in + (norm_in if input_grad else 0)
    total += e * (2 * hq + 2 * hkv) + 4 * arch.heads + 3 * e * inter
    groups = {"attn_in": h, "mlp_in": h, "mlp_act": inter} if full else {}
    if full:
        total += 2 * e * h
    own, groups = _lora_bytes(lora, e, mask, input_grad, groups)
    return total + own + e * sum(groups.values())


def _lora_bytes(sites: list, e: int, mask: int, input_grad: bool, groups: dict):
    """(bytes per token of the LoRA branches' own tensors, {shared input group: features}).

    A branch saves A's output (a*r) and needs its input x: shared with the layer when the dtypes
    match and there is no dropout (one copy per input group), else its own cast copy (a*in), or
    with dropout its output plus the mask (`mask` bytes per element, only when x needs a grad).
    """
    groups = dict(groups)
    own = 0
    for site in sites:
        a = site.dtype.itemsize
        own += a * site.r
        group = _INPUT_GROUP.get(site.path.rsplit(".", 1)[-1], site.path)
        if site.dropout > 0:
            own += (a + ((mask or a) if input_grad else 0)) * site.in_features
        elif a != e:
            own += a * site.in_features
        elif group != "attn_out":
            groups.setdefault(group, site.in_features)
    return own, groups


@dataclasses.dataclass(frozen=True)
class Activations:
    """Saved-for-backward bytes of one step, without and with gradient checkpointing."""

    layers: int  # all decoder layers, no checkpointing
    largest_layer: int
    fixed: int  # once per step: final norm, input ids, rotary tables
    checkpoints: int  # the layers' inputs kept under checkpointing

    @property
    def plain(self) -> int:
        return self.layers + self.fixed

    @property
    def checkpointed(self) -> int:
        return self.checkpoints + self.largest_layer + self.fixed


def activations(arch: Arch, e: int, batch: int, seq: int, full: bool, input_grad: bool,
                lora_sites: list, device: str = "cuda") -> Activations:
    """Activation bytes for `batch` sequences of `seq` tokens (module docstring).

    `full`: every base weight trains; `input_grad`: the embeddings' output needs a gradient (full
    fine-tuning, prompt tuning); `lora_sites`: the model's LoRA-wrapped layers (`LoraSite`);
    `device`: CUDA's fused dropout keeps a bool mask, the CPU kernel one in the input's dtype.
    """
    mask = 1 if device == "cuda" else None
    tokens = batch * seq
    by_layer: dict[int | None, list] = {}
    for site in lora_sites:
        by_layer.setdefault(targets.layer_index(site.path, None), []).append(site)
    per_layer = [_layer_bytes(arch, e, full, by_layer.get(i, []), mask, input_grad or i > 0)
                 for i in range(arch.layers)]
    h = arch.hidden
    if arch.exact:
        fixed = tokens * (4 * h + 4 + (2 * e * h + 8 if full else 0))
        fixed += 2 * seq * arch.head_dim * e
    else:
        fixed = tokens * e * h
    own, groups = _lora_bytes(by_layer.get(None, []), e, mask, True, {})
    fixed += tokens * (own + e * sum(groups.values()))
    return Activations(
        layers=tokens * sum(per_layer),
        largest_layer=tokens * max(per_layer),
        fixed=fixed,
        checkpoints=tokens * arch.layers * e * h,
    )
