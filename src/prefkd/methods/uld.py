"""ULD (Boizard et al. 2024, arXiv 2402.12030): token-level KD that works across tokenizers. Each model reads the
same response text in its own tokens; the student learns the text with cross-entropy and matches the *shape* of the
teacher's next-token distributions (the L1 distance between the sorted distributions, a closed-form Wasserstein
distance), aligned by position (the paper's) or by byte spans (TRL GOLD's, with the chain-rule merge).
Formulas: docs/methods.md, "ULD: token-level KD across tokenizers".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prefkd import losses
from prefkd.config import opt
from prefkd.console import console
from prefkd.data.byte_spans import response_byte_spans
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError, DataError
from prefkd.losses.uld import ULD_CE_WEIGHT, ULD_DISTANCE_WEIGHT
from prefkd.methods import data
from prefkd.methods.base import Method, MethodOutput, StepInputs, nll_from_logits, shifted_logits, to_device
from prefkd.methods.cross_tokenizer import TeacherTokens

ALIGNMENTS = ("positional", "bytes")


@dataclass
class ULDConfig:
    lam: float = opt(ULD_DISTANCE_WEIGHT, "uld: weight of the distance term (the official distil_factor, "
                                                 "lambda)")
    ce_weight: float = opt(ULD_CE_WEIGHT, "uld: weight of the cross-entropy on the text in the student's "
                                                 "tokens (official: 1; it keeps token identity, which sorting "
                                                 "discards)")
    student_temperature: float = opt(1.0, "uld: softmax temperature of the student's distributions")
    teacher_temperature: float = opt(1.0, "uld: softmax temperature of the teacher's distributions")
    alignment: str = opt("positional", "uld: 'positional' (the paper's: the t-th response token of each side, up to "
                                       "the shorter) or 'bytes' (TRL GOLD's: groups of tokens ending at the same "
                                       "byte, merged by the chain rule)")

    def __post_init__(self) -> None:
        if self.alignment not in ALIGNMENTS:
            raise ConfigError(f"distill.uld.alignment must be one of {', '.join(ALIGNMENTS)}, not "
                              f"'{self.alignment}'")


def prepare(ctx: data.PrepareContext) -> data.MethodData:
    """The sequences (references, else cached teacher samples) in both models' tokens: each response as plain text
    in each tokenizer (`response_byte_spans`), each prompt in each model's own rendering."""
    run = ctx.run
    teacher = ctx.teacher_renderer or ctx.renderer
    use_refs = run.distill.responses == "auto" and all(r.references for r in ctx.prompts)
    if use_refs:
        texts = [(r.references[0], True) for r in ctx.prompts]
    else:
        ends = set(ctx.renderer.end_ids)
        texts = [(text, bool(ids) and ids[-1] in ends) for _, ids, text in data.sample_cache(ctx, "teacher",
                                                                                              run.sampling)]
    student_prompts, teacher_prompts = ctx.renderer.prompt_ids(ctx.prompts), teacher.prompt_ids(ctx.prompts)
    out, dropped = [], 0
    for i, (text, ended) in enumerate(texts):
        s_ids, _ = response_byte_spans(ctx.renderer.tokenizer, text)
        t_ids, _ = response_byte_spans(teacher.tokenizer, text)
        s_resp = s_ids + (ctx.renderer.end_ids if ended else [])
        if len(student_prompts[i]) > run.train.max_prompt_tokens or \
                len(student_prompts[i]) + len(s_resp) > run.train.max_length:
            dropped += 1
            continue
        out.append(Example(student_prompts[i], s_resp, index=i, text=text, teacher_prompt_ids=teacher_prompts[i],
                           teacher_response_ids=t_ids + (teacher.end_ids if ended else [])))
    if not out:
        raise DataError("no example is left after the length filters; raise train.max_prompt_tokens or "
                        "train.max_length", ctx.source)
    if dropped:
        console.print(f"{ctx.source}: dropped {dropped} of {len(texts)} sequences over the length limits")
    tokens = TeacherTokens.build(teacher, ctx.renderer, ctx.teacher, ctx.prompts) if ctx.teacher_renderer else None
    return data.MethodData(out, teacher_tokens=tokens)


def step(inp: StepInputs) -> MethodOutput:
    c = inp.cfg.uld
    batch = to_device(collate(inp.examples, inp.pad_id), inp.device)
    # Every column (cut=False): the byte alignment (_byte_aligned) indexes each side's rows at absolute positions
    # (len(prompt) - 1 on) of two tokenizations whose prompts differ in length; a cut would need an offset per side.
    s = shifted_logits(inp.student, batch, cut=False)
    teacher_tok = inp.teacher_tokens.teacher.tokenizer if inp.teacher_tokens else inp.tokenizer
    teacher_rows = [Example(e.teacher_prompt_ids, e.teacher_response_ids) for e in inp.examples]
    t_batch = to_device(collate(teacher_rows, teacher_tok.pad_token_id or 0), inp.device)
    with torch.no_grad():
        t = shifted_logits(inp.teacher, t_batch, cut=False)
    ce = nll_from_logits(s)
    s_logits, t_logits, s_mask, t_mask = s.logits, t.logits, s.mask, t.mask
    if c.alignment == "positional":
        # The official defaults: the position predicting the student's EOS is skipped, the teacher's kept.
        distance = losses.uld_positional_loss(s_logits, losses.skip_last_position(s_mask), t_logits, t_mask,
                                              c.student_temperature, c.teacher_temperature)
    else:
        distance = _byte_aligned(inp, s_logits, t_logits, teacher_tok)
    # ULD weighs its own cross-entropy: no kappa anchor (distill.kappa does not apply).
    loss = losses.uld_loss(ce, distance, c.ce_weight, c.lam)
    n = s_mask.sum().item()
    return MethodOutput(loss, None, {"uld_distance": distance.item(), "nll": ce.item()}, loss_count=n)


def _byte_aligned(inp: StepInputs, s_logits: torch.Tensor, t_logits: torch.Tensor, teacher_tok) -> torch.Tensor:
    """Each sequence's response rows, ids and byte spans on both sides (the end token, when there, spans no bytes
    at the text's end), for `losses.uld_byte_aligned_loss`."""
    sides = {"s": ([], [], []), "t": ([], [], [])}
    for i, e in enumerate(inp.examples):
        for key, logits, prompt, response, tok in (("s", s_logits, e.prompt_ids, e.response_ids, inp.tokenizer),
                                                   ("t", t_logits, e.teacher_prompt_ids, e.teacher_response_ids,
                                                    teacher_tok)):
            ids, spans = response_byte_spans(tok, e.text)
            end = len(e.text.encode("utf-8"))
            spans = spans + [(end, end)] * (len(response) - len(ids))
            rows, out_ids, out_spans = sides[key]
            start = len(prompt) - 1  # row t of the shifted logits predicts token t + 1
            rows.append(logits[i, start: start + len(response)])
            out_ids.append(response)
            out_spans.append(spans)
    return losses.uld_byte_aligned_loss(*sides["s"], *sides["t"], inp.cfg.uld.student_temperature,
                                        inp.cfg.uld.teacher_temperature)


METHODS = [
    Method("uld", "token-level KD across tokenizers: CE on the sequences plus lambda x the L1 distance between "
           "sorted next-token distributions", "ULD (Boizard et al. 2024, arXiv 2402.12030)",
           "sequences (references, else cached teacher samples), in both models' tokens", True, prepare, step,
           "uld.lam 1.5, uld.ce_weight 1, uld.alignment positional", samples_before_training=True,
           cross_tokenizer=True),
]
