"""DPKD (Li et al. 2024, arXiv 2406.19774): the student's implicit reward r(y) = beta/|y| log q(y)/p(y) must prefer
the teacher's sample y_t over the student's own y_s, both drawn during training (Algorithm 1), plus anchors.

The sampled-pairs machinery here (`sampled_pairs`, `pair_step`) also runs the other preference forms of DPKD's
Table 2 (methods/preference.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from prefkd import losses
from prefkd.cache import TeacherCache, teacher_cache_key
from prefkd.config import opt
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError
from prefkd.logprobs import group_token_logps, packed_token_logps, token_mean_nll
from prefkd.methods import data
from prefkd.methods.base import (
    Method,
    MethodOutput,
    Scored,
    StepInputs,
    sample,
    sample_teacher,
    student_and_teacher_logits,
    to_device,
)
from prefkd.methods.cross_tokenizer import TeacherTokens, byte_length
from prefkd.packing import packing_supported
from prefkd.teacher_client import TeacherServer

if TYPE_CHECKING:
    from prefkd.methods.config import MethodConfig

ANCHORS = ("ce", "kd", "rkl", "ce+rkl")
_CHOICES = {"teacher_samples": ("fresh", "cached"), "baseline": ("none", "loo"), "anchor": ANCHORS,
            "length_unit": ("auto", "tokens", "bytes")}


@dataclass
class DPKDConfig:
    beta: float = opt(0.1, "dpkd, dpkd-token: DPKD's beta, the scale of the implicit reward beta/|y| log q/p")
    length_normalize: bool = opt(True, "dpkd: divide rewards by response length (Eq. 9); false = Eq. 8 ablation")
    length_unit: str = opt("auto", "dpkd family: what |y| counts: 'tokens' (each model's own tokens: log q/|y|_S - "
                                   "log p/|y|_T, the paper's form when the tokenizers agree), 'bytes' (the UTF-8 "
                                   "length of the response text, the same for both models), 'auto' = tokens with "
                                   "one tokenizer, bytes across tokenizers")
    teacher_samples: str = opt("fresh", "dpkd family: 'fresh' samples y_t every batch (Algorithm 1); 'cached' "
                                        "samples y_t once per prompt (the first time it is drawn) and keeps it with "
                                        "its teacher log-prob: later epochs run neither teacher sampling nor a "
                                        "teacher forward on y_t")
    student_samples: int = opt(1, "dpkd family: student samples y_s per prompt (K); the loss averages the K pairs")
    baseline: str = opt("none", "dpkd: 'loo' subtracts from each y_s's gradient coefficient the mean coefficient of "
                                "the prompt's other samples (needs student_samples >= 2; prefkd's, not the paper's)")
    anchor: str = opt("ce", "dpkd family: the kappa anchor: 'ce' (cross-entropy on y_t, the released code's), "
                            "'kd' (forward KL to the teacher's token distributions on y_t), 'rkl' (reverse KL to "
                            "them on the student's own sample y_s, the rkl method's loss) or 'ce+rkl' (one token "
                            "mean over y_t's CE tokens and y_s's reverse-KL tokens); all but 'ce' are prefkd's")

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"distill.dpkd.{key} must be one of {', '.join(allowed)}, not "
                                  f"'{getattr(self, key)}'")
        if self.student_samples < 1:
            raise ConfigError("distill.dpkd.student_samples must be at least 1")


PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                     "MethodConfig"], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def sampled_pairs(pair_loss: PairLoss):
    """Algorithm 1 of the DPKD paper: y_t from the teacher (fresh or cached) and y_s from the current student."""

    def step(inp: StepInputs) -> MethodOutput:
        prompts = [e.prompt_ids for e in inp.examples]
        if inp.cfg.dpkd.teacher_samples == "cached":
            y_t, known = _cached_teacher_samples(inp)
        else:
            y_t, known = sample_teacher(inp.examples, inp), [None] * len(prompts)
        k = inp.cfg.dpkd.student_samples
        flat = sample(inp.student_sampler, inp.examples * k, inp)  # sample j of prompt i at j * B + i
        y_s = [flat[j * len(prompts): (j + 1) * len(prompts)] for j in range(k)]
        # y_t is in the teacher's tokens; the teacher scores y_t and y_s in its own tokens, the student in its own.
        tt = inp.teacher_tokens
        teacher_prompts = [tt.prompts[e.index] for e in inp.examples] if tt else prompts
        y_s_teacher = [[tt.to_teacher(y, _stops(inp)) for y in ys] for ys in y_s] if tt else y_s
        if tt is not None:
            teacher_prompts = tt.fit(teacher_prompts, [y_t, *y_s_teacher])
        p_t = p_s = None
        if inp.teacher is not None:
            p_t, p_s = teacher_logps(inp.teacher, teacher_prompts, y_t, y_s_teacher, known, inp.device)
        if inp.teacher_cache is not None:
            new = [(e.index, y, lp) for e, y, k, lp in zip(inp.examples, y_t, known, p_t.tolist(), strict=True)
                   if k is None]
            if new:
                inp.teacher_cache.add(new)
        teacher_lengths = None
        if tt is not None:
            teacher_lengths = torch.tensor([len(y) for y in [*y_t, *[y for ys in y_s_teacher for y in ys]]],
                                           dtype=torch.float32, device=inp.device)
            y_t = [tt.to_student(y) for y in y_t]
        return pair_step(inp, y_t, y_s, pair_loss, p_t, p_s, teacher_lengths)

    return step


def _cached_teacher_samples(inp: StepInputs) -> tuple[list[list[int]], list[float | None]]:
    """y_t and log p(y_t) from the teacher cache; prompts drawn for the first time are sampled now.

    Their sampling is seeded by the cache (not by the global generator), so the student's samples, and a resumed
    run that finds some of these prompts already cached, see the same random stream."""
    cache = inp.teacher_cache
    if cache is None or inp.teacher is None:
        raise ConfigError("distill.dpkd.teacher_samples=cached needs a teacher and its cache (prefkd distill "
                          "builds it under distill.cache_dir)")
    hits = [cache.get(e.index) for e in inp.examples]
    missing = [e for e, h in zip(inp.examples, hits, strict=True) if h is None]
    sampled: dict[int, list[int]] = {}
    if missing:
        cuda = [inp.device.index or 0] if inp.device.type == "cuda" else []  # manual_seed reseeds CUDA too
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cache.sampling_seed([e.index for e in missing]))
            sampled = dict(zip([e.index for e in missing], sample_teacher(missing, inp), strict=True))
    y_t = [h[0] if h else sampled[e.index] for e, h in zip(inp.examples, hits, strict=True)]
    return y_t, [h[1] if h else None for h in hits]


def teacher_logps(teacher: PreTrainedModel | TeacherServer, prompts: list[list[int]], y_t: list[list[int]],
                  y_s: list[list[list[int]]], known_t: list[float | None], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t) [B], log p(y_s) [K * B]) under the frozen teacher, for K student samples per prompt (`y_s[j][i]`,
    branch-major); y_t is scored only where `known_t` has no value."""
    if isinstance(teacher, TeacherServer):
        return teacher.pair_logps(prompts, y_t, y_s, known_t, device)
    b, k = len(prompts), len(y_s)
    with torch.no_grad():
        if not packing_supported(teacher) or all(x is None for x in known_t):
            p = group_token_logps(teacher, prompts, [y_t, *y_s], device)[0].sum(-1)
            return p[:b], p[b:]
        # The K samples are branches 0..K-1 of every prompt, y_t branch K where it is still unknown: one forward.
        groups = [(pr, [ys[i] for ys in y_s] + ([] if x is not None else [t]))
                  for i, (pr, t, x) in enumerate(zip(prompts, y_t, known_t, strict=True))]
        logps, seq, _ = packed_token_logps(teacher, groups, device)
        sums = torch.zeros((k + 1) * b, dtype=torch.float32, device=logps.device).index_add(0, seq, logps)
        cached = torch.tensor([float("nan") if x is None else x for x in known_t], device=sums.device)
        return torch.where(torch.isnan(cached), sums[k * b:], cached), sums[: k * b]


def pair_step(inp: StepInputs, y_t: list[list[int]], y_s: list[list[list[int]]], pair_loss: PairLoss,
              p_t: torch.Tensor | None = None, p_s: torch.Tensor | None = None,
              teacher_lengths: torch.Tensor | None = None) -> MethodOutput:
    """The DPKD family's loss on given pairs (student tokens) with the teacher's log-probs `p_t` [B], `p_s` [K * B]
    (None: no teacher), for K student samples per prompt (`y_s[j][i]`); `teacher_lengths` [(K + 1) * B]: the
    token counts of y_t and the y_s in the teacher's tokens, when its tokenizer differs.

    The student scores y_t and every y_s in one packed forward that runs each prompt once. With K > 1 the loss
    averages the K pairs (y_t, y_s_j), or, with `dpkd.baseline=loo`, uses `losses.dpkd_loo_loss`."""
    prompts = [e.prompt_ids for e in inp.examples]
    b, k = len(prompts), len(y_s)
    q_tok, mask = group_token_logps(inp.student, prompts, [y_t, *y_s], inp.device)
    q, n = q_tok.sum(-1), mask.sum(-1)
    n_tokens = n  # the student's token counts, for the length metrics whatever the loss's |y| is
    metrics: dict[str, float] = {}
    if p_t is not None and p_s is not None:
        n_teacher = (n if teacher_lengths is None else teacher_lengths).clamp(min=1)
        # The teacher's per-token log-prob of the student's samples: rises as the student learns what p knows.
        metrics["teacher_logp_student"] = (p_s / n_teacher[b:]).mean().item()
        metrics["seq_rkl"] = (q[b:].detach() / n[b:].clamp(min=1) - p_s / n_teacher[b:]).mean().item()
        n, p_t, p_s = _lengths(inp, [*y_t, *[y for ys in y_s for y in ys]], n, n_teacher, p_t, p_s)
    else:
        p_t, p_s = torch.zeros_like(q[:b]), torch.zeros_like(q[b:])
        n = _lengths(inp, [*y_t, *[y for ys in y_s for y in ys]], n)[0]
    if inp.cfg.dpkd.baseline == "loo":
        if k < 2 or pair_loss is not dpkd_pair_loss:
            raise ConfigError("distill.dpkd.baseline=loo needs method dpkd and distill.dpkd.student_samples >= 2")
        # [K * B] branch-major -> [B, K]
        loss, r_t, r_s = losses.dpkd_loo_loss(q[:b], q[b:].view(k, b).T, p_t, p_s.view(k, b).T, n[:b],
                                              n[b:].view(k, b).T, inp.cfg.dpkd.beta, inp.cfg.dpkd.length_normalize)
        r_t = r_t[:, None].expand(b, k)
    else:
        loss, r_t, r_s = pair_loss(q[:b].repeat(k), q[b:], p_t.repeat(k), p_s, n[:b].repeat(k), n[b:], inp.cfg)
    kind = inp.cfg.dpkd.anchor
    if kind == "ce":
        anchor, anchor_count = token_mean_nll(q_tok[:b], mask[:b]), mask[:b].sum().item()
    elif kind == "kd":
        anchor, anchor_count = _kd_anchor(inp, prompts, y_t), mask[:b].sum().item()
    elif kind == "rkl":
        anchor, anchor_count = _rkl_anchor(inp, prompts, y_s[0]), mask[b: 2 * b].sum().item()
    else:  # ce+rkl: one token mean over the CE tokens of y_t and the reverse-KL tokens of y_s
        n_t, n_s = mask[:b].sum().item(), mask[b: 2 * b].sum().item()
        anchor = (token_mean_nll(q_tok[:b], mask[:b]) * n_t + _rkl_anchor(inp, prompts, y_s[0]) * n_s) / max(
            n_t + n_s, 1)
        anchor_count = n_t + n_s
    metrics.update({
        "pref_loss": loss.item(), "reward_chosen": r_t.mean().item(), "reward_rejected": r_s.mean().item(),
        "margin": (r_t - r_s).mean().item(), "pref_accuracy": (r_t > r_s).float().mean().item(),
        "len_teacher": n_tokens[:b].mean().item(), "len_student": n_tokens[b:].mean().item(),
    })
    return MethodOutput(loss, anchor, metrics, loss_count=b, anchor_count=anchor_count,
                        anchor_name={"ce": "anchor_nll", "kd": "anchor_kl", "rkl": "anchor_rkl",
                                     "ce+rkl": "anchor_ce_rkl"}[kind])


def _stops(inp: StepInputs) -> tuple[int, ...]:
    return (inp.eos_id,) if isinstance(inp.eos_id, int) else tuple(inp.eos_id)


def _lengths(inp: StepInputs, responses: list[list[int]], n: torch.Tensor, n_teacher: torch.Tensor | None = None,
             p_t: torch.Tensor | None = None, p_s: torch.Tensor | None = None):
    """(|y| of every response for the loss, p_t, p_s) under `dpkd.length_unit`.

    bytes: the UTF-8 length of each response's text, for both models. tokens across tokenizers: the rewards
    beta (log q/|y|_S - log p/|y|_T) are the loss's beta/|y|_S (log q - p'), with p' = p |y|_S/|y|_T."""
    unit = _length_unit(inp)
    if unit == "bytes":
        counts = [byte_length(y, inp.tokenizer) for y in responses]
        return torch.tensor(counts, dtype=n.dtype, device=n.device).clamp(min=1), p_t, p_s
    if n_teacher is None or inp.teacher_tokens is None or not inp.cfg.dpkd.length_normalize:
        return n, p_t, p_s
    b = len(p_t)
    scale = n.clamp(min=1) / n_teacher
    return n, p_t * scale[:b], p_s * scale[b:]


def _length_unit(inp: StepInputs) -> str:
    unit = inp.cfg.dpkd.length_unit
    return ("bytes" if inp.teacher_tokens is not None else "tokens") if unit == "auto" else unit


def _kd_anchor(inp: StepInputs, prompts: list[list[int]], y_t: list[list[int]]) -> torch.Tensor:
    """Forward KL to the teacher's token distributions on the teacher samples (the `kd` divergence on y_t)."""
    s, t = _token_logits(inp, prompts, y_t, "kd")
    return losses.forward_kl(s.logits, t.logits, s.mask)


def _rkl_anchor(inp: StepInputs, prompts: list[list[int]], y_s: list[list[int]]) -> torch.Tensor:
    """Reverse KL to the teacher's token distributions on the student's own samples (the `rkl` method's loss)."""
    s, t = _token_logits(inp, prompts, y_s, "rkl")
    return losses.reverse_kl(s.logits, t.logits, s.mask, inp.cfg.rkl.temperature)


def _token_logits(inp: StepInputs, prompts: list[list[int]], responses: list[list[int]], kind: str
                  ) -> tuple[Scored, Scored]:
    """(student logits, teacher logits without grad) on the scored columns of prompt + response, for a token-level
    anchor."""
    if inp.teacher is None or inp.teacher_tokens is not None:
        raise ConfigError(f"distill.dpkd.anchor={kind} needs the teacher's logits over the student's vocabulary: "
                          "use a teacher with the student's tokenizer, or anchor=ce")
    batch = to_device(collate([Example(p, y) for p, y in zip(prompts, responses, strict=True)], inp.pad_id),
                      inp.device)
    return student_and_teacher_logits(inp, batch)


def dpkd_pair_loss(qt, qs, pt, ps, nt, ns, c: MethodConfig):
    return losses.dpkd_loss(qt, qs, pt, ps, nt, ns, c.dpkd.beta, c.dpkd.length_normalize)


def prompts_and_teacher_cache(ctx: data.PrepareContext) -> data.MethodData:
    """The prompts; with `dpkd.teacher_samples=cached`, also the run's cache of teacher samples and log-probs,
    keyed by teacher, prompts, sampling, seed and precision."""
    out = data.prompts(ctx)
    run = ctx.run
    prompt_ids = [e.prompt_ids for e in out.examples]
    if isinstance(ctx.teacher, TeacherServer) and run.distill.dpkd.anchor != "ce":
        raise ConfigError(f"distill.dpkd.anchor={run.distill.dpkd.anchor} compares token distributions, which a "
                          "teacher server (teacher.url) does not give; use anchor=ce")
    if ctx.teacher_renderer is not None:
        if run.distill.dpkd.anchor != "ce":
            raise ConfigError(f"distill.dpkd.anchor={run.distill.dpkd.anchor} compares token distributions, which "
                              "needs the student's tokenizer in the teacher; across tokenizers use anchor=ce")
        out.teacher_tokens = TeacherTokens.build(ctx.teacher_renderer, ctx.renderer, ctx.teacher, ctx.prompts)
        prompt_ids = out.teacher_tokens.prompts
    if run.distill.dpkd.teacher_samples == "cached":
        key = teacher_cache_key(data.teacher_identity(ctx), prompt_ids, run.sampling,
                                run.train.seed, run.train.bf16)
        out.teacher_cache = TeacherCache(data.cache_dir(run) / f"dpkd-teacher-{key}.jsonl", key, run.train.seed)
    return out


def check_baseline(cfg: MethodConfig) -> None:
    if cfg.dpkd.baseline == "loo" and cfg.dpkd.student_samples < 2:
        raise ConfigError("distill.dpkd.baseline=loo needs distill.dpkd.student_samples >= 2")


def refuse_baseline(cfg: MethodConfig) -> None:
    """The preference variants have no leave-one-out form."""
    if cfg.dpkd.baseline == "loo":
        raise ConfigError("distill.dpkd.baseline=loo needs --method dpkd and distill.dpkd.student_samples >= 2")


METHODS = [
    Method("dpkd", "DPKD paper form: teacher sample preferred over student sample by the implicit reward "
           "beta/|y| log q/p, both sampled every batch", "DPKD (2406.19774) Eq. 9, Alg. 1",
           "prompts (samples drawn in training)", True, prompts_and_teacher_cache, sampled_pairs(dpkd_pair_loss),
           "dpkd.beta 0.1, lm_weight, kappa", check=check_baseline, samples_in_training=True, cross_tokenizer=True,
           sequence_teacher=True),
]
