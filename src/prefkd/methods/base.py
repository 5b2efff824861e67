"""What a method is: one data preparation, one step function, optional option checks. The loop knows nothing else.

A step gets the method's share of the batch and returns its loss, the anchor cross-entropy it can offer (on the
teacher sample y_t or the reference) for the `kappa` mix, and metrics to log. Replay of labelled data and the
LM-loss term are added by the loop, the same way for every method that has `auxiliary_losses`.

The shared forward helpers return logits only where a loss reads them (`Scored`): from the first column any sequence
of the batch scores, with that cut's targets and mask beside them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd.cache import TeacherCache
from prefkd.data.collate import Example
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.logprobs import selective_log_softmax, token_mean_nll
from prefkd.losses.top_k import coarse_logits
from prefkd.teacher_client import TeacherServer

if TYPE_CHECKING:
    from prefkd.methods.config import MethodConfig
    from prefkd.methods.cross_tokenizer import TeacherTokens
    from prefkd.methods.data import MethodData, PrepareContext
    from prefkd.teacher_logits import TeacherLogits


@dataclass
class StepInputs:
    student: PreTrainedModel  # as prepared by Accelerate: forward with grad
    student_sampler: PreTrainedModel  # the unwrapped student, for sampling
    teacher: PreTrainedModel | TeacherServer | None  # a server: methods with `sequence_teacher` only
    examples: list[Example]  # prompts; response_ids hold the reference / teacher sample where the method uses one
    sampling: SamplingConfig
    cfg: MethodConfig
    pad_id: int
    eos_id: int | tuple[int, ...]  # the tokens that end a sampled response
    device: torch.device
    # Identical on every process (seeded from seed and step): for a random choice about the whole global batch.
    shared_rng: torch.Generator | None = None
    teacher_cache: TeacherCache | None = None  # dpkd family, teacher_samples=cached
    # Fraction of training done before this step, in [0, 1): for schedules that move with training (distillm2).
    progress: float = 0.0
    teacher_tokens: TeacherTokens | None = None  # the teacher's own tokens, when its tokenizer differs
    tokenizer: PreTrainedTokenizerBase | None = None  # the student's (texts of samples: byte lengths)
    teacher_logits: TeacherLogits | None = None  # offline top-k teacher logits replacing the teacher (teacher.logits)


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
    trains_on: str  # what the examples hold, for `prefkd methods`
    needs_teacher: bool  # the teacher model runs during training
    prepare: Callable[[PrepareContext], MethodData]  # the examples (and any cache) the step consumes
    step: Callable[[StepInputs], MethodOutput]
    key_params: str = ""
    # prepare() draws sample caches before training: `prefkd compare` builds them before its workers start.
    samples_before_training: bool = False
    auxiliary_losses: bool = True  # the loop adds replay and the LM loss (not for sft: it is cross-entropy already)
    samples_in_training: bool = False  # the step decodes with the student (or the teacher) as it trains
    check: Callable[[MethodConfig], None] | None = None  # refuses option combinations this method cannot run
    # The teacher's tokenizer may differ from the student's: the method uses only texts and sequence log-probs
    # (methods/cross_tokenizer.py). Other methods that run the teacher compare token distributions: same tokenizer.
    cross_tokenizer: bool = False
    # The method needs from the teacher only its samples and the log-probs of given responses, which a completions
    # server gives: `teacher.url` may replace `teacher.path` (teacher_client.py).
    sequence_teacher: bool = False
    # Trains from offline teacher logits (teacher.logits) instead of a live teacher: given the method's config and
    # the tail mode, returns the temperature its divergence applies, or raises ConfigError for settings it cannot run
    # that way. None: the method needs the live teacher.
    cached_logits: Callable[[MethodConfig, str], float] | None = None

    @property
    def black_box(self) -> bool:
        return not self.needs_teacher


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class Scored:
    """Shifted logits of a batch from column `start` on, with the targets and the mask of those same columns.

    Column j is the shifted position start + j: it scores input_ids[:, start + j + 1]. Logits, targets and mask
    travel together so that a loss never reads logits cut at one column with a mask cut at another."""

    logits: torch.Tensor  # [B, C, V] (or [B, C, k + 1]: the categories of offline top-k teacher logits)
    labels: torch.Tensor  # [B, C] the tokens the columns score
    mask: torch.Tensor  # [B, C] the counted columns: response_mask[:, 1:][:, start:]
    start: int  # the first shifted column kept

    def rows(self, index: slice) -> Scored:
        """The same columns of some of the sequences (distillm2 splits its [y_t; y_s] batch)."""
        return Scored(self.logits[index], self.labels[index], self.mask[index], self.start)


def scored_start(response_mask: torch.Tensor) -> int:
    """The first column of the shifted mask `response_mask[:, 1:]` where any row counts a position (0 when none
    does). Columns before it are masked in every row: right-padded prompts put them there, shortest prompt first."""
    counted = response_mask[:, 1:].bool().any(0).nonzero()
    return int(counted[0, 0]) if len(counted) else 0


def shifted_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor], cut: bool = True) -> Scored:
    """Logits aligned with batch['input_ids'][:, 1:] (position t scores token t+1), from the first scored column on.

    The LM head runs only on positions start..T-1 (the model's `logits_to_keep`, as in logprobs.py: logits only
    where they are scored); the last of them scores no token and is dropped. The prompt columns it skips cost a
    [B, T, V] matmul and every elementwise pass of a divergence, forward and backward, to contribute exact zeros.
    `cut=False` keeps every column, for callers that index absolute positions (ULD)."""
    width = batch["input_ids"].shape[1]
    start = scored_start(batch["response_mask"]) if cut else 0
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   logits_to_keep=width - start).logits[:, :-1]
    return Scored(logits, batch["input_ids"][:, 1 + start:], batch["response_mask"][:, 1 + start:], start)


def student_and_teacher_logits(inp: StepInputs, batch: dict[str, torch.Tensor]) -> tuple[Scored, Scored]:
    """Shifted logits of the student (with grad) and of the teacher (without) on the same tokens and columns, cut to
    their common width: models of one family may pad their embedding tables beyond the tokenizer's tokens to
    different sizes (Qwen2.5-7B 152,064 rows, Qwen2.5-0.5B 151,936), rows that no text ever holds."""
    s = shifted_logits(inp.student, batch)
    with torch.no_grad():
        t = shifted_logits(inp.teacher, batch)
    width = min(s.logits.shape[-1], t.logits.shape[-1])
    return replace(s, logits=s.logits[..., :width]), replace(t, logits=t.logits[..., :width])


def divergence_logits(inp: StepInputs, batch: dict[str, torch.Tensor]) -> tuple[Scored, Scored, Scored]:
    """(the student's shifted logits, for its anchor; the student's and the teacher's logits the divergence
    compares), all on the same columns: the full vocabularies with a live teacher, or the k + 1 categories of
    offline top-k teacher logits (losses/top_k.py)."""
    if inp.teacher_logits is None:
        s, t = student_and_teacher_logits(inp, batch)
        return s, s, t
    s = shifted_logits(inp.student, batch)
    cache = inp.teacher_logits
    # The cache places a sequence's rows at absolute shifted positions (len(prompt) - 1 on): read the full width,
    # then drop the same leading columns as the student's logits (masked in every row, so zeros there).
    ids, logps, tail = cache.batch(inp.examples, batch["input_ids"].shape[1] - 1, s.logits.device)
    cut = slice(s.start, None)
    s_div, t_div = coarse_logits(s.logits, ids[:, cut], logps[:, cut], tail[:, cut], cache.tail, cache.temperature)
    return s, replace(s, logits=s_div), replace(s, logits=t_div)


def nll_from_logits(s: Scored) -> torch.Tensor:
    """Cross-entropy of the scored logits on their targets, averaged over the counted tokens."""
    mask = s.mask.float()
    return token_mean_nll(selective_log_softmax(s.logits, s.labels) * mask, mask)


def sample(model: PreTrainedModel, examples: list[Example], inp: StepInputs) -> list[list[int]]:
    return sample_responses(model, [e.prompt_ids for e in examples], inp.sampling, inp.pad_id, inp.eos_id)


def sample_teacher(examples: list[Example], inp: StepInputs) -> list[list[int]]:
    """Teacher samples of the examples' prompts, in the teacher's own tokens (its prompts, pad and end tokens when
    its tokenizer differs from the student's)."""
    tt = inp.teacher_tokens
    draw = inp.teacher.sample if isinstance(inp.teacher, TeacherServer) else partial(sample_responses, inp.teacher)
    if tt is None:
        return draw([e.prompt_ids for e in examples], inp.sampling, inp.pad_id, inp.eos_id)
    pad = tt.teacher.tokenizer.pad_token_id
    return draw([tt.prompts[e.index] for e in examples], inp.sampling, pad, tt.teacher_stops)
