"""`prefkd analyze noise` (DPKD Fig. 2) on tiny local models."""

import json
import math

import numpy as np
import pytest
import torch
from support import save_lm, tiny_files
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from prefkd.cli import app
from prefkd.data.loaders import load_instructions
from prefkd.evaluate import rouge_l
from prefkd.generation import SamplingConfig, sample_responses
from prefkd.models import resolve_device
from prefkd.recipes.analyze import NoiseConfig, correlations, perturb, plan, response_logps


def test_perturb_draws_seeded_noise_of_the_requested_scale(tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_lm(tmp_path / "m", tokenizer, "tiny"))
    original = {k: v.detach().clone() for k, v in model.named_parameters()}
    perturb(model, original, 0.1, relative=True, seed=7)
    name = "transformer.h.0.mlp.c_fc.weight"  # 128 x 512 weights: the sample std is within a few percent
    delta = dict(model.named_parameters())[name].detach() - original[name]
    assert delta.std().item() == pytest.approx(0.1 * original[name].std().item(), rel=0.03)
    assert abs(delta.mean().item()) < 0.01 * original[name].std().item()
    first = {k: v.detach().clone() for k, v in model.named_parameters()}
    perturb(model, original, 0.1, relative=True, seed=7)  # same seed, same model
    assert all(torch.equal(first[k], v) for k, v in model.named_parameters())
    perturb(model, original, 0.5, relative=False, seed=1)  # absolute: std is the scale itself
    delta = dict(model.named_parameters())[name].detach() - original[name]
    assert delta.std().item() == pytest.approx(0.5, rel=0.03)
    perturb(model, original, 0.0, relative=True, seed=3)  # scale 0 restores the model exactly
    assert all(torch.equal(original[k], v) for k, v in model.named_parameters())
    assert model.lm_head.weight is model.transformer.wte.weight  # tied weights stay tied


def test_plan_measures_scale_zero_once():
    assert plan(NoiseConfig(scales=[0.0, 0.1, 0.2], repeats=2, seed=5)) == [
        (0.0, 0, 5), (0.1, 0, 1005), (0.1, 1, 1006), (0.2, 0, 2005), (0.2, 1, 2006)]


def test_response_logps_match_a_full_softmax(tokenizer, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(save_lm(tmp_path / "m", tokenizer, "micro", seed=4)).eval()
    prompts = [tokenizer("### Instruction:\nhi", add_special_tokens=False)["input_ids"], [5, 6, 7, 8, 9, 10]]
    responses = [[11, 12, tokenizer.eos_token_id], [13]]
    sums, lens = response_logps(model, prompts, responses, tokenizer.pad_token_id, batch_size=1)
    assert lens.tolist() == [3, 1]
    with torch.no_grad():
        for k, (p, y) in enumerate(zip(prompts, responses, strict=True)):
            logp = torch.log_softmax(model(torch.tensor([p + y])).logits[0].double(), -1)
            assert sums[k] == pytest.approx(sum(logp[len(p) - 1 + t, tok].item() for t, tok in enumerate(y)),
                                            abs=1e-4)
    # a context of 5 positions cuts the second prompt from the left: the response is scored after [8, 9, 10, 11]
    cut, _ = response_logps(model, [[5, 6, 7, 8, 9, 10]], [[13]], tokenizer.pad_token_id, 1, context=5)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([[7, 8, 9, 10, 13]])).logits[0, -2].double(), -1)[13].item()
    assert cut[0] == pytest.approx(want, abs=1e-4)


def test_correlations():
    rows = [{"rougeL": r, "seq_rkl": k, "reward_teacher_samples": -k, "reward_margin": 1.0}
            for r, k in ((10, 0.1), (20, 0.05), (30, 0.01))]
    c = correlations(rows)
    assert c["seq_rkl"] == pytest.approx(-1) and c["reward_teacher_samples"] == pytest.approx(1)
    assert math.isnan(c["reward_margin"])  # constant column
    assert math.isnan(correlations(rows[:2])["seq_rkl"])  # too few models


def test_analyze_noise_end_to_end(tokenizer, tmp_path):
    files = tiny_files(tmp_path, tokenizer)
    student = save_lm(tmp_path / "student", tokenizer, "nano", seed=1)
    teacher = save_lm(tmp_path / "teacher", tokenizer, "micro", seed=2)
    out = tmp_path / "noise"
    args = ["analyze", "noise", "--model", student, "--teacher", teacher, "--data", str(files["test"]),
            "--scales", "0,0.5", "--out", str(out), "noise.repeats=2", "sampling.max_new_tokens=6",
            "sampling.batch_size=4", "batch_size=3", "beta=0.2", "seeds=10"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((out / "noise.json").read_text())
    rows = result["models"]
    assert [(r["scale"], r["draw"]) for r in rows] == [(0.0, 0), (0.5, 0), (0.5, 1)]
    for r in rows:
        assert r["reward_student_samples"] == pytest.approx(0.2 * r["seq_rkl"])
        assert r["reward_margin"] == pytest.approx(r["reward_teacher_samples"] - r["reward_student_samples"])
    assert len({r["seq_rkl"] for r in rows}) == 3  # every draw is a different model
    # (Row 0's Rouge-L is recomputed below from stock transformers; the seed means in the two-seed run.)
    assert set(result["correlation_with_rougeL"]) == {"seq_rkl", "reward_teacher_samples", "reward_margin"}
    png = (out / "noise.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # scale 0 is the model itself: recompute its row independently from stock transformers
    records = load_instructions(str(files["test"]))
    q = AutoModelForCausalLM.from_pretrained(student).eval()
    p = AutoModelForCausalLM.from_pretrained(teacher).eval()
    prompts = [tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in records]
    cfg = SamplingConfig(max_new_tokens=6, batch_size=4)
    eos = tokenizer.eos_token_id
    device = resolve_device()  # where `prefkd analyze` sampled: the same seed draws other tokens on another device
    y_s = sample_responses(q.to(device), prompts, cfg, eos, eos, seed=10)
    y_t = sample_responses(p.to(device), prompts, cfg, eos, eos, seed=10)
    q, p = q.cpu(), p.cpu()

    def logp(model, prompt, y):
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([prompt + y])).logits[0].double(), -1)
        return sum(lp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(y))

    rkl = np.mean([(logp(q, x, y) - logp(p, x, y)) / len(y) for x, y in zip(prompts, y_s, strict=True)])
    r_t = 0.2 * np.mean([(logp(q, x, y) - logp(p, x, y)) / len(y) for x, y in zip(prompts, y_t, strict=True)])
    texts = [tokenizer.decode(y, skip_special_tokens=True).strip() for y in y_s]
    rouge = np.mean([rouge_l(t, r.references) for t, r in zip(texts, records, strict=True)])
    assert rows[0]["seq_rkl"] == pytest.approx(rkl, abs=1e-4)
    assert rows[0]["reward_teacher_samples"] == pytest.approx(r_t, abs=1e-4)
    assert rows[0]["rougeL"] == pytest.approx(rouge)
    assert result["rougeL_seed_std_unperturbed"] is None  # one sampling seed: no spread to show

    # two sampling seeds: values are seed means; seed 10 reproduces the first run exactly (seeded noise and sampling)
    res = CliRunner().invoke(app, [*args[:-1], "seeds=10,20"])
    assert res.exit_code == 0, res.output
    two = json.loads((out / "noise.json").read_text())
    for a, b in zip(rows, two["models"], strict=True):
        assert b["rougeL_per_seed"][0] == pytest.approx(a["rougeL"])
        assert b["rougeL"] == pytest.approx(np.mean(b["rougeL_per_seed"]))
    assert two["rougeL_seed_std_unperturbed"] == pytest.approx(np.std(two["models"][0]["rougeL_per_seed"], ddof=1))


def test_analyze_noise_refuses_a_teacher_with_another_tokenizer(tokenizer, tmp_path):
    from prefkd.models import train_tokenizer

    files = tiny_files(tmp_path, tokenizer)
    other = train_tokenizer(["completely different text for another vocabulary"] * 20, vocab_size=300)
    res = CliRunner().invoke(app, ["analyze", "noise", "--model", save_lm(tmp_path / "s", tokenizer),
                                   "--teacher", save_lm(tmp_path / "t", other), "--data", str(files["test"])])
    assert res.exit_code == 2 and "tokenizers differ" in " ".join(res.output.split())
