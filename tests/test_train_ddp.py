"""`peftkit train` under torchrun: 2 CPU ranks (gloo) at batch b give the adapter 1 rank gives at
batch 2b. Measured difference: about 1.5e-8 on this tiny model; the test allows 1e-6."""

import json
import os
import shutil
import socket
import subprocess
import sys

import torch
from safetensors.torch import load_file

from peftkit import cli
from train_fixtures import tiny_model_dir


def test_two_ranks_match_one_rank_at_twice_the_batch(tmp_path):
    model = tiny_model_dir(str(tmp_path / "model"))
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["train", "--model", model, "--data", str(data), "--max-steps", "3",
              "--grad-accum", "1", "--learning-rate", "1e-2", "--logging-steps", "1",
              "--lora-dropout", "0"]  # dropout draws differ between 1 and 2 processes

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ddp = str(tmp_path / "ddp")
    proc = subprocess.run([torchrun, "--nproc_per_node=2", f"--master_port={port}", "-m", "peftkit.cli",
                           *common, "--batch-size", "2", "--output-dir", ddp],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("trainable params:") == 1  # only rank 0 reports
    summary = json.load(open(os.path.join(ddp, "run_summary.json")))
    assert summary["world_size"] == 2 and summary["steps"] == 3

    single = str(tmp_path / "single")
    assert cli.main([*common, "--batch-size", "4", "--output-dir", single]) == 0
    a = load_file(os.path.join(ddp, "adapter_model.safetensors"))
    b = load_file(os.path.join(single, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
