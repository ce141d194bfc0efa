"""LoRA training step, peftkit vs Hugging Face PEFT (+ transformers), side by side.

Every (case, variant) runs in a fresh Python process; within a repeat the variants alternate
(peft, library-loop, library-trainer, peftkit-train, then again), so slow phases of a shared
machine hit all.
Each process loads the model, injects the same LoRA config with the same seed, and runs
`warmup + steps` AdamW steps on the same random tokens (labels = inputs). It reports:

- step time: the median over the measured steps (forward, backward, optimizer step);
- tokens/s: batch x sequence / median step time;
- CPU time: the process's CPU seconds per step (median), steadier than wall time on a machine
  shared with other jobs;
- peak training memory: on CPU the peak RSS during the steps minus the RSS of the loaded,
  wrapped model (weights copied to anonymous memory, `malloc_trim`, then the high-water mark
  reset through /proc/self/clear_refs before the first step); on CUDA `max_memory_allocated`
  minus the allocation before the first step.

Variants, each the seed's recipe (`get_peft_model`, then training steps) through one path:
`peft` runs Hugging Face PEFT in a plain loop (`model(input_ids=..., labels=...).loss`, backward,
AdamW); `library-loop` runs peftkit's `get_peft_model` model (its speed layer on, `peftkit.fast`)
in that same loop; `library-trainer` runs it through a stock transformers `Trainer`'s
`training_step` (forward and backward as the Trainer does them, then the AdamW step);
`peftkit-train` through `peftkit train`'s `AdapterTrainer.training_step`.

    python benchmarks/lora_step.py --cases target,dropout0 --steps 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

VARIANTS = ("peft", "library-loop", "library-trainer", "peftkit-train")
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]

# name: (model, dtype, targets, dropout, batch, seq, variants)
CASES = {
    "target": ("smollm2", "float32", QKVO, 0.05, 8, 256, VARIANTS),
    "dropout0": ("smollm2", "float32", QKVO, 0.0, 8, 256, VARIANTS),
    "all-linear": ("smollm2", "float32", "all-linear", 0.05, 4, 256, VARIANTS),
    # bf16 on a CPU without AVX512-BF16 is slow: at 4x256, PEFT had not finished 4 steps after 13
    # minutes (fp32: about 9 s a step), so a smaller batch there; bf16-4x256 where it is fast
    "bf16": ("smollm2", "bfloat16", QKVO, 0.05, 1, 128, ("peft", "library-loop")),
    "bf16-4x256": ("smollm2", "bfloat16", QKVO, 0.05, 4, 256, VARIANTS),
    "qlora": ("smollm2-nf4", "float32", QKVO, 0.05, 4, 128, VARIANTS),
    "tiny": ("tiny-llama", "float32", QKVO, 0.05, 2, 16, VARIANTS),  # a smoke test
    **{f"seq{t}": ("smollm2", "float32", QKVO, 0.05, 1, t, ("peft", "library-loop"))
       for t in (128, 256, 512, 1024)},
    **{f"llama-seq{t}": ("llama-random", "float32", QKVO, 0.05, 1, t,
                         ("peft", "library-loop")) for t in (128, 512, 1024)},
}
# A larger random Llama (about 0.5B parameters) for the sequence-length sweep.
LLAMA_RANDOM = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                    num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=4,
                    max_position_embeddings=2048, tie_word_embeddings=False)


# -- one run, in its own process --------------------------------------------------------------
def rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def load_model(name: str, dtype):
    import torch

    from peftkit import models

    if name == "smollm2":
        return models.load_default(dtype=dtype)[0]
    if name == "smollm2-nf4":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(models.default_model_path(), dtype=dtype,
                                                    quantization_config=quant, device_map="cpu")
    if name == "tiny-llama":
        return models.tiny_llama(0).to(dtype)
    if name == "llama-random":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(**LLAMA_RANDOM)).to(dtype)
    raise ValueError(name)


def run_one(case: str, variant: str, steps: int, warmup: int, device: str) -> dict:
    import torch

    model_name, dtype_name, targets, dropout, batch, seq, _ = CASES[case]
    dtype = getattr(torch, dtype_name)
    model = load_model(model_name, dtype).to(device)
    with torch.no_grad():  # weights in anonymous memory: file-backed pages of a memory-mapped
        for p in model.parameters():  # checkpoint come and go with the page cache
            p.data = p.data.clone()
    kw = dict(r=16, lora_alpha=32, lora_dropout=dropout, target_modules=targets,
              task_type="CAUSAL_LM")
    torch.manual_seed(0)
    if variant == "peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(**kw))
    else:
        import peftkit

        model = peftkit.get_peft_model(model, peftkit.LoraConfig(**kw))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=g).to(device)

    if variant in ("library-trainer", "peftkit-train"):
        import tempfile

        from transformers import Trainer, TrainingArguments

        from peftkit.train.trainer import AdapterTrainer

        trainer_cls = Trainer if variant == "library-trainer" else AdapterTrainer
        trainer = trainer_cls(model=model, args=TrainingArguments(
            output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=device == "cpu"))
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop
        inputs = {"input_ids": ids, "labels": ids}

        def backward():  # the Trainer's forward and backward; returns the loss
            return trainer.training_step(trainer.model, inputs)
    else:
        def backward():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed
        base = rss_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    times, cpu_times, losses = [], [], []
    for i in range(warmup + steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mb("VmHWM") - base
    step = statistics.median(times)
    return dict(case=case, variant=variant, step_s=step, cpu_s=statistics.median(cpu_times),
                tokens_s=batch * seq / step, peak_mb=peak, times=times, losses=losses)


# -- the driver -------------------------------------------------------------------------------
def spawn(case: str, variant: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, variant,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--device", args.device]
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}/{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def describe(case: str) -> str:
    model, dtype, targets, dropout, batch, seq, _ = CASES[case]
    t = "q,k,v,o" if targets == QKVO else targets
    return f"{model} {dtype}, r=16 {t}, dropout {dropout}, {batch}x{seq}"


def table(results: list[dict]) -> str:
    rows = ["| case | variant | step time (s) | tokens/s | CPU time (s) | peak training memory (MB) "
            "| time / PEFT | CPU time / PEFT | memory / PEFT |", "|---|---|---|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in results):
        by_variant = {}
        for r in results:
            if r["case"] == case:
                by_variant.setdefault(r["variant"], []).append(r)
        merged = {v: {k: statistics.median(x[k] for x in rs) for k in ("step_s", "cpu_s", "peak_mb")}
                  for v, rs in by_variant.items()}
        ref = merged.get("peft")
        _, _, _, _, batch, seq, _ = CASES[case]
        for v, m in merged.items():
            ratios = [f"{m[k] / ref[k]:.2f}x" if ref else "" for k in ("step_s", "cpu_s", "peak_mb")]
            rows.append(f"| {describe(case)} | {v} | {m['step_s']:.2f} | "
                        f"{batch * seq / m['step_s']:.0f} | {m['cpu_s']:.1f} | {m['peak_mb']:,.0f} | "
                        + " | ".join(ratios) + " |")
    return "\n".join(rows)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="target,dropout0,seq128,seq512,seq1024",
                        help="comma-separated; CASE*N runs that case N times (medians shown)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each case without *N")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", help="write the table (and how it was made) to this file")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_one(*args.worker, args.steps, args.warmup, args.device)))
        return
    plan = []
    for item in args.cases.split(","):
        case, star, n = item.partition("*")
        if case not in CASES or (star and not n.isdigit()):
            parser.error(f"--cases: {item!r} is not CASE or CASE*N; cases: {', '.join(CASES)}")
        plan.append((case, int(n) if star else args.repeats))
    results = []
    start = time.time()
    for case, repeats in plan:
        for _ in range(repeats):
            for variant in CASES[case][6]:
                r = spawn(case, variant, args)
                print(f"{case:10s} {variant:20s} {r['step_s']:7.2f} s  {r['cpu_s']:7.1f} cpu-s  "
                      f"{r['peak_mb']:8,.0f} MB  losses {['%.4f' % x for x in r['losses']]}",
                      flush=True)
                results.append(r)
        if args.write:  # after every case, so a cut-short run still leaves its table
            write(args, plan, results, time.time() - start)
    print(table(results))


def write(args, plan: list[tuple[str, int]], results: list[dict], seconds: float) -> None:
    command = "python " + " ".join(["benchmarks/lora_step.py"] + sys.argv[1:])
    other = ", ".join(f"{case}: {n}" for case, n in plan if n != args.repeats)
    repeats = f"{args.repeats} fresh process" + (f" ({other})" if other else "")
    with open(args.write, "w") as f:
        f.write(HEADER.format(command=command, machine=machine(), device=args.device,
                              steps=args.steps, warmup=args.warmup, repeats=repeats,
                              minutes=seconds / 60, table=table(results)))


HEADER = """# Benchmarks: LoRA training step, peftkit vs Hugging Face PEFT

Produced by one run of

    {command}

Machine: {machine}; device `{device}`.
{repeats} per case and variant (the table shows medians over them), variants alternating;
{warmup} warm-up step, then the median of {steps} measured steps (AdamW, lr 1e-4, r=16,
lora_alpha=32, random tokens with labels = inputs). The run took {minutes:.0f} minutes.

Peak training memory: the peak RSS during the steps above the RSS of the loaded model with its
adapters (weights copied to anonymous memory and `malloc_trim` before the baseline; on CUDA:
`max_memory_allocated` above the allocation before the first step).

{table}
"""


if __name__ == "__main__":
    main()
