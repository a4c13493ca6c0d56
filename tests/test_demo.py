"""Smoke test of the README's main job: a very short vppo-demo run writes its logs and figure."""

import json
import math
import re

import pytest

from .helpers import require_transformers

require_transformers()
pytest.importorskip("matplotlib")


@pytest.mark.slow
def test_demo_smoke(tmp_path, capsys):
    from PIL import Image

    from vppo_core.demo import main

    out = tmp_path / "demo"
    argv = ["--out", str(out), "--steps", "2", "--sft-steps", "3", "--prompts", "2", "--group", "2"]
    argv += ["--eval-every", "1", "--eval-size", "4", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    log = json.loads((out / "log.json").read_text())
    assert set(log["runs"]) == {"grpo", "vppo"}
    for run in log["runs"].values():
        assert len(run["steps"]) == 2
        assert all(math.isfinite(s["reward"]) for s in run["steps"])
        assert 0.0 <= run["final_accuracy"] <= 1.0
    vppo_steps = log["runs"]["vppo"]["steps"]
    assert all(0 < s["kept_frac"] <= 1 for s in vppo_steps)
    assert all(s["kept_frac"] == 1 for s in log["runs"]["grpo"]["steps"])  # GRPO keeps every token
    lines = (out / "log.csv").read_text().splitlines()
    assert lines[0].startswith("method,step,reward") and len(lines) == 5
    with Image.open(out / "vppo_demo.png") as png:
        assert png.size == (1200, 800)
        assert png.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))  # not blank
    printed = capsys.readouterr().out
    assert "[grpo]" in printed and "[vppo]" in printed and "held-out accuracy" in printed


@pytest.fixture
def no_training(monkeypatch):
    """Fail if main gets as far as building the model: flags must be rejected before that."""
    from vppo_core.demo import train

    def refuse(cfg):
        raise AssertionError(f"Session built with {cfg}")

    monkeypatch.setattr(train, "Session", refuse)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], r"argument --steps: expected an integer >= 1, got 0"),
        (["--eval-every", "0"], r"argument --eval-every: expected an integer >= 1, got 0"),
        (["--eval-size", "0"], r"argument --eval-size: expected an integer >= 1, got 0"),
        (["--prompts", "0"], r"argument --prompts: expected an integer >= 1, got 0"),
        (["--group", "1"], r"argument --group: expected an integer >= 2 .*, got 1"),
        (["--k", "0"], r"argument --k: expected a fraction in \(0, 1\], got 0\.0"),
        (["--k", "1.5"], r"argument --k: expected a fraction in \(0, 1\], got 1\.5"),
        (["--beta-min", "1.5"], r"argument --beta-min: expected a number in \(0, 1\], got 1\.5"),
        (["--lr", "nan"], r"argument --lr: expected a finite number > 0, got nan"),
        (["--sft-steps", "-1"], r"argument --sft-steps: expected an integer >= 0, got -1"),
        (["--device", "nonsense"], r"argument --device: expected .* torch device, got 'nonsense'"),
    ],
)
def test_bad_flags_fail_before_anything_is_built(flags, message, no_training, capsys, tmp_path):
    from vppo_core.demo import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "demo"), "--quiet", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "demo").exists()


def test_config_checks_every_field():
    from vppo_core.demo.train import Config, ConfigError

    Config()  # the defaults are valid
    Config(seed=-1, sft_steps=0, distractors=0, entropy_coef=-0.01)  # edge values that run
    bad = {
        "sft_batch": 0,
        "ppo_epochs": 0,
        "max_new_tokens": 0,
        "temperature": 0.0,
        "sft_lr": float("inf"),
        "image_size": 27,
        "hidden_size": 40,
        "patch_size": 0,
        "distractors": -1,
        "steps": 2.0,
        "group": True,
    }
    for name, value in bad.items():
        with pytest.raises(ConfigError, match=rf"^{name} must be .*, got {re.escape(repr(value))}$"):
            Config(**{name: value})


def test_a_seed_whose_held_out_set_is_a_training_batch_is_refused():
    from vppo_core.demo.train import Config, ConfigError

    # held-out stream 10_000 + seed: 990_000 is warm-start step 0's batch, 1_990_001 RL step 1's
    for seed in (990_000, 990_249, 1_990_001, -1_010_000):
        with pytest.raises(ConfigError, match=rf"^seed must be a seed whose held-out stream .*, got {seed}$"):
            Config(seed=seed)
    Config(seed=990_250)  # past the 250 warm-start steps
    Config(seed=990_000, sft_steps=0)  # no warm start: no collision


def test_seed_help_says_what_it_controls():
    from vppo_core.demo import _parser

    text = " ".join(_parser().format_help().split())
    assert "--seed SEED seed of the model's initialisation, the held-out evaluation set" in text
    assert "does not change the warm-start (SFT) batches or the RL prompts" in text
