"""Per-token and per-sequence log-probabilities of response tokens.

Position t of the logits scores token t+1; only response tokens (the EOS included) count, never prompt or pad.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel


def selective_log_softmax(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = 8) -> torch.Tensor:
    """log softmax(logits)[labels] without materialising the full [B, T, V] log-softmax at once."""
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], chunk_rows):
        rows = logits[start: start + chunk_rows].float()
        picked = rows.gather(-1, labels[start: start + chunk_rows].unsqueeze(-1)).squeeze(-1)
        out[start: start + chunk_rows] = picked - torch.logsumexp(rows, dim=-1)
    return out


def response_token_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token log-probs [B, T-1], mask [B, T-1]) of the response tokens of a collated batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:].to(torch.float32)
    return selective_log_softmax(logits, labels) * mask, mask


def sequence_logps(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-prob [B], response length [B])."""
    token_logps, mask = response_token_logps(model, batch)
    return token_logps.sum(-1), mask.sum(-1)


def token_mean_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over every counted token of the batch (the one place it is normalised)."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)
