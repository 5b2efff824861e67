"""PLaD's score function (Eq. 6-8): an F-measure of greedy-matched cosine similarities of token embeddings.

The paper's Eq. 6-8 are garbled in print; this is our reading, stated plainly: with the *student's* input
embeddings (no external model), R = mean over reference tokens of the best cosine match among candidate tokens,
P = the same from the candidate side, F = 2PR / (P + R) (BERTScore's form on static embeddings, n = 1).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def embedding_f1(embeddings: torch.Tensor, candidate_ids: list[int], reference_ids: list[int]) -> float:
    """F-measure in [-1, 1] of `candidate_ids` against `reference_ids` under the embedding matrix [V, d]."""
    if not candidate_ids or not reference_ids:
        return 0.0
    cand = torch.nn.functional.normalize(embeddings[candidate_ids].float(), dim=-1)
    ref = torch.nn.functional.normalize(embeddings[reference_ids].float(), dim=-1)
    sim = cand @ ref.T  # [|cand|, |ref|]
    precision = sim.max(dim=1).values.mean()
    recall = sim.max(dim=0).values.mean()
    denom = precision + recall
    return 0.0 if denom.abs() < 1e-12 else float(2 * precision * recall / denom)
