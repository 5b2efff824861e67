"""Cross-entropy methods: SFT on references, and SeqKD (SFT on cached teacher samples)."""

from __future__ import annotations

from prefkd.data.collate import collate
from prefkd.logprobs import response_token_logps, token_mean_nll
from prefkd.methods import data
from prefkd.methods.base import Method, MethodOutput, StepInputs, to_device


def sft_step(inp: StepInputs) -> MethodOutput:
    token_logps, mask = response_token_logps(inp.student, to_device(collate(inp.examples, inp.pad_id), inp.device))
    nll = token_mean_nll(token_logps, mask)
    return MethodOutput(nll, None, {"nll": nll.item()}, loss_count=mask.sum().item())


METHODS = [
    Method("sft", "token-mean cross-entropy on reference responses", "baseline", "references", False,
           data.references, sft_step, auxiliary_losses=False),
    Method("seqkd", "SFT on cached teacher samples", "Kim & Rush 2016", "teacher samples (cached)", False,
           data.teacher_samples, sft_step, samples_before_training=True),
]
