"""`peftkit estimate --gpus N --fsdp`: the per-GPU plan of `planner.sharded`, checked against
hand counts for Llama-2-7B with LoRA r=8 on q_proj,v_proj (bf16 base, fp32 adapters)."""

import json

from peftkit import cli

LAYER = (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) * 2 + 2 * (8 * 4096 + 4096 * 8) * 4
ROOT = (2 * 32000 * 4096 + 4096) * 2  # embeddings, output head, final norm
ADAPTER_GRADS = 2 * (8 * 4096 + 4096 * 8) * 4  # one layer's


def _estimate(capsys, *extra) -> dict:
    argv = ["estimate", "--model", "llama-2-7b", "--method", "lora", "--r", "8",
            "--target-modules", "q_proj,v_proj", "--batch-size", "1", "--seq-len", "512",
            "--gradient-checkpointing", "--json", *extra]
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_shards_gathered_units_and_offload(capsys):
    r = _estimate(capsys, "--gpus", "4", "--fsdp")
    b, f = r["bytes"], r["fsdp"]
    state = sum(b["weights"].values()) + b["gradients"] + b["optimizer_states"]
    assert f["shards"] == -(-state // 4)
    assert f["gathered_weights"] == ROOT + 2 * LAYER
    assert f["gathered_gradients"] == 2 * ADAPTER_GRADS
    assert f["per_gpu_total"] == f["shards"] + f["gathered_weights"] + f["peak_moment"]
    assert f["per_gpu_total"] < b["total"] / 2  # 4 GPUs: the 13.5 GB of weights are split

    off = _estimate(capsys, "--gpus", "4", "--fsdp", "--fsdp-cpu-offload")["fsdp"]
    assert off["per_gpu_total"] == f["per_gpu_total"] - f["shards"]
    assert off["per_process_cpu"] == f["shards"]


def test_fits_verdict_reads_the_per_gpu_total(capsys):
    argv = ["estimate", "--model", "llama-2-7b", "--method", "lora", "--gpu", "12GiB",
            "--batch-size", "1", "--seq-len", "256"]
    assert cli.main(argv) == 1  # 13.55 GiB on one GPU
    assert cli.main([*argv, "--gpus", "8", "--fsdp"]) == 0  # 3.77 GiB a GPU over 8
    assert "fits in 12.00 GiB" in capsys.readouterr().out
