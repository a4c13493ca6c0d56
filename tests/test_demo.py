"""Smoke test of the README's main job: a very short vppo-demo run writes its logs and figure."""

import json
import math

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
