"""Method registry: a method is one step function plus what it needs. The training loop knows nothing else.

A step gets the method's share of the batch and returns its loss, the anchor cross-entropy it can offer (on the
teacher sample y_t or the reference) for the `kappa` mix, and metrics to log. Replay of labelled data and the
LM-loss term are added by the loop, the same way for every method.

What a method consumes (`Method.data`):
  references       reference responses (sft)
  sequences        one response per prompt: the reference when the prompt has one, else a cached teacher sample
  teacher_samples  cached teacher samples, always (seqkd)
  prompts          prompts only; the step samples what it needs (dpkd and its preference variants)
  pairs            cached (teacher sample, initial-student sample) pairs (plad)
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from prefkd import losses
from prefkd.cache import TeacherCache
from prefkd.config import opt
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.logprobs import (
    group_token_logps,
    packed_token_logps,
    packing_supported,
    response_token_logps,
    selective_log_softmax,
    token_mean_nll,
)


@dataclass
class KDConfig:
    temperature: float = opt(1.0, "kd: softmax temperature of both distributions (loss scaled by T^2)")


@dataclass
class GKDConfig:
    beta: float = opt(0.5, "gkd: JSD interpolation; 0 = forward KL, 1 = reverse KL (TRL's convention)")
    lmbda: float = opt(0.5, "gkd: probability that a batch uses student samples instead of the sequences")
    temperature: float = opt(1.0, "gkd: softmax temperature of both distributions")


@dataclass
class RKLConfig:
    temperature: float = opt(1.0, "rkl: softmax temperature of both distributions")


@dataclass
class AKLConfig:
    mu: float = opt(0.5, "akl: teacher-probability mass that defines the head")


@dataclass
class SkewConfig:
    alpha: float = opt(0.1, "skl/srkl: skew of the mixture (DistiLLM uses 0.1)")


@dataclass
class DPKDConfig:
    beta: float = opt(0.1, "dpkd, dpkd-token: temperature of the implicit reward beta/|y| log q/p")
    length_normalize: bool = opt(True, "dpkd: divide rewards by response length (Eq. 9); false = Eq. 8 ablation")
    teacher_samples: str = opt("fresh", "dpkd family: 'fresh' samples y_t every batch (Algorithm 1); 'cached' "
                                        "samples y_t once per prompt (the first time it is drawn) and keeps it with "
                                        "its teacher log-prob: later epochs run neither teacher sampling nor a "
                                        "teacher forward on y_t")
    student_samples: int = opt(1, "dpkd family: student samples y_s per prompt (K); the loss averages the K pairs")
    baseline: str = opt("none", "dpkd: 'loo' subtracts from each y_s's weight the mean weight of the prompt's other "
                                "samples (needs student_samples >= 2; prefkd's, not the paper's)")
    anchor: str = opt("ce", "dpkd family: the kappa anchor: 'ce' (cross-entropy on y_t, the released code's), "
                            "'kd' (forward KL to the teacher's token distributions on y_t), 'rkl' (reverse KL to "
                            "them on the student's own sample y_s, the rkl method's loss) or 'ce+rkl' (one token "
                            "mean over y_t's CE tokens and y_s's reverse-KL tokens); all but 'ce' are prefkd's")


@dataclass
class PrefConfig:
    """Preference-form variants of DPKD's Table 2 (chosen = teacher sample, rejected = student sample)."""

    dpo_beta: float = opt(0.1, "dpo: -log sigmoid(beta h), summed log-probs")
    ipo_beta: float = opt(0.1, "ipo: (h - 1/(2 beta))^2, summed log-probs")
    cpo_beta: float = opt(0.1, "cpo: -log sigmoid(beta (log q(y_t) - log q(y_s))) + NLL(y_t)")
    cpo_nll_weight: float = opt(1.0, "cpo: weight of the token-mean NLL of y_t")
    simpo_beta: float = opt(2.0, "simpo: reward scale")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin")


@dataclass
class PLaDConfig:
    margin: float = opt(1.0, "plad: ranking-calibration margin delta (paper beta)")
    beta: float = opt(1.0, "plad-margin: scale of the score difference")
    temperature: float = opt(0.7, "plad: sampling temperature of the pair cache (teacher and initial student)")


@dataclass
class MethodConfig:
    kappa: float = opt(0.5, "L = (1-kappa) CE(anchor) + kappa L_method; anchor = y_t or the reference; 1 = paper form")
    replay: float = opt(0.5, "share of each batch drawn from labelled references (CE); 0 = paper form")
    lm_weight: float = opt(0.1, "lambda: weight of the LM loss on the pretraining corpus (0 = ablation w/o LM loss)")
    lm_block_size: int = opt(128, "tokens per pretraining-corpus block")
    responses: str = opt("auto", "'sequences' methods: 'auto' = references where prompts have them, else "
                                 "cached teacher samples; 'teacher' = always teacher samples")
    cache_dir: str = opt("", "where sample caches live (shared between runs; keyed by model, data, sampling); "
                             "default OUT/cache")
    kd: KDConfig = field(default_factory=KDConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    rkl: RKLConfig = field(default_factory=RKLConfig)
    akl: AKLConfig = field(default_factory=AKLConfig)
    skew: SkewConfig = field(default_factory=SkewConfig)
    dpkd: DPKDConfig = field(default_factory=DPKDConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    plad: PLaDConfig = field(default_factory=PLaDConfig)


@dataclass
class StepInputs:
    student: PreTrainedModel  # as prepared by Accelerate: forward with grad
    student_sampler: PreTrainedModel  # the unwrapped student, for generate()
    teacher: PreTrainedModel | None
    examples: list[Example]  # prompts; response_ids hold the reference / teacher sample where the method uses one
    sampling: SamplingConfig
    cfg: MethodConfig
    pad_id: int
    eos_id: int
    device: torch.device
    # Identical on every process (seeded from seed and step): for a random choice about the whole global batch.
    shared_rng: torch.Generator | None = None
    teacher_cache: TeacherCache | None = None  # dpkd family, teacher_samples=cached


@dataclass
class MethodOutput:
    loss: torch.Tensor
    anchor_nll: torch.Tensor | None  # CE on the teacher sample or reference, when the method has one
    metrics: dict[str, float]
    # What `loss` and `anchor_nll` are means over (tokens or sequences; None = examples), so that several
    # processes can weight their slices into the mean over the global batch (distributed.py).
    loss_count: float | None = None
    anchor_count: float | None = None
    anchor_name: str = "anchor_nll"  # how the logs name the anchor term (anchor_kl for a KD anchor)


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    paper: str
    data: str  # see the module docstring
    needs_teacher: bool  # the teacher model runs during training (white-box: same tokenizer)
    step: Callable[[StepInputs], MethodOutput]
    key_params: str = ""

    @property
    def black_box(self) -> bool:
        return not self.needs_teacher


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits aligned with batch['input_ids'][:, 1:] (position t scores token t+1)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


def _nll_from_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["response_mask"][:, 1:].float()
    return token_mean_nll(selective_log_softmax(logits, batch["input_ids"][:, 1:]) * mask, mask)


def _sample(model: PreTrainedModel, examples: list[Example], inp: StepInputs) -> list[list[int]]:
    return sample_responses(model, [e.prompt_ids for e in examples], inp.sampling, inp.pad_id, inp.eos_id)


# ---- references / sequences -------------------------------------------------------------------------------


def sft_step(inp: StepInputs) -> MethodOutput:
    token_logps, mask = response_token_logps(inp.student, _to(collate(inp.examples, inp.pad_id), inp.device))
    nll = token_mean_nll(token_logps, mask)
    return MethodOutput(nll, None, {"nll": nll.item()}, loss_count=mask.sum().item())


def teacher_forced(divergence: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MethodConfig], torch.Tensor]):
    """A step applying a token-level divergence on the examples' sequences (reference or teacher sample)."""

    def step(inp: StepInputs) -> MethodOutput:
        batch = _to(collate(inp.examples, inp.pad_id), inp.device)
        s_logits = _logits(inp.student, batch)
        with torch.no_grad():
            t_logits = _logits(inp.teacher, batch)
        loss = divergence(s_logits, t_logits, batch["response_mask"][:, 1:], inp.cfg)
        anchor = _nll_from_logits(s_logits, batch)
        n = batch["response_mask"][:, 1:].sum().item()
        return MethodOutput(loss, anchor, {"divergence": loss.item()}, loss_count=n, anchor_count=n)

    return step


def on_policy(divergence: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, MethodConfig], torch.Tensor],
              student_share: Callable[[MethodConfig], float]):
    """A step applying a divergence on student samples (with probability `student_share`, else the sequences)."""

    def step(inp: StepInputs) -> MethodOutput:
        on = torch.rand((), generator=inp.shared_rng).item() < student_share(inp.cfg)
        seqs = [Example(e.prompt_ids, r) for e, r in zip(inp.examples, _sample(inp.student_sampler, inp.examples, inp),
                                                          strict=True)] if on else inp.examples
        batch = _to(collate(seqs, inp.pad_id), inp.device)
        s_logits = _logits(inp.student, batch)
        with torch.no_grad():
            t_logits = _logits(inp.teacher, batch)
        loss = divergence(s_logits, t_logits, batch["response_mask"][:, 1:], inp.cfg)
        n = batch["response_mask"][:, 1:].sum().item()
        anchor, n_anchor = None, None
        if inp.cfg.kappa < 1 and inp.examples[0].response_ids:
            if not on:
                anchor, n_anchor = _nll_from_logits(s_logits, batch), n
            else:
                token_logps, mask = response_token_logps(inp.student, _to(collate(inp.examples, inp.pad_id),
                                                                           inp.device))
                anchor, n_anchor = token_mean_nll(token_logps, mask), mask.sum().item()
        return MethodOutput(loss, anchor, {"divergence": loss.item(), "on_policy": float(on)}, loss_count=n,
                            anchor_count=n_anchor)

    return step


# ---- sampled pairs: DPKD and its preference variants --------------------------------------------------------

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, MethodConfig],
                    tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def sampled_pairs(pair_loss: PairLoss):
    """Algorithm 1 of the DPKD paper: y_t from the teacher (fresh or cached) and y_s from the current student."""

    def step(inp: StepInputs) -> MethodOutput:
        prompts = [e.prompt_ids for e in inp.examples]
        if inp.cfg.dpkd.teacher_samples == "cached":
            y_t, known = _cached_teacher_samples(inp)
        else:
            y_t, known = _sample(inp.teacher, inp.examples, inp), [None] * len(prompts)
        k = inp.cfg.dpkd.student_samples
        flat = _sample(inp.student_sampler, inp.examples * k, inp)  # sample j of prompt i at j * B + i
        y_s = [flat[j * len(prompts): (j + 1) * len(prompts)] for j in range(k)]
        p_t = p_s = None
        if inp.teacher is not None:
            p_t, p_s = teacher_logps(inp.teacher, prompts, y_t, y_s, known, inp.device)
        if inp.teacher_cache is not None:
            new = [(e.index, y, lp) for e, y, k, lp in zip(inp.examples, y_t, known, p_t.tolist(), strict=True)
                   if k is None]
            if new:
                inp.teacher_cache.add(new)
        return pair_step(inp, y_t, y_s, pair_loss, p_t, p_s)

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
            sampled = dict(zip([e.index for e in missing], _sample(inp.teacher, missing, inp), strict=True))
    y_t = [h[0] if h else sampled[e.index] for e, h in zip(inp.examples, hits, strict=True)]
    return y_t, [h[1] if h else None for h in hits]


def teacher_logps(teacher: PreTrainedModel, prompts: list[list[int]], y_t: list[list[int]],
                  y_s: list[list[list[int]]], known_t: list[float | None], device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(y_t) [B], log p(y_s) [K * B]) under the frozen teacher, for K student samples per prompt (`y_s[j][i]`,
    branch-major); y_t is scored only where `known_t` has no value."""
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
              p_t: torch.Tensor | None = None, p_s: torch.Tensor | None = None) -> MethodOutput:
    """The DPKD family's loss on given pairs with the teacher's log-probs `p_t` [B], `p_s` [K * B] (None: no
    teacher), for K student samples per prompt (`y_s[j][i]`).

    The student scores y_t and every y_s in one packed forward that runs each prompt once. With K > 1 the loss
    averages the K pairs (y_t, y_s_j), or, with `dpkd.baseline=loo`, uses `losses.dpkd_loo_loss`."""
    prompts = [e.prompt_ids for e in inp.examples]
    b, k = len(prompts), len(y_s)
    q_tok, mask = group_token_logps(inp.student, prompts, [y_t, *y_s], inp.device)
    q, n = q_tok.sum(-1), mask.sum(-1)
    metrics: dict[str, float] = {}
    if p_t is not None and p_s is not None:
        n_s = n[b:].clamp(min=1)
        # The teacher's per-token log-prob of the student's samples: rises as the student learns what p knows.
        metrics["teacher_logp_student"] = (p_s / n_s).mean().item()
        metrics["seq_rkl"] = ((q[b:].detach() - p_s) / n_s).mean().item()
    else:
        p_t, p_s = torch.zeros_like(q[:b]), torch.zeros_like(q[b:])
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
        "len_teacher": n[:b].mean().item(), "len_student": n[b:].mean().item(),
    })
    return MethodOutput(loss, anchor, metrics, loss_count=b, anchor_count=anchor_count,
                        anchor_name={"ce": "anchor_nll", "kd": "anchor_kl", "rkl": "anchor_rkl",
                                     "ce+rkl": "anchor_ce_rkl"}[kind])


ANCHORS = ("ce", "kd", "rkl", "ce+rkl")


def _kd_anchor(inp: StepInputs, prompts: list[list[int]], y_t: list[list[int]]) -> torch.Tensor:
    """Forward KL to the teacher's token distributions on the teacher samples (the `kd` divergence on y_t)."""
    s_logits, t_logits, batch = _token_logits(inp, prompts, y_t, "kd")
    return losses.forward_kl(s_logits, t_logits, batch["response_mask"][:, 1:])


def _rkl_anchor(inp: StepInputs, prompts: list[list[int]], y_s: list[list[int]]) -> torch.Tensor:
    """Reverse KL to the teacher's token distributions on the student's own samples (the `rkl` method's loss)."""
    s_logits, t_logits, batch = _token_logits(inp, prompts, y_s, "rkl")
    return losses.reverse_kl(s_logits, t_logits, batch["response_mask"][:, 1:], inp.cfg.rkl.temperature)


def _token_logits(inp: StepInputs, prompts: list[list[int]], responses: list[list[int]], kind: str):
    """(student logits, teacher logits without grad, batch) on prompt + response, for a token-level anchor."""
    if inp.teacher is None:
        raise ConfigError(f"distill.dpkd.anchor={kind} needs the teacher's logits: use a white-box method")
    batch = _to(collate([Example(p, y) for p, y in zip(prompts, responses, strict=True)], inp.pad_id), inp.device)
    with torch.no_grad():
        t_logits = _logits(inp.teacher, batch)
    return _logits(inp.student, batch), t_logits, batch


def dpkd_pair_loss(qt, qs, pt, ps, nt, ns, c: MethodConfig):
    return losses.dpkd_loss(qt, qs, pt, ps, nt, ns, c.dpkd.beta, c.dpkd.length_normalize)


# ---- cached pseudo-preference pairs: PLaD --------------------------------------------------------------------


def plad_step(margin_form: bool):
    def step(inp: StepInputs) -> MethodOutput:
        q_tok, mask = group_token_logps(inp.student, [e.prompt_ids for e in inp.examples],
                                        [[e.response_ids for e in inp.examples],
                                         [e.rejected_ids for e in inp.examples]], inp.device)
        b = len(inp.examples)
        q = q_tok.sum(-1)
        if margin_form:
            s_pos = torch.tensor([e.chosen_score for e in inp.examples], device=inp.device)
            s_neg = torch.tensor([e.rejected_score for e in inp.examples], device=inp.device)
            loss, lp, ln = losses.plad_margin_loss(q[:b], q[b:], s_pos, s_neg, inp.cfg.plad.beta)
        else:
            loss, lp, ln = losses.plad_rank_loss(q[:b], q[b:], inp.cfg.plad.margin)
        anchor = token_mean_nll(q_tok[:b], mask[:b])
        return MethodOutput(loss, anchor, {"plad_loss": loss.item(), "logp_chosen": lp.mean().item(),
                                           "logp_rejected": ln.mean().item(),
                                           "pair_accuracy": (lp > ln).float().mean().item()},
                            loss_count=b, anchor_count=mask[:b].sum().item())

    return step


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sft", "token-mean cross-entropy on reference responses", "baseline", "references", False, sft_step),
    Method("kd", "word-level KD: (1-kappa) CE + kappa forward KL to the teacher on the sequences",
           "Hinton et al. 2015; MiniLLM's KD", "sequences", True,
           teacher_forced(lambda s, t, m, c: losses.forward_kl(s, t, m, c.kd.temperature)),
           "kappa 0.5, kd.temperature 1"),
    Method("seqkd", "SFT on cached teacher samples", "Kim & Rush 2016", "teacher_samples", False, sft_step),
    Method("rkl", "on-policy token-level reverse KL on student samples (MiniLLM-style, not MiniLLM's policy "
           "gradient)", "MiniLLM (Gu et al. 2024), simplified", "sequences", True,
           on_policy(lambda s, t, m, c: losses.reverse_kl(s, t, m, c.rkl.temperature), lambda c: 1.0)),
    Method("gkd", "generalized JSD on student samples with probability lmbda, else the sequences",
           "GKD (Agarwal et al. 2024)", "sequences", True,
           on_policy(lambda s, t, m, c: losses.generalized_jsd(s, t, m, c.gkd.beta, c.gkd.temperature),
                     lambda c: c.gkd.lmbda), "gkd.beta 0.5, gkd.lmbda 0.5"),
    Method("akl", "adaptive KL: head/tail-weighted mix of forward and reverse KL on the sequences",
           "AKL (Wu et al. 2024)", "sequences", True,
           teacher_forced(lambda s, t, m, c: losses.adaptive_kl(s, t, m, c.akl.mu)), "akl.mu 0.5"),
    Method("tvd", "total variation distance on the sequences", "DPKD baselines", "sequences", True,
           teacher_forced(lambda s, t, m, c: losses.total_variation(s, t, m))),
    Method("skl", "skew forward KL on the sequences", "DistiLLM (Ko et al. 2024)", "sequences", True,
           teacher_forced(lambda s, t, m, c: losses.skew_forward_kl(s, t, m, c.skew.alpha)), "skew.alpha 0.1"),
    Method("srkl", "skew reverse KL on the sequences", "DistiLLM (Ko et al. 2024)", "sequences", True,
           teacher_forced(lambda s, t, m, c: losses.skew_reverse_kl(s, t, m, c.skew.alpha)), "skew.alpha 0.1"),
    Method("dpkd", "DPKD paper form: teacher sample preferred over student sample by the implicit reward "
           "beta/|y| log q/p, both sampled every batch", "DPKD (2406.19774) Eq. 9, Alg. 1", "prompts", True,
           sampled_pairs(dpkd_pair_loss), "dpkd.beta 0.1, lm_weight, kappa"),
    Method("dpkd-token", "DPKD as released (LMOps): token-level argmax preference on the sequences, no sampling",
           "DPKD released code", "sequences", True,
           teacher_forced(lambda s, t, m, c: losses.dpkd_token_loss(s, t, m, c.dpkd.beta)), "dpkd.beta 0.1, kappa 0.5"),
    Method("dpo", "DPKD without length normalisation: -log sigmoid(beta h) on summed log-probs",
           "DPKD Table 2 / DPO", "prompts", True,
           sampled_pairs(lambda qt, qs, pt, ps, nt, ns, c: losses.dpo_loss(qt, qs, pt, ps, c.pref.dpo_beta)),
           "pref.dpo_beta 0.1"),
    Method("ipo", "(h - 1/(2 beta))^2 on summed log-probs", "DPKD Table 2 / IPO", "prompts", True,
           sampled_pairs(lambda qt, qs, pt, ps, nt, ns, c: losses.ipo_loss(qt, qs, pt, ps, c.pref.ipo_beta)),
           "pref.ipo_beta 0.1"),
    Method("cpo", "reference-free preference + NLL of the teacher sample", "DPKD Table 2 / CPO", "prompts", True,
           sampled_pairs(lambda qt, qs, pt, ps, nt, ns, c: losses.cpo_loss(qt, qs, nt, c.pref.cpo_beta,
                                                                         c.pref.cpo_nll_weight)),
           "pref.cpo_beta 0.1, pref.cpo_nll_weight 1"),
    Method("simpo", "reference-free, length-normalised preference with a target margin", "DPKD Table 2 / SimPO",
           "prompts", True,
           sampled_pairs(lambda qt, qs, pt, ps, nt, ns, c: losses.simpo_loss(qt, qs, nt, ns, c.pref.simpo_beta,
                                                                           c.pref.simpo_gamma)),
           "pref.simpo_beta 2, pref.simpo_gamma 0.5"),
    Method("plad", "PLaD ranking calibration on cached (teacher, initial student) pairs: "
           "max(0, delta - log q(y+) + log q(y-))", "PLaD (2406.02886) Eq. 4", "pairs", False, plad_step(False),
           "plad.margin 1, plad.temperature 0.7"),
    Method("plad-margin", "PLaD margin calibration: the margin scaled by the score difference of y+ and y- against "
           "the reference (student-embedding F-measure)", "PLaD (2406.02886) Eq. 5-8", "pairs", False,
           plad_step(True), "plad.beta 1, plad.temperature 0.7"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint} Known: {', '.join(METHODS)} (see `prefkd methods`)")
    return METHODS[name]
