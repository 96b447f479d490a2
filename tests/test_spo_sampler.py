"""The SPO rollout on a tiny SDXL-shaped UNet with a toy step-aware scorer (brightness of x̂0)."""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pycore.diffusion.text import PromptEncoder  # noqa: E402
from pycore.spo.config import from_preset  # noqa: E402
from pycore.diffusion.schedule import leading_timesteps  # noqa: E402
from pycore.spo.sampler import spo_rollout  # noqa: E402
from tests.kit.diffusion import build_tiny_models  # noqa: E402

LATENT = (4, 8, 8)
PROMPTS = ["a cat", "a dog", "a red car"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    m = build_tiny_models(tmp_path_factory.mktemp("tok"), sdxl=True, seed=0)
    enc = PromptEncoder(m.tokenizer, m.text_encoder, m.tokenizer_2, m.text_encoder_2, resolution=64)
    return m, enc(PROMPTS)


class Recorder:
    """Toy scorer: 10 × mean brightness of x̂0; records every call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x0, prompt_idx, t):
        s = 10 * x0.mean(dim=(1, 2, 3))
        self.calls.append((x0.clone(), prompt_idx.clone(), t.clone(), s.clone()))
        return s


def run(tiny, seed=0, **over):
    m, cond = tiny
    cfg = from_preset("sdxl", resolution=64, **over)
    rec = Recorder()
    r = spo_rollout(m.unet, cond, rec, cfg, LATENT, torch.Generator().manual_seed(seed))
    return r, rec, cfg


def test_sdxl_segments_give_four_transitions_each_with_the_segment_label(tiny):
    r, rec, cfg = run(tiny, threshold=0.0)
    ts = leading_timesteps(20)
    b, k = len(PROMPTS), 2
    # judged at the next segment start (551, 351, 151) and the final images at t = 0
    assert [int(c[2][0]) for c in rec.calls] == [551, 351, 151, 0]
    assert all(c[0].shape == (b * k, *LATENT) and c[1].tolist() == [0, 0, 1, 1, 2, 2] for c in rec.calls)
    tr = r.transitions
    # threshold 0 keeps every pair with distinct scores: 4 segments × 4 transitions × 3 prompts
    assert len(tr) == 4 * 4 * b and r.stats.judged == 4 * b and r.stats.kept == 4 * b
    for seg, start in enumerate(cfg.branch_steps()):
        rows = tr.t.new_tensor([(seg * 4 + j) * b for j in range(4)])
        for p in range(b):
            idx = rows + p
            assert tr.t[idx].tolist() == ts[start : start + 4]
            assert (tr.prompt_idx[idx] == p).all()
            # first transition of a segment starts from the shared x_t; the others chain
            torch.testing.assert_close(tr.x_t_win[idx[0]], tr.x_t_lose[idx[0]], rtol=0, atol=0)
            assert not torch.equal(tr.x_next_win[idx[0]], tr.x_next_lose[idx[0]])
            for j in range(3):
                assert torch.equal(tr.x_next_win[idx[j]], tr.x_t_win[idx[j + 1]])
                assert torch.equal(tr.x_next_lose[idx[j]], tr.x_t_lose[idx[j + 1]])
        # the stored win/lose are the best/worst candidates of the judged segment end
        scores = rec.calls[seg][3].view(b, k)
        x0 = rec.calls[seg][0].view(b, k, *LATENT)
        if seg == 3:  # final step: the judged x̂0 are the candidates themselves
            last = tr.x_next_win[rows[3] : rows[3] + b]
            torch.testing.assert_close(last, x0[torch.arange(b), scores.argmax(1)])
    assert sorted(r.stats.win_scores) != sorted(r.stats.lose_scores)
    assert all(w > lo for w, lo in zip(r.stats.win_scores, r.stats.lose_scores, strict=True))


def test_threshold_keeps_only_pairs_with_a_large_enough_softmax_gap(tiny):
    r, rec, _ = run(tiny, threshold=0.3)
    expected = 0
    for c in rec.calls:
        s = c[3].view(len(PROMPTS), 2)
        p = torch.softmax(torch.stack([s.max(1).values, s.min(1).values], 1), 1)
        expected += int(((p[:, 0] - p[:, 1]) > 0.3).sum())
    assert r.stats.kept == expected and len(r.transitions) == 4 * expected
    assert r.stats.acceptance_rate == expected / (4 * len(PROMPTS))
    print(f"kept {expected} of {4 * len(PROMPTS)} pairs at threshold 0.3")
    r_all, _, _ = run(tiny, threshold=0.999)
    assert len(r_all.transitions) == 0 and r_all.transitions.x_t_win.shape[1:] == LATENT


def test_sd15_variant_branches_every_step_with_k_candidates(tiny):
    r, rec, cfg = run(tiny, threshold=0.0, num_candidates=4, num_inner_step=0)
    b = len(PROMPTS)
    ts = leading_timesteps(20)
    assert [int(c[2][0]) for c in rec.calls] == ts[5:] + [0]
    assert all(c[0].shape[0] == 4 * b for c in rec.calls)
    assert len(r.transitions) == 16 * b  # steps 4..19, one transition each
    assert sorted(set(r.transitions.t.tolist()), reverse=True) == ts[4:]


def test_continues_from_a_uniformly_random_candidate_reproducibly(tiny):
    r1, rec1, _ = run(tiny, seed=3, threshold=0.0)
    r2, _, _ = run(tiny, seed=3, threshold=0.0)
    r3, _, _ = run(tiny, seed=4, threshold=0.0)
    assert torch.equal(r1.final_latents, r2.final_latents) and torch.equal(r1.transitions.x_next_win, r2.transitions.x_next_win)
    assert not torch.equal(r1.final_latents, r3.final_latents)
    # the final latents are one of the last candidates; collect which one over several seeds
    picks = {"win": 0, "lose": 0}
    for seed in range(6):
        r, rec, _ = run(tiny, seed=seed, threshold=0.0)
        x0, s = rec.calls[-1][0].view(len(PROMPTS), 2, *LATENT), rec.calls[-1][3].view(len(PROMPTS), 2)
        for p in range(len(PROMPTS)):
            match = [torch.equal(r.final_latents[p], x0[p, j]) for j in range(2)]
            assert sum(match) == 1
            picks["win" if match.index(True) == int(s[p].argmax()) else "lose"] += 1
        # the next segment starts from the chosen candidate of the previous one
        tr = r.transitions
        b = len(PROMPTS)
        for seg in range(3):
            seg_end_rows = [(seg * 4 + 3) * b + p for p in range(b)]
            next_start = [((seg + 1) * 4) * b + p for p in range(b)]
            for e, n in zip(seg_end_rows, next_start, strict=True):
                assert torch.equal(tr.x_t_win[n], tr.x_next_win[e]) or torch.equal(tr.x_t_win[n], tr.x_next_lose[e])
    print("continuation picks over 18 prompt-rollouts:", picks)
    assert picks["win"] > 0 and picks["lose"] > 0  # not always the winner: P(all equal) = 2·0.5^18


def test_spm_scorer_scores_decoded_x0_at_the_given_timesteps(tiny, tmp_path):
    from pycore.spo.sampler import spm_scorer
    from tests.kit.clip import tiny_spm
    from tests.kit.tokenizer import write_tiny_clip_tokenizer

    m, _ = tiny
    spm = tiny_spm(write_tiny_clip_tokenizer(tmp_path / "spm_tok"), seed=0)
    with torch.no_grad():  # non-identity time conditioning, so the timestep matters
        for n, p in spm.model.named_parameters():
            if "adaLN_modulation" in n or "t_embedder" in n:
                p.normal_(0, 0.2)
    score = spm_scorer(spm, m.vae, PROMPTS)
    x0 = torch.randn(4, *LATENT, generator=torch.Generator().manual_seed(0))
    idx, t = torch.tensor([2, 0, 1, 2]), torch.tensor([551, 551, 0, 0])
    got = score(x0, idx, t)
    want = spm.score_latents(x0, m.vae, [PROMPTS[i] for i in idx], t)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (4,) and not got.requires_grad
    assert not torch.allclose(score(x0, idx, torch.tensor([951] * 4)), got)
