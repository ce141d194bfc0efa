"""`peftkit train` end to end: options -> inputs checked (data tokenized, checkpoint read) ->
model + method -> Trainer -> adapter + summary -> optional extras.

Files in the output directory: the adapter (PEFT layout) or, for `--method full`, the whole
model; for a LoRA init that changes the base (PiSSA, OLoRA) the adapter converted to plain LoRA
and the init in `initial_adapter/` (`methods.pissa.start_run`); the tokenizer; `checkpoint-N/`
folders; `metrics.jsonl`; `run_summary.json`; then `loss_curve.png` when matplotlib is
installed. Under torchrun every rank trains and only rank 0
writes.

The output dir belongs to one run at a time (`outdir.claim`, held by rank 0). `--overwrite`
moves the previous run's files aside (`outdir.move_aside`); they are deleted after this run's
first complete checkpoint, or at its end.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import random
import time

import torch
from transformers import TrainerCallback

from .. import outdir
from ..checkpoint import atomic_write_text
from ..fast.dtype import training_dtype
from ..methods import pissa, registry
from ..model import PeftModel
from ..prepare import prepare_model_for_kbit_training
from . import fsdp, inputs, loading, options
from .checkpoints import is_complete, last_complete_checkpoint
from .examples import Collator, load_examples, pack
from .metrics import (
    SUMMARY,
    JsonlLogger,
    LogAtCheckpoints,
    available_report_to,
    draw_loss_curve,
    loss_before,
    run_loss,
)
from .trainer import AdapterTrainer


def _main_process() -> bool:
    """True but in torchrun's ranks other than 0: the process that holds the output dir."""
    return os.environ.get("RANK", "0") == "0"


def hold_output_dir(args: argparse.Namespace):
    """`outdir.claim` of `args.output_dir` for this run; under torchrun only rank 0 holds it
    (the ranks share the folder)."""
    if args.output_dir and _main_process():
        return outdir.claim(args.output_dir, "peftkit train")
    return contextlib.nullcontext()


class DropReplaced(TrainerCallback):
    """Deletes what `--overwrite` moved aside once this run has a complete checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            outdir.drop_replaced(args.output_dir)


def check_output_dir(args: argparse.Namespace) -> tuple[str | None, bool]:
    """Refuse a non-empty output dir unless --overwrite/--resume; return (the checkpoint to
    resume from or None, whether this `--overwrite` run holds old files moved aside, to delete
    after its first complete save: rank 0 only)."""
    out = args.output_dir
    if args.resume:
        if args.resume is not True:
            if not is_complete(args.resume):
                raise ValueError(f"{args.resume} is not a complete checkpoint")
            return args.resume, False
        found = last_complete_checkpoint(out)
        if found is None:
            raise ValueError(f"--resume: no complete checkpoint-N folder in {out}")
        return found, False
    if not _main_process():
        return None, False
    if os.path.isdir(out) and os.listdir(out):
        if not args.overwrite:
            raise ValueError(f"output directory {out} exists and is not empty; pass --overwrite "
                             "to replace its contents or --resume to continue its last checkpoint")
        outdir.move_aside(out)
        print(f"peftkit train: --overwrite: the previous contents of {out} are in "
              f"{outdir.sibling(out, 'replaced')} until this run's first checkpoint", flush=True)
    # An --overwrite run takes over what an earlier, unfinished --overwrite run moved aside.
    return None, bool(args.overwrite) and os.path.lexists(outdir.sibling(out, "replaced"))


DTYPE_ENV = "PEFTKIT_DTYPE"


def base_dtype(choice: str) -> torch.dtype:
    """The base model's dtype for `--dtype`, said in the log: `auto` takes $PEFTKIT_DTYPE
    (float32 or bfloat16) when set, else `fast.dtype.training_dtype`'s choice for this machine."""
    forced = os.environ.get(DTYPE_ENV)
    if choice == "auto" and forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"{DTYPE_ENV}={forced!r}: use float32 or bfloat16")
        dtype, why = getattr(torch, forced), f"${DTYPE_ENV}"
    elif choice == "auto":
        dtype, why = training_dtype()
    else:
        dtype, why = getattr(torch, choice), "--dtype"
    if _main_process():
        print(f"peftkit train: dtype {str(dtype).removeprefix('torch.')} ({why})", flush=True)
    return dtype


def _split(data, fraction: float, seed: int):
    order = list(range(len(data.examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(fraction * len(order)))
    if n_eval >= len(order):
        raise ValueError(f"--eval-split {fraction} leaves no training rows")
    pick = lambda idx: [data.examples[i] for i in sorted(idx)]  # noqa: E731
    return pick(order[n_eval:]), pick(order[:n_eval])


def _training_arguments(args: argparse.Namespace, has_eval: bool):
    from transformers import TrainingArguments

    def strategy(steps):
        return ("steps", steps) if steps else ("epoch", None)

    save_strategy, save_steps = strategy(args.save_steps)
    eval_strategy, eval_steps = strategy(args.eval_steps) if has_eval else ("no", None)
    # transformers 5 renamed gradient_checkpointing (the old name still works, with a warning).
    fields = TrainingArguments.__dataclass_fields__
    checkpointing = next(n for n in ("activation_checkpointing", "gradient_checkpointing")
                         if n in fields)
    return TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size or args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        lr_scheduler_type=args.lr_scheduler,
        max_grad_norm=args.max_grad_norm,
        fp16=args.fp16,
        bf16=args.bf16,
        **{checkpointing: args.gradient_checkpointing},
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        include_num_input_tokens_seen="non_padding",  # logged: tokens/s in `peftkit ui`
        eval_strategy=eval_strategy,
        eval_steps=eval_steps,
        save_strategy=save_strategy,
        save_steps=save_steps,
        save_total_limit=args.save_total_limit,
        label_names=["labels"],
        remove_unused_columns=False,
        report_to=args.report_to,
        # Without an accelerator, accelerate must be told CPU to run torchrun ranks as DDP (gloo).
        use_cpu=not torch.accelerator.is_available(),
        dataloader_pin_memory=torch.accelerator.is_available(),
    )


def _status_mb(field: str) -> float | None:
    """A Linux /proc/self/status memory field (VmRSS, VmHWM) in MiB; None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return None


def _release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's `malloc_trim`; a no-op elsewhere).
    Loading can free large buffers that glibc keeps resident (a 4-bit base quantized from fp32
    weights): without this the resident set at `PeakMemory.start` counts them, and training reuses
    them unseen, so the two figures split one amount differently from run to run."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory of the process from `start()` on, and its level at `start()`: CUDA allocated
    bytes when on GPU, else the resident set (Linux VmRSS, after returning the heap's free pages
    to the OS; the high-water mark VmHWM is reset through /proc/self/clear_refs)."""

    def start(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated() / 2**20
            return
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
        except OSError:
            pass
        self.at_start = _status_mb("VmRSS")

    def read(self) -> dict:
        if torch.cuda.is_available():
            peak, kind = torch.cuda.max_memory_allocated() / 2**20, "cuda_max_allocated"
        else:
            peak = _status_mb("VmHWM")
            kind = "process_peak_rss" if peak is not None else "unavailable"
        return {"peak_memory_mb": peak, "memory_at_start_mb": self.at_start,
                "peak_memory_kind": kind}


def train(args: argparse.Namespace) -> dict:
    """Run training as `args` (checked by `options.resolve`) says; return the run summary (also
    written to run_summary.json)."""
    with contextlib.ExitStack() as held:
        return _train(args, held)


def _train(args: argparse.Namespace, held: contextlib.ExitStack) -> dict:
    from transformers import set_seed

    # Every input is read and checked before the output dir is claimed and before the model
    # loads, so a bad one costs seconds and changes nothing.
    spec, method_opts = registry.resolve(args.method, options.method_options(args))
    fsdp.check_options(args, spec)
    inputs.check_output_path(args.output_dir)
    inputs.check_model(args.model)
    args.report_to = available_report_to(args.report_to)
    config = spec.build_config({**method_opts,
                                "tokenizer_name_or_path": loading.model_path(args.model)})
    if pissa.mutates_base(config):  # the run ends converting the adapter (`pissa.finish_run`)
        pissa.check_convertible(config)
    tokenizer = loading.load_tokenizer(loading.model_path(args.model))
    data = load_examples(args.data, tokenizer, args.max_length)
    eval_data, test_data = (load_examples(path, tokenizer, args.max_length) if path else None
                            for path in (args.eval_data, args.test_data))
    train_rows, eval_rows = data.examples, None
    notes = list(data.notes)
    if eval_data:
        eval_rows, notes = eval_data.examples, notes + eval_data.notes
    elif args.eval_split:
        train_rows, eval_rows = _split(data, args.eval_split, args.seed)
    if args.packing:
        train_rows = pack(train_rows, args.max_length)
        notes.append(f"packed {len(data.examples)} rows into {len(train_rows)} sequences")
    held.enter_context(hold_output_dir(args))
    resume, moved_aside = check_output_dir(args)
    if resume:
        inputs.check_checkpoint(resume)
    resumed_loss = loss_before(resume)

    set_seed(args.seed)
    load_kwargs = {"dtype": base_dtype(args.dtype),
                   **spec.load_kwargs(method_opts, sharded=args.fsdp)}
    model = loading.load_model(args.model, **load_kwargs)
    if spec.kbit_base:  # checkpointing follows --gradient-checkpointing
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config is not None:
        if args.gradient_checkpointing:
            model.enable_input_require_grads()
        model = pissa.start_run(model, config, args.output_dir, resume, _main_process())

    training_args = _training_arguments(args, eval_rows is not None)
    if training_args.should_save:
        for note in notes:
            print(f"peftkit train: {note}", flush=True)
    trainable, total = _count_parameters(model)  # before sharding changes parameter types
    if args.fsdp:
        fsdp.shard(model, layers=args.fsdp_transformer_layer_cls_to_wrap,
                   reshard_after_forward=args.fsdp_reshard_after_forward,
                   cpu_offload=args.fsdp_cpu_offload)
    trainer_cls = fsdp.ShardedTrainer if args.fsdp else AdapterTrainer
    trainer = trainer_cls(
        model=model, args=training_args, train_dataset=train_rows, eval_dataset=eval_rows,
        data_collator=Collator(tokenizer.pad_token_id), processing_class=tokenizer,
        callbacks=[JsonlLogger(args.output_dir), LogAtCheckpoints()]
        + ([DropReplaced()] if moved_aside else []),
        fused_loss=args.fused_loss, loraplus_lr_ratio=method_opts.get("loraplus_lr_ratio"),
    )
    memory = PeakMemory()
    memory.start()
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    wall = time.perf_counter() - started
    peak_memory = memory.read()
    metrics = {"train_loss": run_loss(result.training_loss, trainer.state.global_step,
                                        resumed_loss)}
    if eval_rows is not None:
        metrics.update({k: v for k, v in trainer.evaluate().items()
                        if k in ("eval_loss", "epoch")})
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        pissa.finish_run(config, args.output_dir)
    if test_data and trainer.is_world_process_zero():
        metrics.update(_test_metrics(model.eval(), tokenizer, test_data, args))
        if args.forgetting:
            metrics["forgetting_kl"] = _forgetting(model, tokenizer, args, load_kwargs,
                                                   config)

    summary = {
        "method": args.method, "model": args.model or "SmolLM2-135M-Instruct",
        "data": args.data, "format": data.fmt, "train_rows": len(data.examples),
        "truncated_rows": data.truncated, "dropped_rows": data.dropped,
        "trainable_params": trainable, "all_params": total,
        "trainable_percent": 100 * trainable / total,
        "steps": trainer.state.global_step, "world_size": training_args.world_size,
        "wall_time_s": wall, **peak_memory, "final_metrics": metrics,
        "resumed_from": resume,
    }
    if trainer.is_world_process_zero():
        atomic_write_text(os.path.join(args.output_dir, SUMMARY),
                          json.dumps(summary, indent=2) + "\n")
        if moved_aside:
            outdir.drop_replaced(args.output_dir)
        print(format_summary(summary), flush=True)
        draw_loss_curve(args.output_dir)  # optional, so only after the run is saved
    return summary


def _test_metrics(model, tokenizer, data, args: argparse.Namespace) -> dict:
    from .evaluate import evaluate_examples

    result = evaluate_examples(model, tokenizer, data, args.eval_batch_size or args.batch_size,
                               args.max_new_tokens)
    return {"test_exact_match": result["exact_match"], "test_loss": result["loss"],
            "test_rows": result["n"]}


def _forgetting(model, tokenizer, args: argparse.Namespace, load_kwargs: dict,
                config=None) -> float:
    """`forgetting.measure`; full fine-tuning, and a LoRA init that changed the base (PiSSA,
    OLoRA: the disabled adapter gives the residual base), reload the untouched model to compare
    with."""
    from .forgetting import measure

    untouched = None
    if not isinstance(model, PeftModel) or pissa.mutates_base(config):
        untouched = loading.load_model(args.model, **load_kwargs).eval()
    return measure(model, tokenizer, untouched, args.eval_batch_size or args.batch_size)


def _count_parameters(model) -> tuple[int, int]:
    if isinstance(model, PeftModel):
        return model.get_nb_trainable_parameters()
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def format_summary(s: dict) -> str:
    metrics = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in s["final_metrics"].items())
    memory = ("n/a" if s["peak_memory_mb"] is None
              else f"{s['peak_memory_mb']:.0f} MiB ({s['peak_memory_kind']})")
    return "\n".join([
        f"trainable params: {s['trainable_params']:,d} || all params: {s['all_params']:,d} || "
        f"trainable%: {s['trainable_percent']:.4f}",
        f"steps: {s['steps']}  wall time: {s['wall_time_s']:.1f} s  peak memory: {memory}",
        f"final metrics: {metrics}",
    ])
