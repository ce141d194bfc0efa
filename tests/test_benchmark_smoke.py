"""The benchmark's worker runs every variant on a tiny model and reports sane numbers."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import lora_step  # noqa: E402
import mixed_batch  # noqa: E402
import step_variants  # noqa: E402


@pytest.fixture(scope="module")
def peft_run():
    return lora_step.run_one("tiny", "peft", steps=2, warmup=1, device="cpu")


@pytest.mark.parametrize("variant", lora_step.VARIANTS)
def test_worker_reports_a_step(variant, peft_run):
    """Every variant trains the same model on the same tokens: its first loss is PEFT's up to
    the dropout masks (0.05 on 2 x 16 tokens moves the loss by ~1e-3 relative)."""
    r = lora_step.run_one("tiny", variant, steps=2, warmup=1, device="cpu")
    assert len(r["times"]) == 2 and len(r["losses"]) == 3 and r["losses"][0] > r["losses"][-1]
    assert r["losses"][0] == pytest.approx(peft_run["losses"][0], rel=1e-2)


def test_table_has_ratios():
    rows = [dict(case="tiny", variant=v, step_s=s, cpu_s=s, peak_mb=m)
            for v, s, m in (("peft", 2.0, 100.0), ("library-loop", 1.0, 50.0))]
    text = lora_step.table(rows)
    assert "| library-loop | 1.00 |" in text and "0.50x | 0.50x | 0.50x |" in text


def test_step_variants_times_every_variant(capsys):
    step_variants.main(["--model", "tiny-llama", "--seq", "16", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == list(step_variants.VARIANTS)
    assert all(float(line.split()[1]) > 0 for line in lines[1:])


def test_mixed_batch_times_each_run_and_matches_peft(capsys):
    """Every round times the three forwards, and the mixed batch's logits are PEFT's."""
    r = mixed_batch.main(["--model", "tiny-llama", "--seq", "16", "--rounds", "2", "--peft"])
    assert {k: len(t) for k, t in r["times"].items()} == {"single": 2, "mixed": 2,
                                                          "peft-mixed": 2}
    assert r["peft_max_diff"] < 1e-5
    assert f"mixed / single: {r['ratio']:.2f}x wall, {r['cpu_ratio']:.2f}x CPU" \
        in capsys.readouterr().out
