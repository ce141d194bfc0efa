import json

from peftkit.planner.doctor import check_config, check_data


def checks(findings):
    return {f.check for f in findings}


def test_every_seed_pitfall_is_flagged():
    bad = {"method": "lora", "r": 4, "lora-alpha": 4, "learning_rate": 2e-5,
           "target_modules": "embed_tokens,lm_head,gate_proj", "lora_dropout": 0.5}
    found = check_config(bad)
    assert {"rank-low", "alpha", "lr-low", "targets-embeddings", "no-attention",
            "dropout"} <= checks(found)
    assert all(f.reason and f.fix and f.severity in ("error", "warning", "info") for f in found)
    assert "rank-high" in checks(check_config({"r": 128, "learning_rate": 5e-3}))
    assert "lr-high" in checks(check_config({"r": 16, "learning_rate": 5e-3}))


def test_lora_variant_rules_follow_their_papers():
    high = checks(check_config({"r": 128, "lora_alpha": 256, "learning_rate": 2e-4}))
    assert {"rank-high", "rslora"} <= high
    rs = checks(check_config({"r": 128, "lora_alpha": 256, "learning_rate": 2e-4,
                              "use_rslora": True}))
    assert not {"rank-high", "rslora"} & rs  # rsLoRA makes high ranks worth it
    assert "rslora" not in checks(check_config({"r": 32, "lora_alpha": 64}))
    ratio = {v: [f.severity for f in check_config({"loraplus_lr_ratio": v})
                 if f.check == "loraplus-ratio"] for v in (0.5, 4, 16)}
    assert ratio == {0.5: ["warning"], 4: ["info"], 16: []}
    assert check_config({"r": 16, "lora_alpha": 32, "learning_rate": 2e-4, "use_dora": True,
                         "target_modules": ["q_proj", "v_proj"]}) == []


def test_good_config_is_clean_and_typos_are_named():
    good = {"method": "lora", "r": 16, "lora_alpha": 32, "learning_rate": 2e-4,
            "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.05, "batch_size": 4}
    assert check_config(good) == []
    (typo,) = check_config({**good, "learning_rat": 1})
    assert typo.check == "unknown-key" and "learning_rate" in typo.fix


def test_data_checks():
    rows = [{"prompt": f"q{i}", "completion": "yes" if i % 10 else "no"} for i in range(50)]
    rows += rows[:5] + [{"prompt": "x " * 4000, "completion": "yes"}]
    found = check_data(rows, max_length=1)
    assert {"data-small", "data-duplicates", "data-unbalanced", "data-lengths",
            "max-length"} <= checks(found)
    balanced = [{"instruction": f"t{i}", "output": str(i % 2)} for i in range(200)]
    assert check_data(balanced, max_length=512) == []


def test_doctor_command(tmp_path, capsys):
    import argparse

    from peftkit.commands import doctor

    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: lora\nr: 4\nlearning_rate: 2.0e-4\n")
    parser = argparse.ArgumentParser()
    doctor.register(parser.add_subparsers())
    args = parser.parse_args(["doctor", "--config", str(cfg), "--lora-dropout", "1.5", "--json"])
    assert args.func(args) == 1  # an error-severity finding
    out = json.loads(capsys.readouterr().out)
    assert {f["check"] for f in out} == {"rank-low", "dropout"}
