"""Sequence-level preference losses on summed response log-probs. Pure tensor functions.

Convention (DPKD): chosen = the teacher's sample y_t, rejected = the student's sample y_s; "policy" is the
student q, "reference" is the teacher p. Every returned loss is the mean over the batch; rewards are detached.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def implicit_reward(policy_logps: torch.Tensor, reference_logps: torch.Tensor, lengths: torch.Tensor,
                    beta: float, length_normalize: bool = True) -> torch.Tensor:
    """DPKD's implicit reward r(y) = beta/|y| (log q(y|x) - log p(y|x)) (Eq. 9), or beta (log q - log p) (Eq. 8).

    `lengths` are response lengths in tokens, clamped at 1 so that an empty response gives beta (log q - log p)
    rather than a division by zero; they are ignored without length normalisation. Not detached: the losses
    differentiate through it; detach it for logging.
    """
    reward = beta * (policy_logps - reference_logps)
    return reward / lengths.clamp(min=1) if length_normalize else reward


def dpkd_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
              reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
              chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 0.1,
              length_normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPKD, paper form (Eq. 9): r(y) = beta/|y| (log q(y|x) - log p(y|x)); L = -mean log sigmoid(r(y_t) - r(y_s)).

    With `length_normalize=False` the reward is beta (log q - log p) (Eq. 8, the "w/o length norm" ablation).
    Returns (loss, chosen_rewards [B], rejected_rewards [B]).
    """
    chosen = implicit_reward(policy_chosen_logps, reference_chosen_logps, chosen_lengths, beta, length_normalize)
    rejected = implicit_reward(policy_rejected_logps, reference_rejected_logps, rejected_lengths, beta,
                               length_normalize)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def dpkd_loo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                  reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
                  chosen_lengths: torch.Tensor, rejected_lengths: torch.Tensor, beta: float = 0.1,
                  length_normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPKD with K >= 2 student samples per prompt and a leave-one-out baseline on the rejected term (prefkd's).

    Chosen tensors are [B], rejected ones [B, K]; the K samples y_s_i of a prompt must be drawn independently from
    the student q. The value is the DPKD loss averaged over the K pairs (y_t, y_s_i). Its gradient is, per prompt,
    (1/K) sum_i [c_i grad log q(y_s_i) - s_i grad r(y_t)], with s_i = sigmoid(r(y_s_i) - r(y_t)) and
    c_i = s_i beta/|y_s_i| (s_i beta without length normalisation): a REINFORCE estimator in the samples y_s_i
    (docs/methods.md, DPKD). Here each c_i is replaced by c_i - mean_{j != i} c_j (detached). Since y_s_j is
    independent of y_s_i given x and y_t, E[c_j grad log q(y_s_i)] = E[c_j] E[grad log q(y_s_i)] = 0 for j != i,
    so the expected gradient is plain DPKD's, with and without length normalisation; the chosen side's gradient is
    DPKD's unchanged. A baseline on s_i alone would be biased with length normalisation: it would multiply
    beta/|y_s_i| grad log q(y_s_i), and E_q[grad log q(y) / |y|] != 0 when lengths vary.
    Returns (loss, chosen_rewards [B], rejected_rewards [B, K]).
    """
    k = policy_rejected_logps.shape[-1]
    if policy_rejected_logps.dim() != 2 or k < 2:
        raise ValueError(f"dpkd_loo_loss needs [B, K >= 2] rejected tensors, got {tuple(policy_rejected_logps.shape)}")
    chosen = implicit_reward(policy_chosen_logps, reference_chosen_logps, chosen_lengths, beta, length_normalize)
    rejected = implicit_reward(policy_rejected_logps, reference_rejected_logps, rejected_lengths, beta,
                               length_normalize)
    logits = chosen[:, None] - rejected
    # r is linear in log q, so this is d r(y_s_i) / d log q(y_s_i): beta/|y_s_i|, or beta.
    slope = implicit_reward(torch.ones_like(rejected), torch.zeros_like(rejected), rejected_lengths, beta,
                            length_normalize)
    # The baseline must be of the whole coefficient c_i = s_i * slope_i of grad log q(y_s_i): a baseline on s_i
    # alone would still carry sample i's own slope, which is correlated with grad log q(y_s_i).
    coefficient = (torch.sigmoid(-logits) * slope).detach()
    baseline = (coefficient.sum(-1, keepdim=True) - coefficient) / (k - 1)
    # Value: the plain DPKD mean (the second term is 0); gradient: minus baseline_i * grad log q(y_s_i) per sample.
    loss = (-F.logsigmoid(logits).mean()
            - (baseline * (policy_rejected_logps - policy_rejected_logps.detach())).mean())
    return loss, chosen.detach(), rejected.detach()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO: L = -mean log sigmoid(beta h), h = (log q(y_t) - log p(y_t)) - (log q(y_s) - log p(y_s)).

    Equals `dpkd_loss(..., length_normalize=False)`. Rewards are beta (log q - log p) of each side.
    """
    chosen = beta * (policy_chosen_logps - reference_chosen_logps)
    rejected = beta * (policy_rejected_logps - reference_rejected_logps)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def ipo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO: L = mean (h - 1/(2 beta))^2, h as in `dpo_loss`, on summed log-probs.

    TRL averages the log-probs per token before forming h; this uses sums, as docs/methods.md asks.
    Rewards are beta (log q - log p) of each side.
    """
    chosen_logratio = policy_chosen_logps - reference_chosen_logps
    rejected_logratio = policy_rejected_logps - reference_rejected_logps
    loss = ((chosen_logratio - rejected_logratio - 1 / (2 * beta)) ** 2).mean()
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def cpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
             beta: float = 0.1, nll_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPO (no reference): L = mean [-log sigmoid(beta (log q(y_t) - log q(y_s))) - nll_weight log q(y_t) / |y_t|].

    Rewards are beta log q of each side.
    """
    chosen = beta * policy_chosen_logps
    rejected = beta * policy_rejected_logps
    nll = -policy_chosen_logps / chosen_lengths.clamp(min=1)
    loss = (-F.logsigmoid(chosen - rejected) + nll_weight * nll).mean()
    return loss, chosen.detach(), rejected.detach()


def simpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor, chosen_lengths: torch.Tensor,
               rejected_lengths: torch.Tensor, beta: float = 2.0,
               gamma: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (no reference): L = -mean log sigmoid(beta/|y_t| log q(y_t) - beta/|y_s| log q(y_s) - gamma).

    Rewards are beta/|y| log q of each side (without the margin gamma).
    """
    chosen = beta * policy_chosen_logps / chosen_lengths.clamp(min=1)
    rejected = beta * policy_rejected_logps / rejected_lengths.clamp(min=1)
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, chosen.detach(), rejected.detach()


def plad_rank_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                   margin: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PLaD ranking calibration: L = mean max(0, delta - log q(y+) + log q(y-)), delta = `margin`.

    Reward-free: the "rewards" returned are log q(y+) and log q(y-).
    """
    loss = torch.relu(margin - policy_chosen_logps + policy_rejected_logps).mean()
    return loss, policy_chosen_logps.detach(), policy_rejected_logps.detach()


def plad_margin_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
                     chosen_scores: torch.Tensor, rejected_scores: torch.Tensor,
                     beta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PLaD margin calibration: L = mean max(0, beta (s(y+) - s(y-)) - log q(y+) + log q(y-)).

    Scores are used as given: detach them upstream if they must not be trained. The "rewards" returned are
    log q(y+) and log q(y-).
    """
    loss = torch.relu(beta * (chosen_scores - rejected_scores) - policy_chosen_logps + policy_rejected_logps).mean()
    return loss, policy_chosen_logps.detach(), policy_rejected_logps.detach()
