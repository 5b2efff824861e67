"""What a method is: one data preparation, one step function, optional option checks. The loop knows nothing else.

A step gets the method's share of the batch and returns its loss, the anchor cross-entropy it can offer (on the
teacher sample y_t or the reference) for the `kappa` mix, and metrics to log. Replay of labelled data and the
LM-loss term are added by the loop, the same way for every method that has `auxiliary_losses`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
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


def shifted_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits aligned with batch['input_ids'][:, 1:] (position t scores token t+1)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]


def student_and_teacher_logits(inp: StepInputs, batch: dict[str, torch.Tensor]
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifted logits of the student (with grad) and of the teacher (without) on the same tokens, cut to their
    common width: models of one family may pad their embedding tables beyond the tokenizer's tokens to different
    sizes (Qwen2.5-7B 152,064 rows, Qwen2.5-0.5B 151,936), rows that no text ever holds."""
    s_logits = shifted_logits(inp.student, batch)
    with torch.no_grad():
        t_logits = shifted_logits(inp.teacher, batch)
    width = min(s_logits.shape[-1], t_logits.shape[-1])
    return s_logits[..., :width], t_logits[..., :width]


def divergence_logits(inp: StepInputs, batch: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the student's shifted logits, for its anchor; the student's and the teacher's logits the divergence
    compares): the full vocabularies with a live teacher, or the k + 1 categories of offline top-k teacher logits
    (losses/top_k.py)."""
    if inp.teacher_logits is None:
        s_logits, t_logits = student_and_teacher_logits(inp, batch)
        return s_logits, s_logits, t_logits
    s_logits = shifted_logits(inp.student, batch)
    cache = inp.teacher_logits
    ids, logps, tail = cache.batch(inp.examples, s_logits.shape[1], s_logits.device)
    s_div, t_div = coarse_logits(s_logits, ids, logps, tail, cache.tail, cache.temperature)
    return s_logits, s_div, t_div


def nll_from_logits(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    mask = batch["response_mask"][:, 1:].float()
    return token_mean_nll(selective_log_softmax(logits, batch["input_ids"][:, 1:]) * mask, mask)


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
