"""`peftkit eval`: exact match of greedy generations and loss on a data file."""

from __future__ import annotations

import json

from ..train.ranges import positive_int
from .common import add_model_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="exact match and loss on a data file")
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="data file in any format `peftkit train` reads")
    p.add_argument("--batch-size", type=positive_int, default=16, help="rows per generation batch")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--max-length", type=positive_int, default=None, help="truncate rows (tokens)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="evaluate the first N rows only")
    p.add_argument("--quantize", choices=["nf4", "fp4"],
                   help="load the base in 4-bit (as a QLoRA adapter was trained)")
    p.add_argument("--show", type=int, default=0, help="print N (prompt, expected, got) rows")
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"exact_match", "loss", "n", ...}')
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..train.evaluate import evaluate
    from ..train.examples import check_data
    from ..train.loading import load_for_inference
    from ..quant import kbit_load_kwargs

    check_data(args.data)  # before the model loads
    load_kwargs = kbit_load_kwargs(args.quantize) if args.quantize else {}
    model, tokenizer = load_for_inference(args.adapter, args.model, **load_kwargs)
    result = evaluate(model, tokenizer, args.data, args.batch_size, args.max_new_tokens,
                      args.max_length, args.limit)
    shown = result.pop("predictions")[: args.show]
    if args.json:
        print(json.dumps({**result, "adapter": args.adapter, "model": args.model,
                          "data": args.data}))
        return 0
    for prompt, expected, got in shown:
        print(f"--- prompt: {prompt!r}\n    expected: {expected!r}\n    got:      {got!r}")
    print(f"exact_match: {result['exact_match']:.4f} ({round(result['exact_match'] * result['n'])}"
          f"/{result['n']})  loss: {result['loss']:.4f}")
    return 0
