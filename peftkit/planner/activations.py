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
    MLP            3 * e*I                      gate, silu(gate), up; 2 * e*I (gate, up) through
                                                peftkit train's `fast.swiglu.SiluMul`
    linear inputs  e*h (q/k/v), e*h (gate/up), e*I (down), for each group whose weights train
    each LoRA      a*r (A's output) and, with dropout, the keep-mask packed as bits (in/8);
                   its input x itself is saved once for every user of x (peftkit's LoRA function,
                   `peftkit.fast.lora_fn`, keeps no dropped or cast copy)
    each DoRA      a*out more through `peftkit.fast.dora_fn` (and 2*a*out per layer, not per
                   token); more, approximately, on the stock autograd path (`_dora_bytes`)

An op saves for backward only when one of its inputs needs a gradient, so each term above counts
only where the gradient flows: with frozen embeddings (no prompt) the first layer saves nothing
before its first trainable module (its input norm, the attention without q/k/v adapters), and
nothing at all comes before the first adapted module.
Once per step: the final norm (4h + 4, + 2*e*h if it and the head train), the input ids (8 per
token, if the embedding trains) and rotary cos/sin (2*head_dim*e per position).
`tests/test_planner.py` checks this count against the tensors autograd actually saves.

Other architectures (GPT-2, ...) use Korthikanti's count without the score term: (16e + 2)*h per
token and layer (34h at e = 2: 16-bit tensors plus 1-byte dropout masks), and e*h for the rest.

With gradient checkpointing (one checkpoint per decoder layer, as transformers does) each layer
keeps only its input, e*h per token (and the CPU RNG state, 5,056 bytes), and backward
recomputes one layer at a time: L*e*h + the largest layer's count + the once-per-step terms.
"""

from __future__ import annotations

import dataclasses

from .. import targets

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
CPU_RNG_STATE = 5056  # bytes of torch's CPU generator state, which each checkpoint keeps
# The linear layers of a Llama-family decoder layer, grouped by the input they share.
_ATTN_IN, _ATTN_OUT, _MLP_IN, _MLP_ACT = ("q_proj", "k_proj", "v_proj"), ("o_proj",), \
    ("gate_proj", "up_proj"), ("down_proj",)


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


def _branch_bytes(sites: list) -> tuple[int, bool]:
    """(bytes per token the LoRA branches `sites` save besides x, whether they save x): A's output
    (a*r) and, with dropout, the keep-mask as bits (in/8); x itself is shared. A DoRA branch
    saves more (`_dora_bytes`)."""
    own = sum(s.dtype.itemsize * s.r + (s.in_features // 8 if s.dropout > 0 else 0)
              + (_dora_bytes(s) if s.dora else 0) for s in sites)
    return own, bool(sites)


def _dora_bytes(site) -> int:
    """What a DoRA branch saves beyond LoRA's, per token.

    Fused (`site.fused`, `fast.dora_fn.DoraFunction`, the speed layer's default): one (out,)
    tensor in the adapter dtype (W0 x, or (1 - p) W0 x_d with dropout); x, A's output and the
    bit mask are LoRA's. Exact; the (out,) factor and norm it keeps per layer are
    `_dora_constant`'s. Over a k-bit base with dropout it also keeps the dequantized W0 (out, in)
    per layer, which this leaves out.

    Stock (`methods.dora.DoraVariant.forward`, autograd on PEFT's expression): W0 x and B A x,
    both (out,) in the adapter dtype, which the trained magnitude multiplies; with dropout the
    dropped copy of x (a*in) and a byte mask instead of a bit mask. Approximate: within 5% of
    autograd's count in fp32 (`tests/test_planner.py`); over a 16-bit base it leaves out the fp32
    casts of x and W0 that DoRA saves (up to a quarter of the activations)."""
    a = site.dtype.itemsize
    if site.fused:
        return a * site.out_features
    extra = site.in_features * (a + 1) - site.in_features // 8 if site.dropout > 0 else 0
    return 2 * a * site.out_features + extra


def _dora_constant(sites: list) -> int:
    """Bytes the fused DoRA branches among `sites` keep whatever the batch: f = m / norm and the
    norm, (out,) each in the adapter dtype."""
    return sum(2 * s.dtype.itemsize * s.out_features for s in sites if s.dora and s.fused)


def _layer_bytes(arch: Arch, e: int, full: bool, sites: list, grad_in: bool,
                 lean_mlp: bool) -> tuple[int, bool]:
    """(bytes per token one decoder layer saves, whether its output needs a grad), see the module
    docstring. `sites`: its LoRA sites; `grad_in`: the layer's input needs a grad; `lean_mlp`: the
    MLP runs through `fast.swiglu.SiluMul`. An op saves for backward only when one of its inputs needs
    a grad, so a layer saves nothing before its first trainable tensor."""
    if not arch.exact:
        own, _ = _branch_bytes(sites)
        return (16 * e + 2) * arch.hidden + own, True
    h, inter = arch.hidden, arch.intermediate
    hq, hkv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    by_name: dict[str, list] = {}
    for site in sites:
        by_name.setdefault(site.path.rsplit(".", 1)[-1], []).append(site)

    def trains(names):
        return full or any(n in by_name for n in names)

    def linears(names, features):  # own bytes, bytes of x if some user saves it
        own, uses_x = _branch_bytes([s for n in names for s in by_name.get(n, [])])
        return own, e * features if uses_x or full else 0

    norm = 4 * h + 4  # fp32 input (or its upcast copy) and rsqrt, when the input needs a grad
    total = (norm if grad_in else 0) + (e * h if full else 0)
    g = grad_in or full
    own, x = linears(_ATTN_IN, h)
    total += own + x
    g_attn = g or trains(_ATTN_IN)
    total += (e * (2 * hq + 2 * hkv) + 4 * arch.heads) if g_attn else 0
    own, x = linears(_ATTN_OUT, hq)
    total += own + (0 if g_attn else x)  # SDPA already saved its output
    g = g_attn or trains(_ATTN_OUT)
    total += (norm if g else 0) + (e * h if full else 0)
    g = g or full
    own, x = linears(_MLP_IN, h)
    total += own + x
    g_gate, g_up = g or trains(_MLP_IN[:1]), g or trains(_MLP_IN[1:])
    if lean_mlp:  # SiluMul saves gate, and up when gate needs a grad
        total += e * inter * ((g_gate or g_up) + g_gate)
    else:  # silu saves gate; gate*up saves up and/or silu
        total += e * inter * (2 * g_gate + g_up)
    own, x = linears(_MLP_ACT, inter)
    total += own + x
    known = _ATTN_IN + _ATTN_OUT + _MLP_IN + _MLP_ACT
    rest, _ = _branch_bytes([s for n, v in by_name.items() if n not in known for s in v])
    return total + rest, g or g_gate or g_up or trains(_MLP_ACT)


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
                lora_sites: list, lean_mlp: bool = False) -> Activations:
    """Activation bytes for `batch` sequences of `seq` tokens (module docstring).

    `full`: every base weight trains; `input_grad`: the embeddings' output needs a gradient (full
    fine-tuning, prompt tuning); `lora_sites`: the model's LoRA-wrapped layers (`LoraSite`);
    `lean_mlp`: the MLPs run through `fast.swiglu.SiluMul` (`peftkit.fast`).
    """
    tokens = batch * seq
    by_layer: dict[int | None, list] = {}
    for site in lora_sites:
        by_layer.setdefault(targets.layer_index(site.path, None), []).append(site)
    per_layer, grad, rotary = [], input_grad, False
    for i in range(arch.layers):
        sites = by_layer.get(i, [])
        rotary = rotary or grad or full or any(
            s.path.rsplit(".", 1)[-1] in _ATTN_IN[:2] for s in sites)
        saved, grad = _layer_bytes(arch, e, full, sites, grad, lean_mlp)
        per_layer.append(tokens * saved + _dora_constant(sites))
    h = arch.hidden
    if arch.exact:  # final norm, embedding indices, rotary cos/sin
        fixed = tokens * ((4 * h + 4 if grad else 0) + (2 * e * h + 8 if full else 0))
        fixed += 2 * seq * arch.head_dim * e if rotary else 0
    else:
        fixed = tokens * e * h
    own, uses_x = _branch_bytes(by_layer.get(None, []))
    fixed += tokens * (own + (e * h if uses_x and not full else 0))
    fixed += _dora_constant(by_layer.get(None, []))
    return Activations(
        layers=sum(per_layer),
        largest_layer=max(per_layer),
        fixed=fixed,
        checkpoints=arch.layers * (tokens * e * h + CPU_RNG_STATE),
    )
