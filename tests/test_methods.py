"""Every registered method runs end to end from the CLI on tiny models and saves a loadable student; the token-level
steps compute logits only on the columns they score, with the full logits' loss and gradients."""

import json
import math

import pytest
import torch
from support import assert_same_value_and_grads, lm_head_rows
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from prefkd import losses
from prefkd.cli import app
from prefkd.data.collate import Example, collate
from prefkd.generation import SamplingConfig
from prefkd.methods import METHODS, MethodConfig, StepInputs, get_method
from prefkd.methods.on_policy import GKDConfig, RKLConfig
from prefkd.methods.token_kd import KDConfig
from prefkd.models import build_model, train_tokenizer

runner = CliRunner()


def _sft(out, tok, size, train_file):
    res = runner.invoke(app, ["sft", f"out={out}", f"tokenizer={tok}", f"model.size={size}",
                              f"data.train={train_file}", "train.steps=2", "train.batch_size=4"])
    assert res.exit_code == 0, res.output


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    from support import tiny_files

    root = tmp_path_factory.mktemp("methods")
    files = tiny_files(root, tokenizer)
    # The distillation prompts carry no references, as in the PLaD protocol: sequences come from the teacher.
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({**r, "references": []}) + "\n" for r in rows[:8]))
    _sft(root / "teacher", files["tokenizer"], "micro", files["train"])
    _sft(root / "student", files["tokenizer"], "nano", files["train"])
    return root, files, prompts


def _distill(root, files, prompts, method, out, teacher="teacher", extra=()):
    return runner.invoke(app, [
        "distill", "--method", method, f"out={out}", f"student.path={root / 'student' / 'model'}",
        f"teacher.path={root / teacher / 'model'}", f"data.prompts={prompts}", f"data.replay={files['train']}",
        f"data.corpus={files['corpus']}", f"distill.cache_dir={root / 'cache'}", "distill.lm_block_size=16",
        "sampling.max_new_tokens=6", "sampling.batch_size=4", "train.steps=2", "train.batch_size=4",
        "train.log_every=1", *extra])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_runs_and_saves_a_loadable_student(setup, method, tmp_path):
    root, files, prompts = setup
    extra = [f"data.prompts={files['train']}"] if method == "sft" else []
    res = _distill(root, files, prompts, method, tmp_path / method, extra=extra)
    assert res.exit_code == 0, res.output
    # The saved student is the starting student's architecture, trained: same config and parameter names and
    # shapes, and weights the two steps moved (a run that saved the starting weights, or another model, fails).
    model = AutoModelForCausalLM.from_pretrained(tmp_path / method / "model")
    start = AutoModelForCausalLM.from_pretrained(root / "student" / "model")
    assert model.config.to_diff_dict() == start.config.to_diff_dict()
    trained, initial = model.state_dict(), start.state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in initial.items()}
    assert not all(torch.equal(trained[k], initial[k]) for k in initial)
    log = [json.loads(line) for line in (tmp_path / method / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) for r in log)  # not NaN, not inf


def test_dpkd_with_k_samples_loo_baseline_and_kd_anchor_runs(setup, tmp_path):
    root, files, prompts = setup
    res = _distill(root, files, prompts, "dpkd", tmp_path / "opts", extra=[
        "distill.dpkd.student_samples=3", "distill.dpkd.baseline=loo", "distill.dpkd.anchor=kd"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / "opts" / "train_log.jsonl").read_text().splitlines()]
    assert "anchor_kl" in log[0] and "anchor_nll" not in log[0]


def test_distillm2_paper_curriculum_follows_training_progress(setup, tmp_path):
    """beta_schedule=paper moves the term weights with the step's progress; adaptive alpha stays in [0.01, alpha]."""
    root, files, prompts = setup
    out = tmp_path / "dm2"
    res = _distill(root, files, prompts, "distillm2", out, extra=[
        "train.steps=4", "distill.kappa=1", "distill.replay=0", "distill.distillm2.beta_schedule=paper",
        "distill.distillm2.alpha_schedule=adaptive"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    # progress 0, 0.25, 0.5, 0.75 -> beta = clip(progress, 0.5, 1) -> SRKL weight 2 beta
    assert [r["weight_srkl"] for r in log] == [1.0, 1.0, 1.0, 1.5]
    assert [r["weight_skl"] for r in log] == [1.0, 1.0, 1.0, 0.5]
    assert all(0.01 <= r[k] <= 0.1 for r in log for k in ("alpha_t", "alpha_s"))
    assert all(math.isfinite(r["skl_teacher"]) and r["srkl_student"] >= 0 for r in log)
    bad = _distill(root, files, prompts, "distillm2", tmp_path / "bad", extra=["distill.distillm2.beta_schedule=x"])
    assert bad.exit_code != 0 and "beta_schedule" in bad.output


def test_teacher_sample_cache_is_shared_and_reused(setup, tmp_path):
    root, files, prompts = setup
    assert _distill(root, files, prompts, "seqkd", tmp_path / "a").exit_code == 0
    caches = sorted((root / "cache").glob("teacher-*.jsonl"))
    stamps = [c.stat().st_mtime_ns for c in caches]
    assert _distill(root, files, prompts, "kd", tmp_path / "b").exit_code == 0
    assert sorted((root / "cache").glob("teacher-*.jsonl")) == caches  # same settings: same cache, not regenerated
    assert [c.stat().st_mtime_ns for c in caches] == stamps


def test_plad_works_with_a_teacher_of_another_tokenizer(setup, tmp_path):
    """PLaD is black-box: the teacher's text is re-tokenised with the student's tokenizer."""
    root, files, prompts = setup
    other = tmp_path / "other_tok"
    texts = [json.loads(line)["instruction"] for line in files["train"].read_text().splitlines()]
    train_tokenizer(texts * 3, vocab_size=320).save_pretrained(other)
    _sft(root / "teacher_other", other, "micro", files["train"])
    for method in ("plad", "seqkd", "plad-margin"):
        res = _distill(root, files, prompts, method, tmp_path / method, teacher="teacher_other")
        assert res.exit_code == 0, res.output
    res = _distill(root, files, prompts, "kd", tmp_path / "kd", teacher="teacher_other")
    assert res.exit_code == 2 and "white-box" in res.output


def test_methods_lists_every_method():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in METHODS:
        assert f"\n{name} " in "\n" + res.output


def test_generate_verb_writes_and_reuses_a_cache(setup, tmp_path):
    root, files, prompts = setup
    out = tmp_path / "teacher_samples.jsonl"
    args = ["generate", f"model={root / 'teacher' / 'model'}", f"data={prompts}", f"out={out}",
            "sampling.max_new_tokens=5", "sampling.temperature=0.7"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = out.read_text().splitlines()
    assert json.loads(lines[0])["n"] == 8 and len(lines) == 9
    stamp = out.stat().st_mtime_ns
    res = runner.invoke(app, args)  # an existing output is never touched without --resume or --overwrite
    assert res.exit_code == 2 and "8 of 8 samples of these settings" in res.output and "--resume" in res.output
    assert runner.invoke(app, [*args, "--resume"]).exit_code == 0 and out.stat().st_mtime_ns == stamp  # reused
    res = runner.invoke(app, [*args[:-1], "sampling.temperature=1.0", "--resume"])
    assert res.exit_code == 2 and "other settings" in res.output  # never clobbers a cache of other settings


def test_lora_distillation_saves_a_merged_student(setup, tmp_path):
    root, files, prompts = setup
    res = _distill(root, files, prompts, "dpkd", tmp_path / "lora", extra=["lora.r=4", "lora.alpha=8"])
    assert res.exit_code == 0, res.output
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "model")  # merged: a plain transformers model
    assert not any("lora" in name for name, _ in model.named_parameters())
    res = _distill(root, files, prompts, "sft", tmp_path / "adapter",
                   extra=[f"data.prompts={files['train']}", "lora.r=4", "lora.save=adapter"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "adapter" / "model" / "adapter_config.json").is_file()


@pytest.mark.parametrize("method", ["kd", "gkd"])
def test_a_teacher_with_a_padded_embedding_table_distils(setup, method, tmp_path):
    """Models of one family pad their embedding tables beyond the tokenizer to different sizes (Qwen2.5-7B 152,064
    rows, 0.5B 151,936): token-level methods compare the distributions over the rows both have. (The sequences are
    the references and the diagnostics are off: this teacher's padded rows are random, so unlike a trained model's
    they would be sampled.)"""
    root, files, prompts = setup
    padded = AutoModelForCausalLM.from_pretrained(root / "teacher" / "model")
    width = padded.get_input_embeddings().weight.shape[0]
    padded.resize_token_embeddings(width + 64, mean_resizing=False)
    padded.save_pretrained(root / "padded" / "model")
    (root / "padded" / "model").joinpath("tokenizer.json").write_bytes(
        (root / "teacher" / "model" / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        src = root / "teacher" / "model" / name
        if src.is_file():
            (root / "padded" / "model" / name).write_bytes(src.read_bytes())
    res = _distill(root, files, prompts, method, tmp_path / method, teacher="padded",
                   extra=[f"data.prompts={files['train']}", "diagnostics.every=0"])
    assert res.exit_code == 0, res.output
    log = [json.loads(line) for line in (tmp_path / method / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(math.isfinite(row["loss"]) for row in log)


def test_student_and_teacher_logits_are_cut_to_the_rows_both_have():
    from prefkd.methods.base import StepInputs, student_and_teacher_logits
    from prefkd.models import build_model

    tok = train_tokenizer(["a b c d e f g"] * 20, vocab_size=300)
    student = build_model("gpt2", "nano", tok, seed=0)
    teacher = build_model("gpt2", "nano", tok, seed=1)
    teacher.resize_token_embeddings(len(tok) + 40, mean_resizing=False)
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "response_mask": torch.tensor([[0, 0, 1, 1]])}
    inp = StepInputs(student, student, teacher, [], None, None, 0, 0, torch.device("cpu"))
    s, t = student_and_teacher_logits(inp, batch)
    assert s.logits.shape == t.logits.shape == (1, 2, len(tok))  # columns 1..2 of the shifted 0..2: 0 scores nothing
    assert s.start == t.start == 1
    full = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(t.logits, full[:, 1:-1, : len(tok)], rtol=1e-6, atol=1e-6)
    assert s.logits.requires_grad and not t.logits.requires_grad


# Logits only where they are scored (methods/base.py, `shifted_logits`): the token-level steps run the LM head from
# the first column any sequence scores; the loss, the anchor and every gradient equal those of the full [B, T, V]
# logits, on batches whose prompts differ in length a little and a lot.
CUT_BATCHES = {"prompts 5, 9, 3": ((5, 9, 3), (4, 2, 6)), "one prompt much longer": ((4, 60, 6), (7, 3, 5))}


def _cut_models(tokenizer):
    return build_model("gpt2", "nano", tokenizer, seed=2), build_model("gpt2", "micro", tokenizer, seed=1).eval()


def _ids(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


def _full_step(student, teacher, examples, pad, divergence, cfg):
    """The reference: plain forwards on every position, the divergence and the cross-entropy on the full mask."""
    batch = collate(examples, pad)
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask, labels = batch["response_mask"][:, 1:], batch["input_ids"][:, 1:]
    m = mask.float()
    nll = -(s.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * m).sum() / m.sum()
    return divergence(s, t, mask, cfg), nll


CUT_METHODS = [
    ("kd", {"kd": KDConfig(temperature=2.0)}, lambda s, t, m, c: losses.forward_kl(s, t, m, c.kd.temperature)),
    ("akl", {}, lambda s, t, m, c: losses.adaptive_kl(s, t, m, c.akl.mu, head=c.akl.head)),
    ("tvd", {}, lambda s, t, m, c: losses.total_variation(s, t, m)),
    ("skl", {}, lambda s, t, m, c: losses.skew_forward_kl(s, t, m, c.skew.alpha)),
    ("srkl", {}, lambda s, t, m, c: losses.skew_reverse_kl(s, t, m, c.skew.alpha)),
    ("dpkd-token", {}, lambda s, t, m, c: losses.dpkd_token_loss(s, t, m, c.dpkd.beta)),
    ("gkd", {"gkd": GKDConfig(lmbda=0.0, beta=0.3, temperature=1.5)},
     lambda s, t, m, c: losses.generalized_jsd(s, t, m, c.gkd.beta, c.gkd.temperature)),
    ("gkd", {"gkd": GKDConfig(lmbda=1.0, beta=0.3, temperature=1.5)},
     lambda s, t, m, c: losses.generalized_jsd(s, t, m, c.gkd.beta, c.gkd.temperature)),
    ("rkl", {"rkl": RKLConfig(temperature=0.7)}, lambda s, t, m, c: losses.reverse_kl(s, t, m, c.rkl.temperature)),
]


@pytest.mark.parametrize("shape", sorted(CUT_BATCHES))
@pytest.mark.parametrize("method, sections, divergence", CUT_METHODS,
                         ids=[f"{m}-{'-'.join(f'{k}' for k in s)}" if s else m for m, s, _ in CUT_METHODS])
def test_token_level_steps_on_the_scored_columns_equal_the_full_logits(tokenizer, monkeypatch, shape, method,
                                                                       sections, divergence):
    from prefkd.methods import on_policy

    student, teacher = _cut_models(tokenizer)
    prompt_lengths, response_lengths = CUT_BATCHES[shape]
    vocab, pad = len(tokenizer), tokenizer.pad_token_id
    prompts, references = _ids(prompt_lengths, vocab, 0), _ids(response_lengths, vocab, 1)
    samples = _ids(response_lengths[::-1], vocab, 2)  # the student's "samples" of the on-policy batches
    monkeypatch.setattr(on_policy, "sample", lambda model, examples, inp: samples)
    cfg = MethodConfig(**sections)
    examples = [Example(p, r) for p, r in zip(prompts, references, strict=True)]
    inp = StepInputs(student, student, teacher, examples, SamplingConfig(), cfg, pad, tokenizer.eos_token_id,
                     torch.device("cpu"), shared_rng=torch.Generator().manual_seed(0))
    on = method == "rkl" or (method == "gkd" and cfg.gkd.lmbda == 1.0)
    with lm_head_rows(student) as rows:
        out = get_method(method).step(inp)
    scored = [Example(p, r) for p, r in zip(prompts, samples if on else references, strict=True)]
    width = max(len(e.prompt_ids) + len(e.response_ids) for e in scored)
    assert rows[0] == width - (min(prompt_lengths) - 1)  # the LM head ran from the shortest prompt's last token on
    want_loss, want_nll = _full_step(student, teacher, scored, pad, divergence, cfg)
    assert_same_value_and_grads(student, out.loss, want_loss)
    assert out.loss_count == sum(map(len, samples if on else references))
    if not on:  # the anchor is the cross-entropy on the same cut logits (on-policy: logprobs.py's own forward)
        assert_same_value_and_grads(student, out.anchor_nll, want_nll)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_shifted_logits_run_the_lm_head_on_the_scored_columns_only(tokenizer, arch):
    """Every architecture prefkd trains takes `logits_to_keep`: the head runs on T - start positions, and the logits
    kept are the full forward's, with their targets and mask."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from prefkd.methods.base import shifted_logits

    if arch == "qwen2":
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), num_hidden_layers=1, hidden_size=32,
                                             num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                             tie_word_embeddings=True))
    else:
        model = build_model(arch, "nano", tokenizer, seed=0)
    examples = [Example(p, r) for p, r in zip(_ids((7, 12, 30), 300, 0), _ids((5, 1, 4), 300, 1), strict=True)]
    batch = collate(examples, tokenizer.pad_token_id)
    with lm_head_rows(model) as rows:
        s = shifted_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    assert s.start == 6 and rows == [34 - 6, 34]
    torch.testing.assert_close(s.logits, full[:, 6:], rtol=1e-5, atol=1e-6)
    assert torch.equal(s.labels, batch["input_ids"][:, 7:]) and torch.equal(s.mask, batch["response_mask"][:, 7:])
    assert s.mask[:, 0].tolist() == [1, 0, 0]  # the first column kept is counted in the shortest prompt's row
    uncut = shifted_logits(model, batch, cut=False)
    assert uncut.start == 0 and uncut.logits.shape[1] == 33


def test_scored_start_is_the_first_column_any_row_counts():
    from prefkd.methods.base import scored_start

    assert scored_start(torch.tensor([[0, 0, 0, 1, 1], [0, 0, 1, 1, 0]])) == 1  # shifted: [0, 0, 1, 1], [0, 1, 1, 0]
    assert scored_start(torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])) == 0  # a trained prompt token (multi-turn SFT)
    assert scored_start(torch.zeros(2, 4, dtype=torch.long)) == 0  # nothing counted: nothing cut
