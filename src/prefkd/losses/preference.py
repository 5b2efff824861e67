"""Sequence-level preference losses on summed response log-probs. Pure tensor functions.

Convention (DPKD): chosen = the teacher's sample y_t, rejected = the student's sample y_s; "policy" is the
student q, "reference" is the teacher p. Every returned loss is the mean over the batch; rewards are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpkd_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 0.1,
              length_normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPKD, paper form (Eq. 9): r(y) = beta/|y| (log q(y|x) - log p(y|x)); L = -mean log sigmoid(r(y_t) - r(y_s)).

    With `length_normalize=False` the reward is beta (log q - log p) (Eq. 8, the "w/o length norm" ablation).
    Returns (loss, chosen_rewards [B], rejected_rewards [B]).
    """
    chosen = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected = beta * (policy_rejected_logps - reference_rejected_logps)
    if length_normalize:
        chosen = chosen / chosen_lengths.clamp(min=1)
        rejected = rejected / rejected_lengths.clamp(min=1)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()
