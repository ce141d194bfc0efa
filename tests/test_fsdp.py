"""`peftkit train --fsdp` under torchrun: 2 CPU ranks (gloo) with the model sharded by FSDP2.

Reference: 1 process without sharding over the same global batch (2 ranks x 2 rows against
4 rows, 2 accumulation steps). Measured differences on this tiny Llama: LoRA 6e-8, full
fine-tuning 7e-8, bottleneck 6e-9, QLoRA 2.3e-7 (reduction order of the gradient average and of
the 4-bit dequantized matmuls); the tests allow 1e-5 (fp32). A resumed run replays the same
operations on the same shards, so it must match the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from peftkit import cli
from train_fixtures import tiny_model_dir

ATOL = 1e-5
STEPS = ["--max-steps", "4", "--save-steps", "2", "--grad-accum", "2", "--learning-rate", "1e-2",
         "--logging-steps", "1", "--save-total-limit", "2"]
DROPOUT_OFF = {"lora": ["--lora-dropout", "0"], "qlora": ["--lora-dropout", "0"]}
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}


def _launch(launcher: list[str], args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([TORCHRUN, *launcher, "-m", "peftkit.cli", "train", *args],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def _fsdp_train(args: list[str]) -> str:
    return _wait(_launch(["--nproc_per_node=2", f"--master_port={_port()}"],
                         [*args, "--batch-size", "2", "--fsdp"]))


def _weights(folder: str) -> dict[str, torch.Tensor]:
    name = next(n for n in ("adapter_model.safetensors", "model.safetensors")
                if os.path.exists(os.path.join(folder, n)))
    return load_file(os.path.join(folder, name))


def _assert_same(a_dir: str, b_dir: str, atol: float) -> None:
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    for key in a:  # full shapes: every shard is in the file
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "train.jsonl"
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, ["--model", tiny_model_dir(str(root / "model")), "--data", str(data), *STEPS]


@pytest.fixture(scope="module")
def runs(inputs):
    """method -> (sharded output dir, unsharded output dir), trained once per module."""
    root, common = inputs
    done = {}

    def run(method: str, *extra: str) -> tuple[str, str]:
        if method not in done:
            args = [*common, "--method", method, *DROPOUT_OFF.get(method, []), *extra]
            sharded, single = str(root / f"{method}-fsdp"), str(root / f"{method}-single")
            out = _fsdp_train([*args, "--output-dir", sharded])
            assert "LlamaDecoderLayer units and the root sharded over 2 processes" in out
            assert json.load(open(os.path.join(sharded, "run_summary.json")))["world_size"] == 2
            assert cli.main(["train", *args, "--batch-size", "4", "--output-dir", single]) == 0
            done[method] = sharded, single
        return done[method]

    return run


@pytest.mark.parametrize("method, extra", [
    ("lora", []), ("full", []), ("adapter", []), ("qlora", ["--gradient-checkpointing"])])
def test_two_ranks_match_one_process_in_every_save(runs, method, extra):
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    sharded, single = runs(method, *extra)
    for sub in ("checkpoint-2", "checkpoint-4", "."):
        _assert_same(os.path.join(sharded, sub), os.path.join(single, sub), ATOL)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_from_a_sharded_checkpoint_continues_exactly(runs, inputs, tmp_path, method):
    sharded, _ = runs(method)
    _, common = inputs
    resumed = str(tmp_path / "resumed")
    _fsdp_train([*common, "--method", method, *DROPOUT_OFF.get(method, []), "--output-dir",
                 resumed, "--resume", os.path.join(sharded, "checkpoint-2")])
    _assert_same(resumed, sharded, atol=0)


def test_merge_runs_on_the_sharded_run_s_adapter(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from peftkit import PeftModel

    sharded, _ = runs("lora")
    merged = str(tmp_path / "merged")
    assert cli.main(["merge", "--adapter", sharded, "--output-dir", merged]) == 0
    config = json.load(open(os.path.join(sharded, "adapter_config.json")))
    load = lambda path: AutoModelForCausalLM.from_pretrained(path).eval()  # noqa: E731
    base = config["base_model_name_or_path"]
    tuned = PeftModel.from_pretrained(load(base), sharded).eval()
    ids = torch.tensor([[8, 9, 10, 11, 12]])
    with torch.no_grad():
        want = tuned(input_ids=ids).logits
        got = load(merged)(input_ids=ids).logits
        untrained = load(base)(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    print("adapter moves the logits by", (want - untrained).abs().max().item())
    assert (want - untrained).abs().max() > 1e-3  # the adapter trained


def test_two_nodes_meet_at_a_localhost_rendezvous(runs, inputs, tmp_path):
    _, single = runs("lora")
    _, common = inputs
    out = str(tmp_path / "two-nodes")
    endpoint = f"127.0.0.1:{_port()}"
    nodes = [_launch(["--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
                      "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=i16"],
                     [*common, *DROPOUT_OFF["lora"], "--batch-size", "2", "--fsdp",
                      "--output-dir", out])
             for rank in (0, 1)]
    for node in nodes:
        _wait(node)
    assert json.load(open(os.path.join(out, "run_summary.json")))["world_size"] == 2
    _assert_same(out, single, ATOL)


@pytest.mark.parametrize("argv, env, message", [
    (["--deepspeed", "ds.json"], {}, "DeepSpeed is not supported"),
    ([], {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed is not supported"),
    (["--fsdp"], {}, "--fsdp shards the model over the processes of a torchrun launch"),
    (["--fsdp-cpu-offload"], {}, "--fsdp-cpu-offload applies to --fsdp only"),
    (["--fsdp", "--method", "prompt"], {"WORLD_SIZE": "2"}, "does not support --method prompt"),
    (["--fsdp", "--test-data", "t.jsonl"], {"WORLD_SIZE": "2"}, "--test-data generates"),
])
def test_refusals(tmp_path, monkeypatch, capsys, argv, env, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    out = tmp_path / "out"
    assert cli.main(["train", "--data", str(data), "--output-dir", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_yaml_fsdp_keys_are_read(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text("fsdp: true\nfsdp_reshard_after_forward: false\n"
                      "fsdp_transformer_layer_cls_to_wrap: [LlamaDecoderLayer]\n")
    from peftkit.train import options

    parsed = options.load_yaml(str(config))
    assert parsed == {"fsdp": True, "fsdp_reshard_after_forward": False,
                      "fsdp_transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}
    assert cli.main(["train", "--config", str(config), "--data", "x.jsonl", "--output-dir",
                     str(tmp_path / "out")]) == 2
    assert "torchrun launch" in capsys.readouterr().err


def _save_sharded(rank: int, world: int, root: str) -> None:
    """One of 2 gloo ranks: save the adapter unsharded (rank 0), shard the model with FSDP2, run
    a forward and call `save_pretrained` directly, on every rank."""
    import torch.distributed as dist

    import peftkit
    from peftkit import models
    from peftkit.train.fsdp import shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{root}/rendezvous", rank=rank,
                            world_size=world)
    try:
        config = peftkit.LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                    init_lora_weights=False)
        torch.manual_seed(0)
        model = peftkit.get_peft_model(models.tiny_llama(0), config)
        model.add_adapter("other", peftkit.LoraConfig(r=2, target_modules=["v_proj"],
                                                      init_lora_weights=False))
        if rank == 0:
            model.save_pretrained(os.path.join(root, "unsharded"))
        shard(model)
        assert all(type(t).__name__ == "DTensor" for t in model.adapter_tensors("default").values())
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5, 6]]))
        model.save_pretrained(os.path.join(root, f"default-{rank}"))  # rank 0 alone writes
        model.save_pretrained(os.path.join(root, f"every-{rank}"), is_main_process=True)
    finally:
        dist.destroy_process_group()


def test_save_pretrained_of_an_fsdp2_sharded_model_gathers(tmp_path):
    """`save_pretrained` called directly on every rank of an FSDP2-sharded PeftModel (no
    `peftkit train`) writes the whole adapter: the unsharded model's files, key for key and
    bit for bit; by default rank 0 alone writes, `is_main_process=True` writes on any rank."""
    import torch.multiprocessing as mp

    mp.spawn(_save_sharded, args=(2, str(tmp_path)), nprocs=2, join=True)
    assert not (tmp_path / "default-1").exists()
    for folder in ("default-0", "every-0", "every-1"):
        for sub in (".", "other"):
            got = tmp_path / folder / sub
            want = tmp_path / "unsharded" / sub
            a, b = _weights(str(got)), _weights(str(want))
            assert a.keys() == b.keys() and len(a) == (16 if sub == "." else 4)
            for key in a:
                assert torch.equal(a[key], b[key]), key
            assert (json.loads((got / "adapter_config.json").read_text())
                    == json.loads((want / "adapter_config.json").read_text()))
