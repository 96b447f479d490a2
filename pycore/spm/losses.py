"""The SPM's training objective and accuracy: pure functions on score tensors (unit tested)."""

from __future__ import annotations

import math
from typing import Any


def pair_loss(score_0: Any, score_1: Any, label_0: Any) -> Any:
    """PickScore's 2-way cross-entropy, mean over pairs; ties (0.5) have minimum 0 (log 0.5 added)."""
    import torch

    logp = torch.log_softmax(torch.stack([score_0.float(), score_1.float()], dim=-1), dim=-1)
    lab0 = label_0.to(logp)
    loss = -(lab0 * logp[:, 0] + (1 - lab0) * logp[:, 1])
    loss = loss + (lab0 == 0.5).to(logp) * math.log(0.5)
    return loss.mean()


def pair_correct(score_0: Any, score_1: Any, label_0: Any) -> tuple[Any, Any]:
    """Per pair: (decided, correct) — ties in the label are not decided and never count."""
    decided = label_0 != 0.5
    correct = ((score_0 > score_1) & (label_0 == 1)) | ((score_0 < score_1) & (label_0 == 0))
    return decided, correct & decided


def margin_labels(score_0: Any, score_1: Any, margin: float) -> Any:
    """Labels from a plain scorer: 1 if p0 − p1 > margin, 0 if p1 − p0 > margin, else 0.5 (tie)."""
    import torch

    p = torch.softmax(torch.stack([score_0.float(), score_1.float()], dim=-1), dim=-1)
    lab = torch.full_like(p[:, 0], 0.5)
    lab[p[:, 0] - p[:, 1] > margin] = 1.0
    lab[p[:, 1] - p[:, 0] > margin] = 0.0
    return lab
