"""Every registered method reaches every command. The tests are parametrised over
`registry.SPECS`, so a method missing from a command fails a test that names it (`peftkit train`,
save and reload: `test_train_cli.test_train_save_eval_generate_merge`). A toy method, written in
`toy_method.py` as a method module is and registered by one line, trains, reloads, is planned,
is checked by the doctor and runs in `peftkit compare`."""

import argparse
import json
import os

import pytest
import torch

from peftkit import cli, config
from peftkit.commands import doctor as doctor_command
from peftkit.experiments import variants
from peftkit.experiments.runs import Run, Setup, check
from peftkit.methods import registry
from peftkit.planner.doctor import check_config
from train_fixtures import tiny_model_dir

TESTS = os.path.dirname(os.path.abspath(__file__))
SPEC_CHECKS = {"unknown-key", "unknown-method", "not-for-method"}


def default_flags(name: str) -> dict:
    """The method's `peftkit train` defaults that have a value, as options."""
    return {k: f["default"] for k, f in registry.spec(name).flags.items()
            if f["default"] not in (None, False)}


def argv(options: dict) -> list[str]:
    return [a for k, v in options.items()
            for a in ("--" + k.replace("_", "-"), str(v) if not isinstance(v, list) else
                      ",".join(v))]


@pytest.mark.parametrize("name", list(registry.SPECS))
def test_estimate_plans_the_method(name, capsys):
    rc = cli.main(["estimate", "--model", "smollm2-135m", "--method", name, "--seq-len", "64",
                   "--json", *argv(default_flags(name))])
    out, err = capsys.readouterr()
    assert rc == 0, err
    report = json.loads(out)
    assert report["method"] == name and 0 < report["trainable_params"] <= report["all_params"]
    assert report["bytes"]["total"] > report["bytes"]["optimizer_states"] > 0


@pytest.mark.parametrize("name", list(registry.SPECS))
def test_doctor_knows_the_method(name, capsys):
    assert not SPEC_CHECKS & {f.check for f in check_config({"method": name,
                                                             **default_flags(name)})}
    parser = argparse.ArgumentParser()
    doctor_command.register(parser.add_subparsers())
    args = parser.parse_args(["doctor", "--method", name, "--json", *argv(default_flags(name))])
    args.func(args)
    assert not SPEC_CHECKS & {f["check"] for f in json.loads(capsys.readouterr().out)}


@pytest.mark.parametrize("name", list(registry.SPECS))
def test_compare_runs_the_method_with_its_seed_settings(name):
    flags = variants.flags(variants.get(name, ""), {})
    assert flags["learning_rate"] == registry.spec(name).learning_rate
    check(Run(name, name, flags, seed=1), Setup("train.jsonl", "test.jsonl", "custom"))


def test_doctor_names_an_unknown_method_and_a_flag_of_another_method():
    found = {f.check: f for f in check_config({"method": "dora"})}
    assert found["unknown-method"].severity == "error" and "ia3" in found["unknown-method"].fix
    (wrong,) = check_config({"method": "ia3", "r": 8})
    assert wrong.check == "not-for-method" and "lora, qlora" in wrong.fix


def test_methods_sharing_a_flag_must_agree_on_its_type(monkeypatch):
    from peftkit.methods.spec import MethodSpec

    monkeypatch.setattr(registry, "SPECS", dict(registry.SPECS))
    clash = MethodSpec(name="clash", help="", config_cls=None, injector=None,
                       flags={"r": dict(type=str, default="x", help="not a rank")})
    with pytest.raises(ValueError, match="--r of method 'clash' differs in type from method "
                                         "'lora'"):
        registry.register(clash)


@pytest.fixture
def toy(monkeypatch, tmp_path):
    """The toy method registered here and, through a sitecustomize, in child processes."""
    import toy_method

    for module, name in ((registry, "SPECS"), (registry, "_INJECTORS"), (config, "_CONFIGS")):
        monkeypatch.setattr(module, name, dict(getattr(module, name)))
    registry.register(toy_method.SPEC)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import toy_method\nfrom peftkit.methods import registry\n\n"
        "registry.register(toy_method.SPEC)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(site), TESTS, *filter(None, [os.environ.get("PYTHONPATH")])]))
    return toy_method


def test_a_toy_method_reaches_every_command(toy, tmp_path, capsys):
    from peftkit.train.loading import load_for_inference

    model_dir = tiny_model_dir(str(tmp_path / "model"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    out = str(tmp_path / "run")
    assert cli.main(["train", "--method", "toy", "--model", model_dir, "--data", str(data),
                     "--output-dir", out, "--max-steps", "2", "--batch-size", "4",
                     "--learning-rate", "1e-2"]) == 0, capsys.readouterr().err
    assert json.load(open(os.path.join(out, "adapter_config.json")))["peft_type"] == "TOY"
    model, _ = load_for_inference(out)
    shifts = {n: p for n, p in model.named_parameters() if "toy_shift" in n}
    # 2 layers, q_proj out 16 and v_proj out 8 (2 KV heads of 4)
    assert sum(p.numel() for p in shifts.values()) == 2 * (16 + 8)
    assert all(torch.count_nonzero(p) > 0 for p in shifts.values())  # trained, then reloaded

    capsys.readouterr()
    assert cli.main(["estimate", "--model", "smollm2-135m", "--method", "toy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == 30 * (576 + 192)

    assert [f.check for f in check_config({"method": "toy"})] == ["toy-targets"]
    assert check_config({"method": "toy", "target_modules": "q_proj"}) == []
    assert [f.check for f in check_config({"method": "toy", "r": 8})] == ["not-for-method",
                                                                        "toy-targets"]

    cmp = tmp_path / "cmp"
    assert cli.main(["compare", "--model", model_dir, "--out", str(cmp), "--task", "arithmetic",
                     "--n-train", "8", "--n-test", "4", "--max-steps", "1", "--batch-size", "4",
                     "--max-length", "128", "--methods", "toy"]) == 0, capsys.readouterr().err
    runs = {r["method"]: r for r in json.load(open(cmp / "results.json"))["runs"]}
    assert runs["toy"]["status"] == "ok" and runs["toy"]["trainable_params"] == 2 * (16 + 8)
    assert runs["toy"]["flags"] == {"learning_rate": 1e-2}
