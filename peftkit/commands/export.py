"""`peftkit export`: turn an adapter into what a serving engine loads.

  --format gguf-lora  OUT/adapter.gguf (llama.cpp LoRA GGUF) + OUT/Modelfile (Ollama FROM/ADAPTER)
  --format gguf       OUT/model.gguf (merged model) + OUT/Modelfile
  --format vllm       OUT as a PEFT adapter folder vLLM loads + OUT/serve.sh (`vllm serve ...`)

The GGUF formats read the base model's GGUF (`--base-gguf`; default: the embedded SmolLM2's own,
for adapters trained on it), never the base path recorded at training time. What a target cannot
take is refused with the way out (`peftkit doctor --adapter DIR` lists it for every target).
The output folder is held and replaced in one rename (`peftkit.outdir`).
"""

from __future__ import annotations

import argparse
import os

from ..errors import UserError

HUB_IDS = {"SmolLM2-135M-Instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def register(subparsers) -> None:
    from ..export import FORMATS
    from ..export.gguf_lora import OUTTYPES

    p = subparsers.add_parser("export", help="export an adapter for llama.cpp, Ollama or vLLM",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--outtype", default="f16", choices=OUTTYPES,
                   help="GGUF tensor type (default f16; q8_0 stores rows shorter than 32 as f16)")
    p.add_argument("--base-gguf", help="GGUF of the base model (default: the embedded SmolLM2's "
                                       "for adapters trained on it)")
    p.add_argument("--base-model", help="vllm: the model `vllm serve` loads (default: the "
                                        "adapter's base, as a Hub id)")
    p.add_argument("--name", default="adapter", help="vllm: the served adapter's name")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=run)


def _base_name(adapter) -> str | None:
    return adapter.raw.get("base_model_name_or_path")


def _base_gguf(args, adapter):
    from .. import models
    from ..export.base_gguf import BaseGGUF

    if args.base_gguf:
        return BaseGGUF(args.base_gguf)
    base = _base_name(adapter)
    if base not in (models.DEFAULT_MODEL, HUB_IDS[models.DEFAULT_MODEL]):
        raise UserError(f"the adapter's base model is {base!r}, not the embedded "
                        f"{models.DEFAULT_MODEL}; pass --base-gguf with the base model's GGUF "
                        "(llama.cpp's convert_hf_to_gguf.py makes one)")
    return BaseGGUF(models.default_gguf_path())


def run(args) -> int:
    from .. import outdir
    from ..export import adapter as adapters

    out = os.path.abspath(args.out)
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"--out {args.out} is a file; give a folder path")
    adapter = adapters.Adapter.load(args.adapter)
    found = adapters.blockers(adapter, args.format)
    if found:
        raise UserError(f"{args.adapter} cannot be exported as {args.format}:\n  - "
                        + "\n  - ".join(found))
    with outdir.claim(out, "peftkit export"):
        if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
            raise UserError(f"{args.out} exists and is not empty; pass --overwrite to replace it")
        with outdir.publish(out) as tmp:
            lines = _write(args, adapter, tmp, out)
    print("\n".join(lines))
    return 0


def _write(args, adapter, tmp: str, out: str) -> list[str]:
    from ..export import gguf_lora, gguf_model, vllm

    folds = adapter.folds()
    if args.format == "vllm":
        base = args.base_model or HUB_IDS.get(_base_name(adapter), _base_name(adapter))
        if not base:
            raise UserError("the adapter config names no base model; pass --base-model")
        done = vllm.write(adapter, tmp, base, args.name, out)
        with open(os.path.join(tmp, "serve.sh"), "w", encoding="utf-8") as fh:
            fh.write(done["command"] + "\n")
        lines = [f"wrote a vLLM adapter folder to {out} (rank {done['rank']})"]
        if done["over_default_rank"]:
            lines.append(f"note: rank {done['rank']} is above vLLM's default --max-lora-rank "
                         f"{vllm.DEFAULT_MAX_LORA_RANK}; the line below raises it")
        return lines + _folded(folds) + [f"serve with: {done['command']}"]
    base = _base_gguf(args, adapter)
    if args.format == "gguf-lora":
        done = gguf_lora.write(adapter, base, os.path.join(tmp, "adapter.gguf"), args.outtype)
        text = gguf_model.modelfile(base, base.path, "./adapter.gguf")
        lines = [f"wrote {out}/adapter.gguf ({done['modules']} LoRA pairs, alpha "
                 f"{done['alpha']:g}, {'/'.join(done['types'])}) for {base.path}"]
        if len(done["types"]) > 1:
            lines.append("note: q8_0 needs rows of 32 values; the shorter lora_b rows are f16")
        run_line = f"llama-cli -m {base.path} --lora {out}/adapter.gguf"
    else:
        done = gguf_model.write(adapter, base, os.path.join(tmp, "model.gguf"), args.outtype)
        text = gguf_model.modelfile(base, "./model.gguf")
        lines = [f"wrote {out}/model.gguf ({args.outtype}; {len(done['merged'])} of "
                 f"{done['tensors']} tensors changed by the adapter), merged into {base.path}"]
        run_line, folds = f"llama-cli -m {out}/model.gguf", []
    with open(os.path.join(tmp, "Modelfile"), "w", encoding="utf-8") as fh:
        fh.write(text)
    return lines + _folded(folds) + [
        f"run with: {run_line}", f"or: ollama create NAME -f {out}/Modelfile && ollama run NAME"]


def _folded(folds: list[str]) -> list[str]:
    return [f"folded into the tensors: {', '.join(folds)}"] if folds else []
