"""Diagnostics during distillation (DPKD paper sections 4.3-4.5) on a fixed held-out batch of prompts.

Every `every` steps the loop hands the student to `HeldOutDiagnostics`, which measures, on the same prompts each
time:
  reward_teacher / reward_student   implicit reward r(y) = beta/|y| (log q(y) - log p(y)) of teacher samples y_t
                                    (drawn once: the teacher is frozen) and of fresh student samples y_s
  reward_margin                     r(y_t) - r(y_s)
  seq_rkl                           sequence reverse KL estimate  mean (log q(y_s) - log p(y_s)) / |y_s|
  seq_fkl                           sequence forward KL estimate  mean (log p(y_t) - log q(y_t)) / |y_t|
  first_token_fkl / first_token_rkl exact KL(p || q) and KL(q || p) of the first response token (Table 3)
  teacher_logp_student, len_student the teacher's per-token log-prob of y_s, and their length
Student samples use a fixed seed, so two rows differ because the student changed, not the dice; the global RNG is
restored afterwards, so a run with diagnostics trains exactly like one without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from prefkd import losses
from prefkd.config import opt
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.logprobs import selective_log_softmax


@dataclass
class DiagnosticsConfig:
    every: int = opt(50, "steps between diagnostics on a fixed held-out batch (0 = off); also at the first and "
                         "last step")
    prompts: int = opt(32, "prompts in the fixed batch (from data.heldout, else the first distillation prompts)")
    seed: int = opt(1234, "sampling seed of the fixed batch's teacher and student responses")


class HeldOutDiagnostics:
    def __init__(self, teacher: PreTrainedModel, prompt_ids: list[list[int]], sampling: SamplingConfig, beta: float,
                 pad_id: int, eos_id: int | tuple[int, ...], seed: int = 1234):
        self.teacher, self.prompts, self.sampling, self.beta = teacher.eval(), prompt_ids, sampling, beta
        self.pad, self.eos, self.seed = pad_id, eos_id, seed
        # Sampled at the first call, where the student (and, after train() placed it, the teacher) lives: on a GPU
        # run the teacher is still on the CPU here.
        self.teacher_samples: list[list[int]] | None = None

    @torch.no_grad()
    def __call__(self, student: PreTrainedModel) -> dict[str, float]:
        was_training = student.training
        student.eval()
        device = next(student.parameters()).device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)  # a teacher train() did not place (one loaded for the diagnostics alone)
        with _rng_kept():
            if self.teacher_samples is None:
                self.teacher_samples = sample_responses(self.teacher, self.prompts, self.sampling, self.pad, self.eos,
                                                        self.seed)
            y_s = sample_responses(student, self.prompts, self.sampling, self.pad, self.eos, self.seed + 1)
        b = len(self.prompts)
        batch = collate([Example(p, r) for p, r in zip(self.prompts * 2, self.teacher_samples + y_s, strict=True)],
                        self.pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels, mask = batch["input_ids"][:, 1:], batch["response_mask"][:, 1:].float()
        s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        t_logits = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        width = min(s_logits.shape[-1], t_logits.shape[-1])  # padded embedding tables (methods.base)
        s_logits, t_logits = s_logits[..., :width], t_logits[..., :width]
        q = (selective_log_softmax(s_logits, labels) * mask).sum(-1)
        p = (selective_log_softmax(t_logits, labels) * mask).sum(-1)
        n = mask.sum(-1).clamp(min=1)
        r = losses.implicit_reward(q, p, n, self.beta)  # length-normalised (Eq. 9), as in the loss
        # The first response token's distribution depends on the prompt only: read it off the y_t half.
        first = torch.zeros_like(mask[:b])
        first[torch.arange(b), torch.tensor([len(x) - 1 for x in self.prompts], device=device)] = 1
        student.train(was_training)
        return {
            "reward_teacher": r[:b].mean().item(), "reward_student": r[b:].mean().item(),
            "reward_margin": (r[:b] - r[b:]).mean().item(),
            "seq_rkl": ((q[b:] - p[b:]) / n[b:]).mean().item(), "seq_fkl": ((p[:b] - q[:b]) / n[:b]).mean().item(),
            "first_token_fkl": losses.forward_kl(s_logits[:b], t_logits[:b], first).item(),
            "first_token_rkl": losses.reverse_kl(s_logits[:b], t_logits[:b], first).item(),
            "teacher_logp_student": (p[b:] / n[b:]).mean().item(), "len_student": mask[b:].sum(-1).mean().item(),
        }


class _rng_kept:
    """Run a block without moving the global torch RNG (sampling inside seeds it)."""

    def __enter__(self):
        self.state = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
