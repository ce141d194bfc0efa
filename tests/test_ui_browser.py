"""`peftkit ui` in a real browser: headless Chromium (Debian's `chromium` package, no browser
download) driven by Playwright plans a run, starts it on a tiny model, watches the loss curve
grow, stops it, browses the runs (two on one chart) and chats with the stopped run's last checkpoint.

Skipped without /usr/bin/chromium or the `playwright` package. Screenshots of each tab go to
the test's folder, and to $PEFTKIT_UI_SCREENSHOTS when set (docs/ui is made that way)."""

import json
import os
import shutil

import pytest

from peftkit.train.checkpoints import is_complete, last_complete_checkpoint
from train_fixtures import tiny_model_dir
from ui_fixtures import ROOT, Server

CHROMIUM = os.environ.get("PEFTKIT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no {CHROMIUM}")


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, args=FLAGS, headless=True,
            viewport={"width": 1280, "height": 900}, bypass_csp=True)  # for wait_for_function
        context.set_default_timeout(120_000)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


def shoot(page, tmp_path, name):
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    folder = os.environ.get("PEFTKIT_UI_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        shutil.copy(tmp_path / f"{name}.png", os.path.join(folder, f"{name}.png"))


def points(page) -> int:
    return int(page.get_attribute("#live-chart", "data-points") or 0)


def test_plan_run_watch_stop_and_chat(page, tmp_path):
    model = tiny_model_dir(str(tmp_path / "model"))
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a in range(4) for b in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = tmp_path / "runs"
    shutil.copytree(os.path.join(ROOT, "docs", "experiments", "compare"), runs / "compare")
    (runs / "earlier").mkdir()  # a run's log alone, as a killed run leaves it
    (runs / "earlier" / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 4.2 - 0.1 * s}) + "\n" for s in range(1, 6)))
    server = Server(str(runs), "--token", "t0k3n", log=str(tmp_path / "server.log"))
    try:
        page.goto(server.page)
        # Plan: the estimate and the doctor follow the settings
        page.fill("[data-setting=model]", model)
        page.fill("#data", str(data))
        page.fill("[data-setting=r]", "4")
        page.fill("[data-setting=max_steps]", "400")
        page.fill("[data-setting=save_steps]", "2")
        page.fill("[data-setting=learning_rate]", "0.01")
        page.wait_for_function("document.querySelector('#trainable').textContent"
                               ".includes('trainable params: 448 ')")
        page.wait_for_selector("#doctor li:has-text('data-small')")
        shoot(page, tmp_path, "plan")

        # Run: the command line, the live loss curve, stop
        page.click("nav button[data-tab=run]")
        page.fill("#run-name", "tiny-lora")
        page.wait_for_function("document.querySelector('#command').textContent"
                               ".includes('--output-dir')")
        assert "--max-steps 400" in page.inner_text("#command")
        page.click("#start")
        page.wait_for_selector("#run-status:has-text('running')")
        page.wait_for_function("+document.querySelector('#live-chart').dataset.points >= 2")
        seen = points(page)
        page.wait_for_function(f"+document.querySelector('#live-chart').dataset.points > {seen}")
        page.wait_for_selector("[data-stat=remaining]:not(:has-text('n/a'))")
        shoot(page, tmp_path, "run")
        page.click("#stop")
        page.wait_for_selector("#run-status:has-text('stopped')")
        assert page.is_enabled("#start")

        # Runs: the stopped run and the compare experiment, two runs on one chart
        page.click("nav button[data-tab=runs]")
        page.wait_for_selector("tr[data-run=tiny-lora] .badge:has-text('stopped')")
        page.wait_for_selector(".experiment table:has-text('qlora')")
        page.click("tr[data-run=tiny-lora] a")
        page.wait_for_selector("#run-detail:has-text('checkpoint-')")
        page.check("tr[data-run=tiny-lora] .pick")
        page.check("tr[data-run=earlier] .pick")
        page.click("#compare")
        logged = sum(1 for line in open(runs / "tiny-lora" / "metrics.jsonl") if '"loss"' in line)
        page.wait_for_function("+document.querySelector('#compare-chart').dataset.points === "
                               f"{logged + 5}")
        shoot(page, tmp_path, "runs")

        # Try: the last checkpoint and the base model answer the same message
        # (the stop may have cut the last save short: the page offers only finished ones)
        checkpoint = last_complete_checkpoint(str(runs / "tiny-lora"))
        assert checkpoint, os.listdir(runs / "tiny-lora")  # the run saved at step 2 before the stop
        page.click("nav button[data-tab=try]")
        page.wait_for_selector(f"#adapters option[value='tiny-lora/{os.path.basename(checkpoint)}']",
                               state="attached")
        offered = page.eval_on_selector_all("#adapters option", "os => os.map(o => o.value)")
        assert all(is_complete(str(runs / a)) for a in offered if "checkpoint-" in a)
        page.fill("#adapter", f"tiny-lora/{os.path.basename(checkpoint)}")
        page.fill("#max-new-tokens", "6")
        page.fill("#chat-input", "1+2=")
        page.press("#chat-input", "Enter")
        for side in ("adapter", "base"):
            page.wait_for_selector(f"#chat-{side} .bubble.assistant:not(.pending), "
                                   "#chat-error:not(:empty)")
            assert page.inner_text("#chat-error") == "", open(tmp_path / "server.log").read()
        page.fill("#eval-data", str(data))
        page.fill("#eval-limit", "4")
        page.click("#eval-run")
        page.wait_for_selector("#eval-score:has-text('exact match')")
        assert page.locator("#eval-rows tr").count() == 5  # header + 4 rows
        shoot(page, tmp_path, "try")
    finally:
        server.close()
