"""`peftkit merge`: fold an adapter into its base model and save a plain transformers model
(weights, config, generation config, tokenizer) that `AutoModelForCausalLM` loads. Before saving
it checks that the merged model's logits equal the adapted model's on a probe sentence."""

from __future__ import annotations

import os

import torch

from ..train.methods import qlora_model_kwargs
from .common import user_errors

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


@user_errors
def _run(args) -> int:
    from ..train.loading import load_for_inference

    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise ValueError(f"{args.output_dir} exists and is not empty; pass --overwrite")
    load_kwargs = qlora_model_kwargs({"quant_type": args.quant_type}) if args.dequantize else {}
    model, tokenizer = load_for_inference(args.adapter, args.model, **load_kwargs)
    probe = tokenizer(PROBE, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        expected = model(**probe).logits.float()
        merged = model.merge_and_unload(dequantize=args.dequantize)
        diff = (merged(**probe).logits.float() - expected).abs().max().item()
    relative = diff / expected.abs().max().item()
    limit = 1e-4 if merged.dtype == torch.float32 else 2e-2
    print(f"merge check: max |logit difference| = {diff:.2e} ({relative:.1e} of the largest logit)")
    if relative > limit:
        raise ValueError(f"the merged model's logits differ from the adapted model's by "
                         f"{relative:.1e} (relative), over {limit:g}; nothing saved")
    merged.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"merged {args.adapter} into {merged.name_or_path}; saved to {args.output_dir}")
    return 0
