"""Pairs gathered over two CPU processes (accelerate over gloo, started with torchrun), shuffled and split."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from accelerate import Accelerator
    from pycore.spo.sampler import Transitions
    from pycore.spo.trainer import gather_and_split

    acc = Accelerator(cpu=True)
    r = acc.process_index
    n = 3 if r == 0 else 6  # unequal pair counts per rank
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + 100 * r
    tr = Transitions(x, x + 0.5, x + 0.25, x + 0.75, torch.full((n,), 951 - r), torch.arange(n))
    mine = gather_and_split(tr, acc, seed=7)
    torch.save({"ids": mine.x_t_win.flatten(), "t": mine.t, "next": mine.x_next_win.flatten()}, sys.argv[1] + f"/rank{r}.pt")
    acc.wait_for_everyone()
    acc.end_training()  # destroys the process group: exiting with gloo still up can abort in its threads
    """
)


TRAIN_SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    os.environ["HF_HUB_OFFLINE"] = "1"
    from pathlib import Path
    from accelerate import Accelerator
    from pycore.diffusion.text import PromptEncoder
    from pycore.spo.config import from_preset
    from tests.kit.diffusion import build_tiny_models
    from pycore.spo.trainer import run_spo

    acc = Accelerator(cpu=True)
    out = Path(sys.argv[1])
    m = build_tiny_models(out / f"tok{acc.process_index}", sdxl=True, seed=0)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)
    cfg = from_preset("sdxl", resolution=64, lora_rank=2, threshold=0.0, learning_rate=1e-3, num_epochs=1,
                      sample_batch_size=1, train_batch_size=8, gradient_accumulation_steps=1)
    res = run_spo(m.unet, enc, ["a cat", "a dog"], lambda p: (lambda x0, i, t: 10 * x0.mean(dim=(1, 2, 3))), cfg,
                  out / "run", (4, 8, 8), accelerator=acc)
    lora = {n: p.detach() for n, p in m.unet.named_parameters() if "lora_" in n}
    torch.save({"lora": lora, "history": res.history}, out / f"lora{acc.process_index}.pt")
    acc.wait_for_everyone()
    acc.end_training()
    """
)


def torchrun(tmp_path, script_text):
    script = tmp_path / "script.py"
    script.write_text(script_text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_share_all_pairs_equally(tmp_path):
    torchrun(tmp_path, SCRIPT)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert len(r0["ids"]) == len(r1["ids"]) == 4  # 9 pairs, 4 each, 1 dropped
    ids = torch.cat([r0["ids"], r1["ids"]]).tolist()
    pool = [0.0, 1.0, 2.0, 100.0, 101.0, 102.0, 103.0, 104.0, 105.0]
    assert len(set(ids)) == 8 and set(ids) <= set(pool)
    for r in (r0, r1):  # rows stay intact through padding, gathering and shuffling
        torch.testing.assert_close(r["next"], r["ids"] + 0.5)
        assert r["t"].tolist() == [951 if v < 100 else 950 for v in r["ids"].tolist()]


@pytest.mark.slow
def test_two_processes_train_together_and_end_with_the_same_lora(tmp_path):
    torchrun(tmp_path, TRAIN_SCRIPT)
    r0, r1 = (torch.load(tmp_path / f"lora{i}.pt", weights_only=True) for i in range(2))
    assert r0["lora"].keys() == r1["lora"].keys() and r0["lora"]
    assert all(torch.equal(r0["lora"][k], r1["lora"][k]) for k in r0["lora"])
    assert any(r0["lora"][k].abs().sum() > 0 for k in r0["lora"] if "lora_B" in k)  # it trained
    assert (tmp_path / "run" / "spo_lora_diffusers.safetensors").exists()  # written once, by rank 0
    assert (tmp_path / "run" / "checkpoints" / "epoch_0001.pt").exists()


def accelerate_launch(args, cwd, timeout=300):
    """`accelerate launch --multi_gpu --num_processes 2 -m cli.app ...`: two CPU processes over gloo."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m", "cli.app", *map(str, args)]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.mark.slow
def test_accelerate_launch_two_processes_resume_equals_uninterrupted(tmp_path):
    """The CLI under `accelerate launch` (2 processes): a run stopped after epoch 1 and resumed ends with the
    same LoRA as an uninterrupted 2-process run; only rank 0 writes outputs and reports."""
    from tests.kit.clip import save_tiny_spm
    from tests.kit.diffusion import save_tiny_pipeline

    save_tiny_pipeline(tmp_path / "base")
    save_tiny_spm(tmp_path / "spm")
    (tmp_path / "p.txt").write_text("a cat\na dog\na car\na tree\na house\n")
    common = ["spo-train", "--base", tmp_path / "base", "--spm", tmp_path / "spm", "--prompts", tmp_path / "p.txt", "--resolution", "8",
              "--lora-rank", "2", "--lr", "1e-3", "--batch-size", "1", "--set", "threshold=0.0", "--epochs", "2",
              "--num-samples", "0", "--no-tensorboard", "--json", "--vae", "base"]  # fmt: skip
    full = accelerate_launch([*common, "--out", tmp_path / "full"], cwd=os.getcwd())
    assert full.returncode == 0, full.stderr[-3000:]
    rep = json.loads(full.stdout)  # one report: rank 1 prints nothing
    assert rep["processes"] == 2 and rep["finished"] and rep["pairs_kept"] > 0
    part = accelerate_launch([*common, "--out", tmp_path / "part", "--stop-after-epochs", "1"], cwd=os.getcwd())
    assert part.returncode == 0, part.stderr[-3000:]
    assert json.loads(part.stdout)["epochs_done"] == 1
    done = accelerate_launch([*common, "--out", tmp_path / "part", "--resume"], cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "full" / "spo_lora_diffusers.safetensors")
    b = load_file(tmp_path / "part" / "spo_lora_diffusers.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
