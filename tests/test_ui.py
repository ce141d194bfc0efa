"""`peftkit ui`: the command lines the page builds, the server's API and its safety checks, and
training runs started, watched, refused, stopped and resumed through it (tiny model)."""

import contextlib
import io
import json
import os
import shutil
import threading

import pytest

from peftkit import cli
from peftkit.errors import UserError
from peftkit.ui import runs, settings
from peftkit.ui.server import make_server
from ui_fixtures import Server, alive, call, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def serving(runs_dir, token=None):
    """The server in a thread of this process: its base URL."""
    server = make_server(str(runs_dir), "127.0.0.1", 0, token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def cli_output(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([str(a) for a in argv]) == 0
    return out.getvalue()


# -- the command lines ------------------------------------------------------------------------

def test_train_command_from_settings(tmp_path):
    argv = settings.train_argv({"name": "exp/r8", "method": "lora", "data": "d.jsonl", "r": "8",
                                "max_steps": "5", "gradient_checkpointing": True,
                                "overwrite": False, "target_modules": "", "extra": "--use-rslora"},
                               str(tmp_path))
    assert argv == ["train", "--method", "lora", "--data", "d.jsonl", "--max-steps", "5", "--r",
                    "8", "--gradient-checkpointing", "--use-rslora", "--output-dir",
                    str(tmp_path / "exp" / "r8")]


@pytest.mark.parametrize("extra", ["--output-dir /tmp/elsewhere", "--output /tmp/elsewhere",
                                   "--output-dir=/tmp/elsewhere"])
def test_output_folder_is_always_the_run_name(extra, tmp_path):
    with pytest.raises(UserError, match="output folder is the run name"):
        settings.train_argv({"name": "a", "data": "d.jsonl", "extra": extra}, str(tmp_path))


@pytest.mark.parametrize("name", ["", "../out", "a/../../b", ".hidden", "a//b"])
def test_run_names_stay_in_the_runs_dir(name, tmp_path):
    with pytest.raises(UserError, match="run name"):
        settings.train_argv({"name": name, "data": "d.jsonl"}, str(tmp_path))


def test_bad_flag_gets_the_cli_error(tmp_path):
    with pytest.raises(UserError) as err:
        settings.train_argv({"name": "a", "data": "d.jsonl", "r": "0"}, str(tmp_path))
    assert str(err.value).startswith("argument --r: must be >= 1")


def test_estimate_command_takes_method_flags_as_options():
    argv = settings.estimate_argv({"method": "prompt", "batch_size": "2", "max_length": "64",
                                   "r": "8", "extra": "--num-virtual-tokens 10 --bf16 "
                                                      "--save-total-limit 3"})
    assert argv == ["estimate", "--json", "--model", "smollm2-135m", "--method", "prompt",
                    "--batch-size", "2", "--max-length", "64", "--option",
                    "num_virtual_tokens=10", "--dtype", "bf16"]


# -- the API ----------------------------------------------------------------------------------

def test_plan_shows_the_estimate_and_the_doctor(model_dir, data, tmp_path):
    from peftkit import LoraConfig, get_peft_model
    from peftkit.train.loading import load_model

    reference = get_peft_model(load_model(model_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    trainable, total = reference.get_nb_trainable_parameters()
    with serving(tmp_path / "runs") as url:
        status, plan = call(url + "/api/plan", {"settings": {
            "model": model_dir, "method": "lora", "data": data, "r": "4",
            "target_modules": "q_proj", "learning_rate": "0.5", "name": "a"}})
    assert status == 200
    est = plan["estimate"]["result"]
    assert (est["trainable_params"], est["all_params"]) == (trainable, total)
    checks = {f["check"] for f in plan["doctor"]["result"]}
    assert {"data-small", "lr-high"} <= checks, checks
    assert plan["command"].startswith("peftkit train --method lora --model ")


def test_plan_shows_cli_errors(tmp_path):
    with serving(tmp_path / "runs") as url:
        _, plan = call(url + "/api/plan", {"settings": {"model": str(tmp_path / "missing"),
                                                        "name": "a", "batch_size": "0"}})
    assert plan["command_error"].startswith("peftkit train: error: argument --batch-size")
    assert plan["estimate"]["error"].startswith("peftkit estimate: error:")


def test_token_is_required_when_set(tmp_path):
    with serving(tmp_path, token="s3cret") as url:
        assert call(url + "/api/info")[0] == 403
        assert call(url + "/api/info", headers={"X-Peftkit-Token": "wrong"})[0] == 403
        assert call(url + "/api/info", headers={"X-Peftkit-Token": "s3cret"})[0] == 200
        assert call(url + "/api/info?token=s3cret")[0] == 200
        assert call(url + "/static/app.js")[0] == 403


def test_other_addresses_need_a_token(tmp_path):
    with pytest.raises(UserError, match="--token"):
        make_server(str(tmp_path), "0.0.0.0", 0, None)


def test_cross_site_requests_are_refused(tmp_path):
    with serving(tmp_path) as url:
        port = url.rsplit(":", 1)[1]
        assert call(url + "/api/info", headers={"Host": f"attacker.example:{port}"})[0] == 403
        assert call(url + "/api/info", headers={"Host": f"localhost:{port}"})[0] == 200
        # a form post from another page: not JSON, or from another origin
        assert call(url + "/api/stop", {"run": "a"},
                    headers={"Content-Type": "text/plain"})[0] == 415
        assert call(url + "/api/stop", {"run": "a"},
                    headers={"Origin": "http://attacker.example"})[0] == 403


def test_files_are_served_from_the_runs_dir_only(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(os.path.join(ROOT, "docs", "experiments", "compare"), runs / "compare")
    (tmp_path / "secret.json").write_text("{}")
    os.symlink(tmp_path / "secret.json", runs / "link.json")
    with serving(runs) as url:
        _, listing = call(url + "/api/runs")
        status, _ = call(url + "/api/file?path=../secret.json")
        assert status == 403
        assert call(url + "/api/file?path=link.json")[0] == 403
        with __import__("urllib.request").request.urlopen(
                url + "/api/file?path=compare/memory_time.png") as response:
            assert response.read()[:8] == b"\x89PNG\r\n\x1a\n"
    [experiment] = listing["experiments"]
    assert experiment["name"] == "compare"
    assert experiment["plots"] == ["compare/quality_vs_params.png", "compare/memory_time.png"]
    assert "| lora |" in experiment["table"]


def test_chat_and_eval_answer_as_the_cli(model_dir, data, tmp_path):
    expected = cli_output("generate", "--model", model_dir, "--prompt", "1+2=",
                          "--max-new-tokens", 6).strip()
    cli_eval = json.loads(cli_output("eval", "--model", model_dir, "--data", data, "--limit", 5,
                                     "--max-new-tokens", 3, "--json"))
    with serving(tmp_path) as url:
        status, chat = call(url + "/api/chat", {"messages": [{"role": "user", "content": "1+2="}],
                                                "model": model_dir, "max_new_tokens": 6})
        assert status == 200 and chat["reply"] == expected
        _, scored = call(url + "/api/eval", {"data": data, "model": model_dir, "limit": 5,
                                             "max_new_tokens": 3})
        status, missing = call(url + "/api/eval", {"data": str(tmp_path / "no.jsonl"),
                                                   "model": model_dir})
    assert scored["exact_match"] == cli_eval["exact_match"] and scored["n"] == 5
    assert [r["prompt"] for r in scored["rows"]] == [f"0+{b}=" for b in range(4)] + ["1+0="]
    assert sum(r["match"] for r in scored["rows"]) == round(cli_eval["exact_match"] * 5)
    assert status == 400 and "no.jsonl" in missing["error"]


# -- runs -------------------------------------------------------------------------------------

def test_a_checkpoint_cut_short_is_shown_but_not_offered(tmp_path):
    run = tmp_path / "runs" / "r"
    for step, state in ((2, "{}"), (4, "{}"), (6, '{"glob')):  # 6: the stop hit its last file
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text("{}")
        (folder / "trainer_state.json").write_text(state)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    found = runs.row(str(tmp_path / "runs"), str(run))
    assert found["checkpoints"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert found["interrupted"] == ["checkpoint-6"]
    assert found["adapters"] == ["r/checkpoint-2", "r/checkpoint-4"]


def run_settings(model_dir, data, name, **more):
    return {"name": name, "model": model_dir, "data": data, "batch_size": "4",
            "grad_accum": "1", "logging_steps": "1", "save_steps": "2", "learning_rate": "0.01",
            **more}


def test_run_is_refused_stopped_and_resumed(model_dir, data, tmp_path):
    runs = tmp_path / "runs"
    server = Server(str(runs), log=str(tmp_path / "server.log"))
    try:
        url = server.url
        status, started = call(url + "/api/runs",
                               {"settings": run_settings(model_dir, data, "r1", max_steps="400")})
        assert status == 200, started
        assert started["command"].endswith(f"--output-dir {runs / 'r1'}")

        def running():
            """two logged steps, a checkpoint"""
            run = call(url + "/api/run?run=r1")[1]
            return run if run["status"] == "running" and run["checkpoints"] else None
        run = wait_for(running)
        holder = json.load(open(runs / ".r1.peftkit-lock"))
        status, refused = call(url + "/api/runs",
                               {"settings": run_settings(model_dir, data, "r1", max_steps="4",
                                                         overwrite=True)})
        assert status == 400 and refused["error"].startswith("peftkit train: error: ")
        assert f"pid {holder['pid']}" in refused["error"]
        assert run["progress"]["max_steps"] == 400 and run["progress"]["memory_mb"] > 0

        assert call(url + "/api/stop", {"run": "r1"})[0] == 200
        stopped = wait_for(lambda: (r := call(url + "/api/run?run=r1")[1])["status"] == "stopped"
                           and r)
        assert not os.path.exists(runs / ".r1.peftkit-lock")  # released by the run itself
        assert "KeyboardInterrupt" in "\n".join(stopped["log"])
        # the stop may cut the last save short; that one is shown but not offered or resumed
        finished = [c for c in stopped["checkpoints"] if c not in stopped["interrupted"]]
        assert stopped["interrupted"] in ([], stopped["checkpoints"][-1:])
        last = finished[-1]
        step = int(last.split("-")[1])
        assert f"r1/{last}" in stopped["adapters"]

        status, _ = call(url + "/api/runs", {"settings": run_settings(
            model_dir, data, "r1", max_steps=str(step + 2), resume=True)})
        assert status == 200
        done = wait_for(lambda: (r := call(url + "/api/run?run=r1")[1])["status"] in
                        ("finished", "failed") and r)
        assert done["status"] == "finished", done["log"]
        assert done["summary"]["resumed_from"].endswith(last)
        assert done["summary"]["steps"] == step + 2
    finally:
        server.close()


def test_run_outlives_the_server(model_dir, data, tmp_path):
    runs = tmp_path / "runs"
    server = Server(str(runs), log=str(tmp_path / "server.log"))
    try:
        status, _ = call(server.url + "/api/runs",
                         {"settings": run_settings(model_dir, data, "solo", max_steps="6")})
        assert status == 200
        pid = json.load(open(runs / ".solo.peftkit-ui.json"))["pid"]
        assert server.ctrl_c() == 0
    finally:
        server.close()
    assert alive(pid)
    wait_for(lambda: not alive(pid))
    summary = json.load(open(runs / "solo" / "run_summary.json"))
    assert summary["steps"] == 6
    # a new server finds the finished run from its files
    with serving(runs) as url:
        [row] = call(url + "/api/runs")[1]["runs"]
    assert (row["name"], row["status"], row["steps"]) == ("solo", "finished", 6)
