"""`peftkit merge`: fold an adapter into its base model and save a plain transformers model
(weights, config, generation config, tokenizer) that `AutoModelForCausalLM` loads. Before saving
it checks that the merged model's logits equal the adapted model's on a probe sentence, within
the rounding of the coarsest dtype either model computes in (`tolerance`).

The output folder is held (`outdir.claim`) from the start, and written to a temporary sibling
that replaces it in one rename (`outdir.publish`): a crash leaves the old folder or the new one."""

from __future__ import annotations

import os

import torch

from ..quant import kbit_load_kwargs

PROBE = "Merging must not change what the model computes."


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--model", help="base model (default: the one named in the adapter config)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="write into an existing folder")
    p.add_argument("--dequantize", action="store_true",
                   help="QLoRA: load the base in 4-bit as it was trained, merge into its "
                        "dequantized weights and save full precision (default: merge into the "
                        "full-precision base)")
    p.add_argument("--quant-type", default="nf4", choices=["nf4", "fp4"],
                   help="4-bit type of the base with --dequantize (default nf4)")
    p.set_defaults(func=_run)


def tolerance(dtypes: set[torch.dtype]) -> float:
    """The largest relative logit difference (max |diff| / max |logit|) the merge check accepts
    when the two models compute in `dtypes`; the coarsest one decides.

    The merged model rounds W + scaling * B @ A into one weight where the adapted model adds two
    matmuls (and, with --dequantize, the base matmul runs in bnb's compute dtype), so their logits
    differ by rounding that each layer passes on. Measured on SmolLM2 (30 layers, LoRA r=16 on
    q,k,v,o): fp32 8e-7, 4-bit fp32-compute 4e-6, so 1e-4 for fp32; 4-bit bf16-compute (CUDA's
    default) 2.1e-2 = 2.7 eps(bf16), fp16-compute 1.9e-3 = 2.0 eps(fp16). 8 eps (bf16 6.3e-2,
    fp16 7.8e-3) leaves 3-4x for deeper models. A merge that loses, doubles or transposes the
    delta moves the logits by the adapter's whole effect, so it is refused when that effect is
    larger than the tolerance; a smaller effect is within the dtype's rounding and cannot be
    told apart from it.
    """
    return max(max(1e-4, 8 * torch.finfo(dtype).eps) for dtype in dtypes)


def compute_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The dtypes `model`'s forward computes in: its floating-point parameters' and, for
    bitsandbytes layers, their matmuls' (4-bit: `compute_dtype`, else the input's; 8-bit: fp16)."""
    from ..quant import kbit_kind

    dtypes = {p.dtype for p in model.parameters() if p.dtype.is_floating_point}
    for module in model.modules():
        kind = kbit_kind(module)
        if kind == "8bit":
            dtypes.add(torch.float16)
        elif kind == "4bit" and getattr(module, "compute_dtype", None) is not None:
            dtypes.add(module.compute_dtype)
    return dtypes


def _run(args) -> int:
    from .. import outdir
    from ..train import inputs

    out = args.output_dir
    inputs.check_output_path(out)
    with outdir.claim(out, "peftkit merge"):
        if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
            raise ValueError(f"{out} exists and is not empty; pass --overwrite to replace it")
        merged, tokenizer = _merge(args)
        with outdir.publish(out) as tmp:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    print(f"merged {args.adapter} into {merged.name_or_path}; saved to {out}")
    return 0


def _merge(args):
    """(merged model, tokenizer), after the logit check."""
    from ..train.loading import load_for_inference

    load_kwargs = kbit_load_kwargs(args.quant_type) if args.dequantize else {}
    model, tokenizer = load_for_inference(args.adapter, args.model, **load_kwargs)
    probe = tokenizer(PROBE, return_tensors="pt").to(next(model.parameters()).device)
    dtypes = compute_dtypes(model)
    with torch.no_grad():
        expected = model(**probe).logits.float()
        merged = model.merge_and_unload(dequantize=args.dequantize)
        diff = (merged(**probe).logits.float() - expected).abs().max().item()
    relative = diff / expected.abs().max().item()
    limit = tolerance(dtypes | compute_dtypes(merged))
    print(f"merge check: max |logit difference| = {diff:.2e} ({relative:.1e} of the largest "
          f"logit; limit {limit:.0e})")
    if relative > limit:
        raise ValueError(f"the merged model's logits differ from the adapted model's by "
                         f"{relative:.1e} (relative), over {limit:.0e}; nothing saved")
    return merged, tokenizer
