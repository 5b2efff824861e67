"""The PLaD step: ranking calibration on summed or per-token mean log-probs of the cached pair."""

import pytest
import torch

from prefkd.data.collate import Example
from prefkd.generation import SamplingConfig
from prefkd.methods.base import StepInputs
from prefkd.methods.config import MethodConfig
from prefkd.methods.plad import PLaDConfig, plad_step
from prefkd.models import build_model

CPU = torch.device("cpu")


def _logp(model, prompt, response):
    """log q(response | prompt) in float64, one plain forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[len(prompt) - 1: -1], -1)
    return lp.gather(-1, torch.tensor(response)[:, None]).sum().item()


@pytest.mark.parametrize("length_normalize", [False, True])
def test_plad_rank_loss_on_summed_or_mean_log_probs(tokenizer, length_normalize):
    student = build_model("gpt2", "nano", tokenizer, seed=2).eval()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (5, 9, 4, 2, 6, 3, 7, 1, 8)]
    prompts, chosen, rejected = seqs[:3], seqs[3:6], seqs[6:]
    cfg = MethodConfig(plad=PLaDConfig(margin=0.3, length_normalize=length_normalize))
    examples = [Example(p, c, r) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    inp = StepInputs(student, student, None, examples, SamplingConfig(), cfg, tokenizer.pad_token_id,
                     tokenizer.eos_token_id, CPU)
    out = plad_step(False)(inp)

    def score(p, y):
        return _logp(student, p, y) / (len(y) if length_normalize else 1)

    hinge = [max(0.0, 0.3 - score(p, c) + score(p, r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]
    assert out.loss.item() == pytest.approx(sum(hinge) / 3, abs=1e-5)
    mean_chosen = sum(score(p, c) for p, c in zip(prompts, chosen, strict=True)) / 3
    assert out.metrics["logp_chosen"] == pytest.approx(mean_chosen, abs=1e-5)
