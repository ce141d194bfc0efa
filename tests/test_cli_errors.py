"""Every input a user can get wrong is checked before the model loads, and ends in one message
`peftkit <command>: error: <file>[:line]: <what is wrong>; <what to do>` with exit status 2, no
traceback; `--debug` shows the traceback (issue 20, items 5-7)."""

import os
import shutil

import pytest
import torch

from peftkit import cli
from peftkit.errors import UserError
from peftkit.train import loading


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory):
    """An untrained LoRA adapter of the tiny model, in PEFT's layout."""
    from transformers import AutoModelForCausalLM

    from peftkit import LoraConfig, get_peft_model

    folder = str(tmp_path_factory.mktemp("adapter") / "lora")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def model_never_loads(monkeypatch):
    """Each case here must be refused before any model loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_model", refuse)


def fails(capsys, argv, message):
    """`peftkit argv` exits 2 and its stderr ends in the one line `peftkit <cmd>: error: ...`
    that contains `message`."""
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"peftkit {argv[0]}: error: "), err
    assert message in err, err


def train(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--output-dir", out, *extra]


def test_missing_test_data_is_found_before_training(model_dir, data, tmp_path, capsys):
    missing = tmp_path / "test.jsonl"
    fails(capsys, train(model_dir, data, tmp_path / "o", "--test-data", missing),
          f"{missing}: no such file or folder")
    eval_rows = tmp_path / "eval.jsonl"
    eval_rows.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    fails(capsys, train(model_dir, data, tmp_path / "o", "--eval-data", eval_rows),
          f"{eval_rows}:1: missing field 'completion'")
    assert not os.path.exists(tmp_path / "o")


def test_non_utf8_data_names_file_line_and_byte(model_dir, tmp_path, capsys):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "a", "completion": "b"}\n'
                      b'{"prompt": "caf\xe9", "completion": "b"}\n')
    fails(capsys, train(model_dir, latin, tmp_path / "o"),
          f"{latin}:2: byte 0xe9 at column 16 is not UTF-8; save the file as UTF-8")
    csv = tmp_path / "latin.csv"
    csv.write_bytes(b"prompt,completion\nna\xefve,b\n")
    fails(capsys, ["eval", "--model", model_dir, "--data", csv], f"{csv}:2: byte 0xef at column 3")


@pytest.mark.parametrize("command", ["train", "eval", "generate", "merge"])
def test_a_model_path_that_does_not_exist(command, model_dir, data, adapter, tmp_path, capsys):
    argv = {"train": train("MODEL", data, tmp_path / "o"),
            "eval": ["eval", "--model", "MODEL", "--data", data],
            "generate": ["generate", "--model", "MODEL", "--prompt", "hi"],
            "merge": ["merge", "--adapter", adapter, "--model", "MODEL", "--output-dir",
                      tmp_path / "m"]}[command]
    missing = str(tmp_path / "no" / "model")
    fails(capsys, [missing if a == "MODEL" else a for a in argv],
          f"{missing}: no such model folder, and not a hub id (org/name)")
    fails(capsys, [str(tmp_path) if a == "MODEL" else a for a in argv],
          f"{tmp_path}: not a model folder (no config.json)")


def test_config_folder_and_yaml_syntax_error(data, tmp_path, capsys):
    fails(capsys, ["train", "--config", tmp_path], f"{tmp_path}: is a folder; --config takes")
    config = tmp_path / "run.yaml"
    config.write_text(f"data: {data}\noutput_dir: [out\n")
    fails(capsys, ["train", "--config", config], f"{config}:3: not valid YAML")


@pytest.mark.parametrize("command", ["eval", "generate", "merge", "chat"])
@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_adapter_weights(command, keep, adapter, data, tmp_path, capsys):
    damaged = str(tmp_path / "adapter")
    shutil.copytree(adapter, damaged)
    weights = os.path.join(damaged, "adapter_model.safetensors")
    content = open(weights, "rb").read()
    open(weights, "wb").write(content[:int(keep * len(content))])
    extra = {"eval": ["--data", data], "generate": ["--prompt", "hi"],
             "merge": ["--output-dir", tmp_path / "m"], "chat": []}[command]
    fails(capsys, [command, "--adapter", damaged, *extra],
          f"{weights}: not a complete safetensors file")


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "expected a JSON object of config fields, got a list; save the adapter again"),
    ('{"peft_type": "LORA", "r": 2,', "adapter_config.json:1: not valid JSON"),
    ('{"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]}', "adapter_config.json: r: "),
])
def test_bad_adapter_config(content, message, adapter, data, tmp_path, capsys):
    damaged = str(tmp_path / "adapter")
    shutil.copytree(adapter, damaged)
    with open(os.path.join(damaged, "adapter_config.json"), "w") as fh:
        fh.write(content)
    fails(capsys, ["eval", "--adapter", damaged, "--data", data], message)


def test_missing_adapter_files(adapter, data, tmp_path, capsys):
    fails(capsys, ["generate", "--adapter", tmp_path / "none", "--prompt", "hi"],
          "no such adapter folder")
    fails(capsys, ["generate", "--adapter", tmp_path, "--prompt", "hi"],
          f"{tmp_path}: no adapter_config.json")
    shutil.copy(os.path.join(adapter, "adapter_config.json"), tmp_path)
    fails(capsys, ["generate", "--adapter", tmp_path, "--prompt", "hi"],
          f"{tmp_path}: no adapter_model.safetensors")


def test_output_dir_that_is_a_file(model_dir, data, tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    fails(capsys, train(model_dir, data, out), f"--output-dir {out} is an existing file")


def test_resume_from_a_checkpoint_with_a_truncated_optimizer(model_dir, data, tmp_path, capsys):
    checkpoint = tmp_path / "out" / "checkpoint-2"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2, "log_history": []}')
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(64))])
    optimizer.step()
    torch.save(optimizer.state_dict(), checkpoint / "optimizer.pt")
    content = (checkpoint / "optimizer.pt").read_bytes()
    (checkpoint / "optimizer.pt").write_bytes(content[:len(content) // 2])
    fails(capsys, train(model_dir, data, tmp_path / "out", "--resume"),
          f"{checkpoint / 'optimizer.pt'}: truncated or not a PyTorch file, so {checkpoint} "
          "cannot be resumed")


def test_debug_shows_the_traceback(model_dir, data, tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        cli.main(train(model_dir, str(tmp_path / "missing.jsonl"), str(tmp_path / "o"))
                 + ["--debug"])


def test_unconvertible_pissa_run_is_refused_before_the_model_loads(model_dir, data, tmp_path,
                                                                    capsys):
    """`peftkit train` converts a PiSSA/OLoRA adapter to plain LoRA at the end of the run; DoRA's
    does not convert, so the run is refused before it starts (`pissa.check_convertible`)."""
    fails(capsys, train(model_dir, data, tmp_path / "o", "--use-dora", "--init-lora-weights",
                        "pissa"), "use_dora=True cannot be converted")
    assert not os.path.exists(tmp_path / "o")
