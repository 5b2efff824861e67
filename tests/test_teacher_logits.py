"""prefkd/teacher_logits.py: the offline top-k cache (what it stores, resuming, refusing what does not match)."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from support import assert_same_value_and_grads, lm_head_rows

import prefkd.teacher_logits as tl
from prefkd import losses
from prefkd.data.chat import Renderer
from prefkd.data.collate import Example, collate
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig
from prefkd.losses.top_k import coarse_logits
from prefkd.methods import MethodConfig, StepInputs, get_method
from prefkd.methods.data import reference_examples
from prefkd.models import build_model, train_tokenizer
from prefkd.rundir import RunDirError
from prefkd.train import TrainConfig


@pytest.fixture(scope="module")
def setup(tiny_suite, tokenizer):
    teacher = build_model("gpt2", "micro", tokenizer, seed=1).eval()
    renderer = Renderer(tokenizer, "alpaca")
    examples = reference_examples(renderer, tiny_suite.d[:10], TrainConfig(), "d")
    return teacher, renderer, examples


def _settings(renderer, k=8, dtype="float16", shard_records=4):
    return tl.Settings("teacher@test", tl.tokenizer_identity(renderer), k, dtype, "references", shard_records)


def _live(teacher, examples, pad):
    """[B, T-1, V] log-softmax of the teacher on the examples, and the response mask of those positions."""
    batch = collate(examples, pad)
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return logits.float().log_softmax(-1), batch["response_mask"][:, 1:].bool()


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("float16", 4e-3)])
def test_cached_top_k_equal_the_live_teachers_top_k_on_the_same_tokens(setup, tmp_path, dtype, tol):
    teacher, renderer, examples = setup
    k = 8
    manifest = tl.build(teacher, renderer, examples, tmp_path / "c", _settings(renderer, k, dtype), batch_size=3)
    assert manifest["complete"] and manifest["tokens"] == sum(len(e.response_ids) for e in examples)
    cache = tl.TeacherLogits(tmp_path / "c")
    logp, mask = _live(teacher, examples, renderer.tokenizer.pad_token_id)
    ids, logps, tail = cache.batch(examples, logp.shape[1], torch.device("cpu"))
    values, top = logp.topk(k, dim=-1)
    assert torch.equal(ids[mask], top[mask])
    assert (logps[mask] - values[mask]).abs().max().item() <= tol
    rest = torch.logsumexp(logp.scatter(-1, top, -math.inf), -1)
    torch.testing.assert_close(tail[mask], rest[mask], rtol=0, atol=1e-5)
    assert not ids[~mask].any() and not logps[~mask].any()  # nothing outside the response positions
    size = sum(p.stat().st_size for p in (tmp_path / "c").glob("shard-*.safetensors"))
    assert manifest["bytes"] == size
    # ids int32 + log-probs (2 or 4 bytes) per kept token, + the float32 tail, + each shard's small JSON header.
    per = 4 * k + (4 if dtype == "float32" else 2) * k + 4
    assert 0 < size - per * manifest["tokens"] < 600 * len(manifest["shards"])


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


def test_a_killed_run_keeps_its_whole_shards_and_a_rerun_completes_them(setup, tmp_path, monkeypatch):
    teacher, renderer, examples = setup
    settings = _settings(renderer)
    tl.build(teacher, renderer, examples, tmp_path / "whole", settings)
    out = tmp_path / "c"
    tl.build(teacher, renderer, examples, out, settings)
    shards = sorted(out.glob("shard-*.safetensors"))
    assert len(shards) == 3  # 10 sequences, 4 per shard
    # A kill: the last shard never renamed into place (its temporary file left behind), a shard cut short, the
    # manifest cut mid-write.
    shards[2].rename(out / f".{shards[2].name}.abc.tmp")
    shards[1].write_bytes(shards[1].read_bytes()[:100])
    (out / "manifest.json").write_text((out / "manifest.json").read_text()[:50])
    with pytest.raises(ConfigError, match="no readable manifest"):
        tl.TeacherLogits(out)
    computed = []
    real = tl._compute_shard
    monkeypatch.setattr(tl, "_compute_shard", lambda model, ex, *a: computed.append(len(ex)) or real(model, ex, *a))
    manifest = tl.build(teacher, renderer, examples, out, settings)
    assert computed == [4, 2]  # shards 1 and 2 only
    assert manifest["complete"] and not list(out.glob(".*.tmp"))
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"):
        a, b = _tensors(out / name), _tensors(tmp_path / "whole" / name)
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((out / "manifest.json").read_text()) == json.loads((tmp_path / "whole" / "manifest.json")
                                                                          .read_text())


def test_an_incomplete_cache_does_not_train(setup, tmp_path):
    teacher, renderer, examples = setup
    out = tmp_path / "c"
    tl.build(teacher, renderer, examples, out, _settings(renderer))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "shard-00001.safetensors").unlink()
    with pytest.raises(ConfigError, match="shard-00001.safetensors is missing"):
        tl.TeacherLogits(out)
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ConfigError, match=r"incomplete \(2 of 3 shards\)"):
        tl.TeacherLogits(out)


def test_other_settings_are_refused_unless_overwritten(setup, tmp_path):
    teacher, renderer, examples = setup
    out = tmp_path / "c"
    tl.build(teacher, renderer, examples, out, _settings(renderer, k=4))
    with pytest.raises(RunDirError, match="other settings"):
        tl.build(teacher, renderer, examples, out, _settings(renderer, k=8))
    with pytest.raises(RunDirError, match="other settings"):
        tl.build(teacher, renderer, examples[:5], out, _settings(renderer, k=4))
    assert tl.build(teacher, renderer, examples, out, _settings(renderer, k=8), overwrite=True)["k"] == 8
    assert tl.TeacherLogits(out).k == 8
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "model.safetensors").write_text("x")
    with pytest.raises(RunDirError, match="not a teacher-logits cache"):
        tl.build(teacher, renderer, examples, tmp_path / "other", _settings(renderer))


def test_another_tokenizer_template_or_sequences_are_refused(setup, tiny_suite, tmp_path):
    teacher, renderer, examples = setup
    out = tmp_path / "c"
    tl.build(teacher, renderer, examples, out, _settings(renderer))
    cache = tl.TeacherLogits(out)
    cache.check(renderer, examples[2:7], "d")  # a subset is fine (a run's stricter length limits)
    texts = [r.prompt + r.references[0] for r in tiny_suite.d0]
    other = Renderer(train_tokenizer(texts, vocab_size=300), "alpaca")
    with pytest.raises(ConfigError, match="another tokenizer"):
        cache.check(other, examples, "d")
    chat_tok = renderer.tokenizer.__class__.from_pretrained(_saved(renderer.tokenizer, tmp_path))
    chat_tok.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    with pytest.raises(ConfigError, match="Alpaca|alpaca"):
        cache.check(Renderer(chat_tok, "chat"), examples, "d")
    changed = [Example(e.prompt_ids, e.response_ids[1:]) for e in examples[:3]] + examples[3:]
    with pytest.raises(ConfigError, match="3 of this run's 10 sequences .* are not in the cache"):
        cache.check(renderer, changed, "d")


def _saved(tokenizer, tmp_path):
    path = tmp_path / "tok"
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
@pytest.mark.parametrize("long_prompt", [False, True])
def test_a_step_on_the_scored_columns_reads_the_cache_at_its_positions(setup, tmp_path, tail, long_prompt):
    """The cache holds a sequence's top-k at absolute positions (len(prompt) - 1 on); the step computes the
    student's logits from the first scored column on (methods/base.py) and cuts the cache's tensors the same way:
    loss, anchor and gradients equal the divergence on the full [B, T, V] logits."""
    teacher, renderer, examples = setup
    examples = examples[:4]
    if long_prompt:  # one prompt three times as long: most of its row is prompt, start is the shortest prompt's
        examples = [*examples[:3], Example(examples[3].prompt_ids * 3, examples[3].response_ids)]
    tl.build(teacher, renderer, examples, tmp_path / "c", _settings(renderer, k=8, dtype="float32"))
    cache = tl.TeacherLogits(tmp_path / "c", tail)
    student = build_model("gpt2", "nano", renderer.tokenizer, seed=2)
    pad = renderer.tokenizer.pad_token_id
    inp = StepInputs(student, student, None, examples, SamplingConfig(), MethodConfig(), pad, pad,
                     torch.device("cpu"), teacher_logits=cache)
    with lm_head_rows(student) as rows:
        out = get_method("kd").step(inp)
    batch = collate(examples, pad)
    start = min(len(e.prompt_ids) for e in examples) - 1
    assert start > 0 and rows == [batch["input_ids"].shape[1] - start]
    s = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask, labels = batch["response_mask"][:, 1:], batch["input_ids"][:, 1:]
    s_div, t_div = coarse_logits(s, *cache.batch(examples, s.shape[1], s.device), tail)
    assert_same_value_and_grads(student, out.loss, losses.forward_kl(s_div, t_div, mask))
    m = mask.float()
    nll = -(s.log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * m).sum() / m.sum()
    assert_same_value_and_grads(student, out.anchor_nll, nll)
