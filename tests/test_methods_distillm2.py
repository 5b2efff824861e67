"""prefkd.methods.distillm2: where the student's samples y_s come from (drawn every epoch from the current student,
or once from the initial student), and that the step trains on them."""

import dataclasses
import json

import pytest
from test_methods import _distill, setup  # noqa: F401  (the module's models and files)

from prefkd.methods import METHODS, distillm2
from prefkd.models import load_tokenizer


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
