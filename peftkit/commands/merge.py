"""`peftkit merge`: fold an adapter into its base model and save a plain transformers model
(weights, config, generation config, tokenizer) that `AutoModelForCausalLM` loads."""

from __future__ import annotations

import os

from .common import user_errors


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--model", help="base model (default: the one named in the adapter config)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true", help="write into an existing folder")
    p.set_defaults(func=_run)


@user_errors
def _run(args) -> int:
    from ..train.loading import load_for_inference

    if os.path.isdir(args.output_dir) and os.listdir(args.output_dir) and not args.overwrite:
        raise ValueError(f"{args.output_dir} exists and is not empty; pass --overwrite")
    model, tokenizer = load_for_inference(args.adapter, args.model)
    merged = model.merge_and_unload()
    merged.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"merged {args.adapter} into {merged.name_or_path}; saved to {args.output_dir}")
    return 0
