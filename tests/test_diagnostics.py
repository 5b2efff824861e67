"""Held-out diagnostics: values checked against a direct computation, and they never change training."""

import json

import torch
from support import reference_examples

from prefkd.data.collate import Example, collate, encode_prompts
from prefkd.diagnostics import HeldOutDiagnostics
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.methods import MethodConfig, get_method
from prefkd.models import build_model, load_model
from prefkd.train import RunData, TrainConfig, train

SAMPLING = SamplingConfig(max_new_tokens=12, batch_size=8)


def _models(tokenizer):
    return build_model("gpt2", "micro", tokenizer, seed=1).eval(), build_model("gpt2", "nano", tokenizer, seed=2)


def test_values_match_a_direct_float64_computation(tokenizer, tiny_suite):
    teacher, student = _models(tokenizer)
    prompts = encode_prompts(tokenizer, [r.prompt for r in tiny_suite.d[:5]])
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    diag = HeldOutDiagnostics(teacher, prompts, SAMPLING, beta=0.1, pad_id=pad, eos_id=eos, seed=7)
    row = diag(student)
    # Independent recomputation, one sequence at a time, in float64.
    y_t = sample_responses(teacher, prompts, SAMPLING, pad, eos, 7)
    y_s = sample_responses(student, prompts, SAMPLING, pad, eos, 8)
    assert y_t == diag.teacher_samples

    def logp(model, p, y):
        ids = torch.tensor([p + y])
        logits = model.double()(input_ids=ids).logits[0, len(p) - 1: -1]
        return logits.log_softmax(-1).gather(-1, torch.tensor(y)[:, None]).sum().item(), logits

    r_t, r_s, rkl, fkl, f_fkl, f_rkl = [], [], [], [], [], []
    for p, yt, ys in zip(prompts, y_t, y_s, strict=True):
        qt, s_logits = logp(student, p, yt)
        pt, t_logits = logp(teacher, p, yt)
        qs, _ = logp(student, p, ys)
        ps, _ = logp(teacher, p, ys)
        r_t.append(0.1 * (qt - pt) / len(yt))
        r_s.append(0.1 * (qs - ps) / len(ys))
        rkl.append((qs - ps) / len(ys))
        fkl.append((pt - qt) / len(yt))
        lp, lq = t_logits[0].log_softmax(-1), s_logits[0].log_softmax(-1)
        f_fkl.append((lp.exp() * (lp - lq)).sum().item())
        f_rkl.append((lq.exp() * (lq - lp)).sum().item())
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    expected = {"reward_teacher": mean(r_t), "reward_student": mean(r_s), "seq_rkl": mean(rkl), "seq_fkl": mean(fkl),
                "first_token_fkl": mean(f_fkl), "first_token_rkl": mean(f_rkl)}
    for key, v in expected.items():
        assert abs(row[key] - v) < 1e-4, (key, row[key], v)
    assert abs(row["reward_margin"] - (mean(r_t) - mean(r_s))) < 1e-4


def test_diagnostics_leave_training_unchanged_and_are_logged(tokenizer, tiny_suite, tmp_path):
    recs = tiny_suite.d0
    ex = reference_examples(tokenizer, recs)
    prompts = encode_prompts(tokenizer, [r.prompt for r in tiny_suite.d[:4]])
    cfg = TrainConfig(steps=4, batch_size=4, lr=1e-3, log_every=1, save_every=0)
    weights = []
    for name, every in (("plain", 0), ("diag", 2)):
        teacher, student = _models(tokenizer)
        diag = HeldOutDiagnostics(teacher, prompts, SAMPLING, 0.1, tokenizer.pad_token_id, tokenizer.eos_token_id)
        train(get_method("sft"), student, tokenizer, RunData(ex), cfg, MethodConfig(), SAMPLING, tmp_path / name,
              diagnostics=diag if every else None, diagnostics_every=every)
        weights.append(load_model(str(tmp_path / name / "model")).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    rows = [json.loads(line) for line in (tmp_path / "diag" / "diagnostics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(r["first_token_fkl"] >= 0 and r["first_token_rkl"] >= 0 for r in rows)
    assert rows[1]["epoch"] > 0
    assert not (tmp_path / "plain" / "diagnostics.jsonl").read_text()
    assert any((tmp_path / "diag" / "tensorboard").iterdir())


def test_collate_first_position_scores_the_first_response_token(tokenizer):
    batch = collate([Example([5, 6, 7], [8, 9])], tokenizer.pad_token_id)
    first = batch["response_mask"][0, 1:].nonzero()[0].item()
    assert first == 3 - 1  # the index HeldOutDiagnostics uses: len(prompt) - 1
