"""PLaD's score (`scoring.embedding_f1`): hand-derived values, an independent brute force, and its [0, 1] bound."""

import math

import pytest
import torch

from prefkd.scoring import embedding_f1


def _cos(u, v):
    return sum(a * b for a, b in zip(u, v, strict=True)) / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))


def _brute_f1(emb, cand, ref, clip=True):
    """Plain-Python F-measure; `clip=False` is the former, unbounded form (raw cosines)."""
    rows = emb.double().tolist()

    def sim(i, j):
        c = _cos(rows[i], rows[j])
        return min(1.0, max(0.0, c)) if clip else c

    precision = sum(max(sim(c, r) for r in ref) for c in cand) / len(cand)
    recall = sum(max(sim(c, r) for c in cand) for r in ref) / len(ref)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def test_hand_derived_values():
    # Rows of any norm: only directions count. Tokens 0 = (1, 0), 1 = (0.6, 0.8) scaled by 5, 2 = (1, 0) scaled by 3.
    emb = torch.tensor([[1.0, 0.0], [3.0, 4.0], [3.0, 0.0]])
    # Candidate {0, 1} against reference {2}: best matches 1 and 0.6 -> P = 0.8; R = 1 -> F = 1.6 / 1.8 = 8/9.
    assert embedding_f1(emb, [0, 1], [2]) == pytest.approx(8 / 9, abs=1e-12)
    assert embedding_f1(emb, [2], [0, 1]) == pytest.approx(8 / 9, abs=1e-12)  # P and R swap, F is symmetric
    assert embedding_f1(emb, [0, 1], [0, 1]) == 1.0
    assert embedding_f1(emb, [], [0]) == 0.0 and embedding_f1(emb, [0], []) == 0.0


def test_opposite_signs_are_clipped_not_amplified():
    # Candidate c = (1, 0, 0); reference a at cosine 0.4 to c, b = -c at cosine -1.
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.4, math.sqrt(1 - 0.16), 0.0], [-2.0, 0.0, 0.0]], dtype=torch.float64)
    # Raw cosines: P = 0.4, R = (0.4 - 1)/2 = -0.3, so 2PR/(P+R) = -0.24/0.1 = -2.4, outside [-1, 1].
    assert _brute_f1(emb, [0], [1, 2], clip=False) == pytest.approx(-2.4)
    # Clipped: P = 0.4, R = (0.4 + 0)/2 = 0.2 -> F = 0.16/0.6 = 4/15.
    assert embedding_f1(emb, [0], [1, 2]) == pytest.approx(4 / 15, abs=1e-12)
    # Every pair anti-aligned: P = R = 0 -> F = 0 (not 0/0).
    assert embedding_f1(emb, [2], [0]) == 0.0
    assert embedding_f1(emb, [0, 2], [1, 2]) == pytest.approx(_brute_f1(emb, [0, 2], [1, 2]), abs=1e-12)


@pytest.mark.parametrize("dim,draws", [(128, 3000), (768, 1000)])
def test_bounded_on_random_embeddings_with_short_candidates(dim, draws):
    """Random embeddings and 1-2-token candidates: the raw-cosine form leaves [-1, 1] here; F stays in [0, 1]."""
    g = torch.Generator().manual_seed(dim)
    emb = torch.randn(64, dim, generator=g)
    unit = torch.nn.functional.normalize(emb.double(), dim=-1)
    worst_raw, scores = 0.0, []
    for i in range(draws):
        cand = torch.randint(0, 64, (int(torch.randint(1, 3, (), generator=g)),), generator=g).tolist()
        ref = torch.randint(0, 64, (int(torch.randint(1, 3, (), generator=g)),), generator=g).tolist()
        f = embedding_f1(emb, cand, ref)
        scores.append(f)
        raw = unit[cand] @ unit[ref].T
        p, r = raw.max(1).values.mean().item(), raw.max(0).values.mean().item()
        if p + r != 0:
            worst_raw = max(worst_raw, abs(2 * p * r / (p + r)))
        if i < 50:
            assert f == pytest.approx(_brute_f1(emb, cand, ref), abs=1e-12)
    # The draws are adversarial for the former form (otherwise this test would prove nothing)...
    assert worst_raw > 1.5
    # ... and the clipped F never leaves [0, 1].
    assert min(scores) >= 0.0 and max(scores) <= 1.0
