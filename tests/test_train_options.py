"""`peftkit train` options: YAML values typed and range-checked like the flags, and option
combinations that cannot train refused, before anything loads (issue 20, items 2 and 8)."""

import argparse
import re

import pytest

from peftkit.cli import build_parser
from peftkit.errors import UserError
from peftkit.train import options

REQUIRED = ["--data", "d.jsonl", "--output-dir", "out"]


def resolve(tmp_path, yaml_text=None, *argv):
    """`options.resolve` of `peftkit train [--config FILE] REQUIRED argv`."""
    config = []
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        config = ["--config", str(path)]
    args = build_parser().parse_args(["train", *config, *REQUIRED, *map(str, argv)])
    return options.resolve(args)


@pytest.mark.parametrize("key", ["overwrite", "packing", "use_rslora", "fused_loss"])
def test_a_quoted_boolean_is_an_error_not_true(tmp_path, key):
    for text in ('"false"', "'true'", "1", "no thanks"):
        with pytest.raises(UserError, match=rf"run.yaml:2: {key}: expected true or false "
                                            rf"\(unquoted\), got"):
            resolve(tmp_path, f"seed: 1\n{key}: {text}\n")
    assert getattr(resolve(tmp_path, f"{key}: false\n"), key) is False
    assert getattr(resolve(tmp_path, f"{key}: true\n"), key) is True


@pytest.mark.parametrize("yaml_value, message", [
    ("8.7", "expected an integer, got 8.7"),
    ("true", "expected an integer, got True"),
    ("[8]", "expected an integer, got [8]"),
    ("eight", "expected an integer, got 'eight'"),
])
def test_an_integer_option_takes_integers_only(tmp_path, yaml_value, message):
    with pytest.raises(UserError, match=re.escape(f"run.yaml:1: r: {message}")):
        resolve(tmp_path, f"r: {yaml_value}\n")


def test_yaml_values_take_the_flags_types(tmp_path):
    args = resolve(tmp_path, "r: 4\nlora_alpha: 8\nlearning_rate: 2e-4\nepochs: 1\n"
                             "target_modules: [q_proj, v_proj]\nresume: false\nmax_length:\n")
    assert (args.r, args.lora_alpha, args.learning_rate, args.epochs) == (4, 8.0, 2e-4, 1.0)
    assert type(args.lora_alpha) is float and type(args.r) is int
    assert args.target_modules == ["q_proj", "v_proj"] and args.resume is None
    assert args.max_length == 512  # a key without a value is not given
    assert resolve(tmp_path, "target_modules: q_proj,v_proj\n").target_modules == [
        "q_proj", "v_proj"]
    assert resolve(tmp_path, "resume: true\n").resume is True


# Each bad value is refused the same way on the command line and in YAML.
BAD_VALUES = [
    ("learning_rate", "0", "must be > 0"),
    ("learning_rate", "-1e-4", "must be > 0"),
    ("eval_split", "-0.5", "must be >= 0 and < 1"),
    ("eval_split", "1", "must be >= 0 and < 1"),
    ("max_length", "0", "must be >= 1"),
    ("batch_size", "-4", "must be >= 1"),
    ("eval_batch_size", "0", "must be >= 1"),
    ("grad_accum", "0", "must be >= 1"),
    ("epochs", "-1", "must be >= 0"),
    ("max_steps", "-2", "must be >= -1"),
    ("warmup_steps", "-1", "must be >= 0"),
    ("logging_steps", "0", "must be >= 1"),
    ("save_steps", "0", "must be >= 1"),
    ("seed", "-1", "must be >= 0"),
    ("learning_rate", "nan", "must be > 0"),
    ("r", "0", "must be >= 1"),
    ("lora_dropout", "1", "must be >= 0 and < 1"),
    ("num_virtual_tokens", "0", "must be >= 1"),
]


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_out_of_range_values_are_refused_on_the_command_line(key, value, message, capsys):
    flag = "--" + key.replace("_", "-")
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["train", *REQUIRED, f"{flag}={value}"])
    assert exit_.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("key, value, message", BAD_VALUES)
def test_out_of_range_values_are_refused_in_yaml(tmp_path, key, value, message):
    with pytest.raises(UserError, match=rf"run.yaml:2: {key}: {message}"):
        resolve(tmp_path, f"seed: 3\n{key}: {value}\n")


@pytest.mark.parametrize("argv, message", [
    (["--max-steps", 0], "--max-steps 0 trains nothing"),
    (["--max-steps", 0, "--epochs", 0], "--max-steps 0 trains nothing"),
    (["--epochs", 0], "--epochs 0 trains nothing"),
    (["--lr-scheduler", "cosine_annealing"], "--lr-scheduler 'cosine_annealing' is not one of"),
])
def test_combinations_that_cannot_train_are_refused(tmp_path, argv, message):
    with pytest.raises(UserError, match=message):
        resolve(tmp_path, None, *argv)


def test_max_steps_overrides_zero_epochs(tmp_path):
    assert resolve(tmp_path, None, "--epochs", 0, "--max-steps", 5).max_steps == 5


def test_choices_are_checked_in_yaml(tmp_path):
    with pytest.raises(UserError, match=r"run.yaml:1: quant_type: expected one of nf4, fp4, "
                                        r"got 'nf8'"):
        resolve(tmp_path, "quant_type: nf8\n")
    with pytest.raises(UserError, match=r"run.yaml:1: report_to: expected one of none, "):
        resolve(tmp_path, "report_to: mlflow\n")


@pytest.mark.parametrize("text, message", [
    ("r: 4\nlora_alpha: [8\n", r"run.yaml:3: not valid YAML \(expected ',' or ']'"),
    ("- r: 4\n", r"run.yaml: expected `option: value` lines \(a YAML mapping\), got a list"),
    ("learning_rat: 0.1\n", r"run.yaml: unknown option\(s\) \['learning_rat'\]"),
])
def test_a_bad_yaml_file_is_one_message_naming_it(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        resolve(tmp_path, text)


def test_config_that_is_a_folder_missing_or_not_utf8(tmp_path):
    def config(path):
        args = build_parser().parse_args(["train", "--config", str(path), *REQUIRED])
        return options.resolve(args)

    with pytest.raises(UserError, match=rf"{tmp_path}: is a folder; --config takes a file"):
        config(tmp_path)
    with pytest.raises(UserError, match=rf"{tmp_path / 'no.yaml'}: no such file \(--config\)"):
        config(tmp_path / "no.yaml")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("seed: 1\nlr_scheduler: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match=rf"{latin}:2: byte 0xe9 at column 18 is not UTF-8"):
        config(latin)


def test_number_parser_names_what_it_wants():
    from peftkit.train.ranges import number

    parse = number(int, 1, below=10)
    assert parse("3") == 3 and parse(9) == 9
    for bad, message in [("10", "must be >= 1 and < 10"), ("0", "must be >= 1 and < 10"),
                         (2.0, "expected an integer"), ("1e3", "expected an integer")]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(bad)
    with pytest.raises(argparse.ArgumentTypeError, match="must be > 0, got 'inf'"):
        number(float, above=0)("inf")
