"""bench/gpu_check.sh's CPU path on tiny models, so the script a CUDA user runs does not rot."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")


def test_gpu_check_cpu_tiny_runs_every_planned_option_set(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import gpu_check

    res = gpu_check.main(["--cpu", "--tiny", "--cards", "80,16,12", "--json", str(tmp_path / "r.json")])
    assert res["device"] == "cpu" and [r["card_gib"] for r in res["rows"]] == [80.0, 16.0, 12.0]
    assert res["rows"][1]["chosen"] == ["gradient checkpointing", "SPM in half precision", "VAE slicing"]
    twelve = res["rows"][2]  # the SPM and VAE leave the device for the training step and come back (timed: PCIe cost on CUDA)
    assert "SPM and VAE on the CPU while training" in twelve["chosen"]
    assert twelve["measured_gib"]["offload_seconds"] >= 0 and twelve["measured_gib"]["reload_seconds"] >= 0
    for r in res["rows"]:
        m = r["measured_gib"]
        assert m["scores_finite"] and m["loss_finite"] and m["rollout"] is None  # no CUDA: no memory figures
        assert set(r["plan_gib"]) == {"rollout", "decode + score", "training micro-step"}
    assert set(res["scorer_agreement"]) == {"bfloat16"} and res["scorer_agreement"]["bfloat16"]["max_abs_diff"] >= 0
    assert (tmp_path / "r.json").exists()
