"""PLaD (Zhang et al. 2024, arXiv 2406.02886): pseudo-preference pairs, the teacher's sample over the initial
student's, both sampled once before training, with a ranking (Eq. 4) or margin (Eq. 5-8) calibration loss."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from prefkd import losses
from prefkd.config import opt
from prefkd.console import console
from prefkd.data.collate import Example
from prefkd.logprobs import group_token_logps, token_mean_nll
from prefkd.methods import data
from prefkd.methods.base import Method, MethodOutput, StepInputs
from prefkd.scoring import embedding_f1


@dataclass
class PLaDConfig:
    ALIASES: ClassVar[dict[str, str]] = {"beta": "score_scale"}

    margin: float = opt(1.0, "plad: PLaD's beta, the ranking-calibration margin delta of Eq. 4")
    score_scale: float = opt(1.0, "plad-margin: scale of the score difference that sets each pair's margin "
                                  "(Eq. 5-8; prefkd's name, it was plad.beta)")
    temperature: float = opt(0.7, "plad: sampling temperature of the pair cache (teacher and initial student)")
    length_normalize: bool = opt(False, "plad, plad-margin: rank per-token mean log-probs log P(y|x) / L_y instead "
                                        "of summed ones; Eq. 4-5 print the sum, the paper's ablations credit 'length "
                                        "normalization' (docs/methods.md, PLaD)")


def pairs(ctx: data.PrepareContext) -> data.MethodData:
    """y+ from the teacher, y- from the initial student, both sampled once at temperature plad.temperature, scored
    against the reference (or the instruction) with the student's embedding F-measure (for plad-margin)."""
    sampling = replace(ctx.run.sampling, temperature=ctx.run.distill.plad.temperature)
    chosen = data.sample_cache(ctx, "teacher", sampling)
    rejected = data.sample_cache(ctx, "student", sampling)
    emb = ctx.student.get_input_embeddings().weight
    out = []
    for rec, (p, pos, _), (_, neg, _) in zip(ctx.prompts, chosen, rejected, strict=True):
        ref = ctx.renderer.encode([rec.references[0] if rec.references else rec.instruction])[0]
        out.append(Example(p, pos, neg, embedding_f1(emb, pos, ref), embedding_f1(emb, neg, ref)))
    same = sum(e.response_ids == e.rejected_ids for e in out)
    if same:
        console.print(f"{same} of {len(out)} pairs have identical responses (no ranking gradient from them)")
    return data.MethodData(out)


def plad_step(margin_form: bool):
    def step(inp: StepInputs) -> MethodOutput:
        q_tok, mask = group_token_logps(inp.student, [e.prompt_ids for e in inp.examples],
                                        [[e.response_ids for e in inp.examples],
                                         [e.rejected_ids for e in inp.examples]], inp.device)
        b = len(inp.examples)
        q = q_tok.sum(-1)
        if inp.cfg.plad.length_normalize:
            q = q / mask.sum(-1).clamp(min=1)
        if margin_form:
            s_pos = torch.tensor([e.chosen_score for e in inp.examples], device=inp.device)
            s_neg = torch.tensor([e.rejected_score for e in inp.examples], device=inp.device)
            loss, lp, ln = losses.plad_margin_loss(q[:b], q[b:], s_pos, s_neg, inp.cfg.plad.score_scale)
        else:
            loss, lp, ln = losses.plad_rank_loss(q[:b], q[b:], inp.cfg.plad.margin)
        anchor = token_mean_nll(q_tok[:b], mask[:b])
        return MethodOutput(loss, anchor, {"plad_loss": loss.item(), "logp_chosen": lp.mean().item(),
                                           "logp_rejected": ln.mean().item(),
                                           "pair_accuracy": (lp > ln).float().mean().item()},
                            loss_count=b, anchor_count=mask[:b].sum().item())

    return step


METHODS = [
    Method("plad", "PLaD ranking calibration on cached (teacher, initial student) pairs: "
           "max(0, delta - log q(y+) + log q(y-))", "PLaD (2406.02886) Eq. 4", "pairs (cached)", False, pairs,
           plad_step(False), "plad.margin 1, plad.temperature 0.7", samples_before_training=True),
    Method("plad-margin", "PLaD margin calibration: the margin scaled by the score difference of y+ and y- against "
           "the reference (student-embedding F-measure)", "PLaD (2406.02886) Eq. 5-8", "pairs (cached)", False,
           pairs, plad_step(True), "plad.score_scale 1, plad.temperature 0.7", samples_before_training=True),
]
