"""PLaD's score function (Eq. 6-8): an F-measure of greedy-matched cosine similarities of token embeddings.

The paper's Eq. 6-8 are garbled in print; this is our reading, stated plainly: with the *student's* input
embeddings (no external model), R = mean over reference tokens of the best match among candidate tokens,
P = the same from the candidate side, F = 2PR / (P + R) (BERTScore's form on static embeddings, n = 1), where a
match is the cosine similarity clipped to [0, 1].
"""

from __future__ import annotations

import torch


@torch.no_grad()
def embedding_f1(embeddings: torch.Tensor, candidate_ids: list[int], reference_ids: list[int]) -> float:
    """F-measure in [0, 1] of `candidate_ids` against `reference_ids` under the embedding matrix [V, d].

    0 when either side is empty or no pair of tokens has a positive cosine similarity (P = R = 0).
    """
    if not candidate_ids or not reference_ids:
        return 0.0
    # float64: the score feeds a margin; rounding should not decide whether F reaches 1.
    cand = torch.nn.functional.normalize(embeddings[candidate_ids].double(), dim=-1)
    ref = torch.nn.functional.normalize(embeddings[reference_ids].double(), dim=-1)
    # The harmonic mean 2PR/(P+R) is only bounded when P and R have the same sign: with raw cosines (static
    # embeddings are often anti-aligned) P + R can be near 0 while PR is not, and F explodes (|F| > 100 for
    # random 768-d embeddings and 1-2-token candidates). BERTScore's contextual embeddings give positive cosines in
    # practice, so its P, R lie in (0, 1]; clipping at 0 gives the same guarantee here by reading "anti-similar"
    # as "no match". Then P, R and F are in [0, 1].
    sim = (cand @ ref.T).clamp(0.0, 1.0)  # [|cand|, |ref|]
    precision = sim.max(dim=1).values.mean().item()
    recall = sim.max(dim=0).values.mean().item()
    if precision + recall == 0.0:
        return 0.0
    # min(): 2PR/(P+R) <= max(P, R) <= 1 exactly, but its rounding may land one ulp above 1.
    return min(1.0, 2 * precision * recall / (precision + recall))
