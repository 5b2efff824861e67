"""prefkd.methods.distillm2: where the student's samples y_s come from (drawn every epoch from the current student,
or once from the initial student), and that the step trains on them; its logits only on the scored columns."""

import dataclasses
import json

import pytest
import torch
from support import assert_same_value_and_grads, lm_head_rows
from test_methods import _distill, setup  # noqa: F401  (the module's models and files)

from prefkd import losses
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig
from prefkd.methods import METHODS, MethodConfig, StepInputs, distillm2
from prefkd.models import build_model, load_tokenizer


def _spy(monkeypatch):
    """The y_s and sampling settings of every step, the step itself unchanged."""
    seen, real = [], distillm2.step

    def step(inp):
        calls = []
        original = distillm2.sample_responses

        def sample(model, prompts, sampling, pad, eos, seed=None):
            out = original(model, prompts, sampling, pad, eos, seed)
            calls.append((model is inp.student_sampler, sampling.temperature, sampling.top_p, out))
            return out

        monkeypatch.setattr(distillm2, "sample_responses", sample)
        try:
            return real(inp)
        finally:
            monkeypatch.setattr(distillm2, "sample_responses", original)
            seen.append((inp, calls))

    monkeypatch.setitem(METHODS, "distillm2", dataclasses.replace(METHODS["distillm2"], step=step))
    return seen


def test_student_samples_are_drawn_every_epoch_from_the_current_student(setup, monkeypatch, tmp_path):  # noqa: F811
    root, files, prompts = setup
    seen = _spy(monkeypatch)
    res = _distill(root, files, prompts, "distillm2", tmp_path / "run", extra=["train.steps=4"])  # 8 prompts: 2 epochs
    assert res.exit_code == 0, res.output
    assert len(seen) == 4
    for inp, calls in seen:
        (from_student, temperature, top_p, ys), = calls  # one draw per step, by the current student
        assert from_student and (temperature, top_p) == (0.8, 0.95)
        assert len(ys) == len(inp.examples)
    assert not list((tmp_path / "run" / "cache").glob("student-*.jsonl"))  # no initial-student cache


def test_initial_student_samples_come_from_a_cache_and_no_step_samples(setup, monkeypatch, tmp_path):  # noqa: F811
    root, files, prompts = setup
    seen = _spy(monkeypatch)
    cache = tmp_path / "cache"
    res = _distill(root, files, prompts, "distillm2", tmp_path / "run",
                   extra=["train.steps=2", "distill.distillm2.student_samples=initial", f"distill.cache_dir={cache}"])
    assert res.exit_code == 0, res.output
    assert all(calls == [] for _, calls in seen)
    (student_cache,) = cache.glob("student-*.jsonl")
    cached = {row["index"]: row["response"] for row in map(json.loads, student_cache.read_text().splitlines()[1:])}
    tok = load_tokenizer(str(root / "student" / "model"))
    for inp, _ in seen:
        for e in inp.examples:  # y_s is the initial student's cached sample of that prompt, in its text
            assert tok.decode(e.rejected_ids, skip_special_tokens=True).strip() == cached[e.index]


def test_student_samples_choice_is_checked_when_the_config_is_built():
    from prefkd.errors import ConfigError

    with pytest.raises(ConfigError, match="student_samples"):
        distillm2.DistiLLM2Config(student_samples="always")


def _mean_logp(logits, labels, mask):
    m = mask.float()
    return (logits.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * m).sum(-1) / m.sum(-1).clamp(min=1)


@pytest.mark.parametrize("alpha_schedule", ["fixed", "adaptive"])
@pytest.mark.parametrize("prompt_lengths, y_s_lengths", [((5, 9, 3), (3, 5, 2)), ((4, 60, 6), (3, 0, 5))])
def test_step_on_the_scored_columns_equals_the_full_logits(tokenizer, prompt_lengths, y_s_lengths, alpha_schedule):
    """The step runs the LM heads from the first column any of its 2B rows scores (methods/base.py). The columns
    cut are masked in every row, so the per-sequence token means, the adaptive alpha, the loss, the anchor and
    every gradient are those of the full [2B, T, V] logits (the second batch has an empty y_s, a row with no
    counted token)."""
    student = build_model("gpt2", "nano", tokenizer, seed=2)
    teacher = build_model("gpt2", "micro", tokenizer, seed=1).eval()
    # A confident teacher: the adaptive alpha divides by exp(mean log p) - exp(mean log q), and two random-init
    # models both give ~1/V there, a difference that loses 4 of float32's 7 digits (a 1-ulp change of a sum,
    # 16 columns summed instead of 18, then moves alpha by 2e-5). Sharper teacher logits keep the gap well away
    # from 0, so the comparison measures the cut, not that cancellation.
    with torch.no_grad():
        teacher.transformer.ln_f.weight.mul_(8.0)
    g = torch.Generator().manual_seed(0)
    prompts, y_t, y_s = ([torch.randint(1, 300, (n,), generator=g).tolist() for n in lengths]
                         for lengths in (prompt_lengths, (4, 2, 6), y_s_lengths))
    c = distillm2.DistiLLM2Config(student_samples="initial", alpha_schedule=alpha_schedule, beta_schedule="code")
    examples = [Example(p, t, r) for p, t, r in zip(prompts, y_t, y_s, strict=True)]
    inp = StepInputs(student, student, teacher, examples, SamplingConfig(), MethodConfig(distillm2=c),
                     tokenizer.pad_token_id, tokenizer.eos_token_id, torch.device("cpu"), progress=0.3)
    with lm_head_rows(student) as rows:
        out = distillm2.step(inp)
    # The reference: the step's computation on the full logits.
    b = len(examples)
    batch = collate([Example(p, y) for p, y in zip(prompts * 2, y_t + y_s, strict=True)], tokenizer.pad_token_id)
    assert rows == [batch["input_ids"].shape[1] - (min(prompt_lengths) - 1)]
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask, labels = batch["response_mask"][:, 1:], batch["input_ids"][:, 1:]
    alpha_t = alpha_s = c.alpha
    if alpha_schedule == "adaptive":
        with torch.no_grad():
            lq, lp = _mean_logp(s, labels, mask).exp(), _mean_logp(t, labels, mask).exp()
            gap_t, gap_s = lp[:b] - lq[:b], lq[b:] - lp[b:]
            alpha_t = losses.distillm2_adaptive_alpha(gap_t, gap_t.mean(), c.alpha)
            alpha_s = losses.distillm2_adaptive_alpha(gap_s, gap_s.mean(), c.alpha)
        assert out.metrics["alpha_t"] == pytest.approx(alpha_t.mean().item(), rel=1e-5)
        assert out.metrics["alpha_s"] == pytest.approx(alpha_s.mean().item(), rel=1e-5)
        assert min(alpha_t.min(), alpha_s.min()) < c.alpha  # the schedule moved some alpha off its ceiling
    w_t, w_s = losses.distillm2_weights(0.3, "code")
    want, _, _ = losses.distillm2_loss(s[:b], t[:b], mask[:b], s[b:], t[b:], mask[b:], alpha_t, alpha_s, w_t, w_s)
    assert_same_value_and_grads(student, out.loss, want)
    m = mask[:b].float()
    nll = -(s[:b].log_softmax(-1).gather(-1, labels[:b].unsqueeze(-1)).squeeze(-1) * m).sum() / m.sum()
    assert_same_value_and_grads(student, out.anchor_nll, nll)
