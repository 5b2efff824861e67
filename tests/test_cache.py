import json
import time

import pytest

import prefkd.cache as cache
from prefkd.cache import cache_key, generate_cached, model_identity, read_cache
from prefkd.data.chat import Renderer
from prefkd.errors import DataError, PrefkdError
from prefkd.generation import SamplingConfig
from prefkd.models import build_model

SAMPLING = SamplingConfig(max_new_tokens=6, batch_size=4)
N = 10  # batches [0, 4), [4, 8), [8, 10)


@pytest.fixture
def records(tiny_suite):
    return tiny_suite.d[:N]


@pytest.fixture
def model(tokenizer):
    return build_model("gpt2", "nano", tokenizer, seed=0)


@pytest.fixture
def calls(monkeypatch):
    """Count batches sampled; `calls["fail_on"] = k` makes the k-th call raise `calls["error"]`."""
    state = {"n": 0, "fail_on": None, "error": KeyboardInterrupt}
    real = cache.sample_responses

    def counting(*args, **kwargs):
        state["n"] += 1
        if state["n"] == state["fail_on"]:
            raise state["error"]
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "sample_responses", counting)
    return state


def _run(model, tokenizer, records, path, sampling=SAMPLING, seed=0, **kwargs):
    key = cache_key("nano-model", _texts(records), sampling, seed)
    return generate_cached(model, Renderer(tokenizer, "alpaca"), records, sampling, path, key, seed, **kwargs)


def _texts(records):
    return [r.prompt for r in records]


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def test_second_call_reuses_the_file_without_sampling(model, tokenizer, records, tmp_path, calls):
    path = tmp_path / "samples.jsonl"
    first = _run(model, tokenizer, records, path)
    assert calls["n"] == 3
    assert [r["index"] for r in first] == list(range(N))
    assert [r["id"] for r in first] == [r.id for r in records]
    assert all(r["finished"] == (r["response_ids"][-1:] == [tokenizer.eos_token_id]) for r in first)
    header, rows = read_cache(path)
    assert header == {"cache_key": cache_key("nano-model", _texts(records), SAMPLING, 0), "n": N}
    assert rows == first

    calls["fail_on"], calls["error"] = calls["n"] + 1, AssertionError("sampled again")
    assert _run(model, tokenizer, records, path) == first


def test_interrupted_run_resumes_to_the_uninterrupted_samples(model, tokenizer, records, tmp_path, calls):
    reference = _run(model, tokenizer, records, tmp_path / "whole.jsonl")

    path, calls["n"], calls["fail_on"] = tmp_path / "resumed.jsonl", 0, 2
    with pytest.raises(KeyboardInterrupt):
        _run(model, tokenizer, records, path)
    assert [json.loads(line)["index"] for line in _lines(path)[1:]] == [0, 1, 2, 3]

    calls["n"], calls["fail_on"] = 0, None
    assert _run(model, tokenizer, records, path) == reference
    assert calls["n"] == 2  # only the two batches missing after the kill
    assert read_cache(path)[1] == reference


def test_truncated_last_line_is_dropped_and_regenerated(model, tokenizer, records, tmp_path, calls):
    path = tmp_path / "samples.jsonl"
    reference = _run(model, tokenizer, records, path)
    lines = _lines(path)
    # Killed while writing the last batch: its first row is half on disk.
    path.write_text("".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2], encoding="utf-8")
    assert len(read_cache(path)[1]) == N - 2

    calls["n"] = 0
    assert _run(model, tokenizer, records, path) == reference
    assert calls["n"] == 1
    assert _lines(path) == lines


def test_malformed_line_before_the_last_names_its_line(model, tokenizer, records, tmp_path):
    path = tmp_path / "samples.jsonl"
    _run(model, tokenizer, records, path)
    lines = _lines(path)
    lines[3] = "{not json\n"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(DataError, match=r"samples\.jsonl:4") as err:
        read_cache(path)
    assert err.value.line == 4
    with pytest.raises(DataError):
        _run(model, tokenizer, records, path)


def test_other_settings_refuse_the_file_unless_overwrite(model, tokenizer, records, tmp_path, calls):
    path = tmp_path / "samples.jsonl"
    _run(model, tokenizer, records, path)
    hotter = SamplingConfig(max_new_tokens=6, batch_size=4, temperature=0.7)
    texts = _texts(records)
    base = cache_key("nano-model", texts, SAMPLING, 0)
    assert cache_key("nano-model", texts, hotter, 0) != base
    assert cache_key("nano-model", texts, SAMPLING, 1) != base
    assert cache_key("nano-model", texts[1:], SAMPLING, 0) != base

    calls["n"] = 0
    with pytest.raises(PrefkdError, match=r"samples\.jsonl holds samples of other settings"):
        _run(model, tokenizer, records, path, sampling=hotter)
    assert calls["n"] == 0

    rows = _run(model, tokenizer, records, path, sampling=hotter, overwrite=True)
    assert len(rows) == N and calls["n"] == 3
    assert read_cache(path)[0]["cache_key"] == cache_key("nano-model", _texts(records), hotter, 0)


def test_model_identity_changes_when_weights_are_resaved(tokenizer, tmp_path):
    out = tmp_path / "model"
    build_model("gpt2", "nano", tokenizer, seed=0).save_pretrained(out)
    first = model_identity(str(out))
    assert model_identity(str(out)) == first
    time.sleep(0.05)  # a real retrain takes far longer than the filesystem's timestamp granularity
    build_model("gpt2", "nano", tokenizer, seed=1).save_pretrained(out)
    assert model_identity(str(out)) != first
    assert model_identity(str(out)).startswith(str(out))
    assert model_identity("org/some-hub-model") == "org/some-hub-model"


def test_teacher_cache_key_takes_the_resolved_precision_only():
    """train.bf16=auto becomes true or false before a teacher cache is keyed: one cache per precision."""
    key = cache.teacher_cache_key
    assert key("m", [[1, 2]], SamplingConfig(), 0, True) != key("m", [[1, 2]], SamplingConfig(), 0, False)
    with pytest.raises(TypeError, match="resolved train.bf16"):
        key("m", [[1, 2]], SamplingConfig(), 0, "auto")


def test_distill_with_bf16_auto_keys_its_teacher_cache_on_the_choice(tmp_path, tokenizer, tiny_suite, monkeypatch):
    import prefkd.methods.dpkd as dpkd
    from prefkd.data.records import write_records
    from prefkd.methods import MethodConfig
    from prefkd.methods.dpkd import DPKDConfig
    from prefkd.models import ModelConfig, save_pretrained
    from prefkd.recipes.common import DataConfig
    from prefkd.recipes.distill import DistillRun, run_distill
    from prefkd.train import Hardware, TrainConfig

    save_pretrained(build_model("gpt2", "micro", tokenizer, seed=1), tokenizer, tmp_path / "teacher")
    save_pretrained(build_model("gpt2", "nano", tokenizer, seed=2), tokenizer, tmp_path / "student")
    write_records(tmp_path / "d.jsonl", tiny_suite.d[:8])
    keyed = []
    real = dpkd.teacher_cache_key
    monkeypatch.setattr(dpkd, "teacher_cache_key", lambda *a: keyed.append(a[-1]) or real(*a))
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: Hardware(cuda=False, amx=True)))
    cached = MethodConfig(replay=0.0, lm_weight=0.0, dpkd=DPKDConfig(teacher_samples="cached"))
    for min_width, want in ((16, True), (4096, False)):  # nano and micro (32, 64 wide) count as wide, then not
        monkeypatch.setattr("prefkd.train.AUTO_BF16_MIN_WIDTH", min_width)
        run_distill(DistillRun(out=str(tmp_path / f"run{min_width}"), method="dpkd",
                               student=ModelConfig(path=str(tmp_path / "student")),
                               teacher=ModelConfig(path=str(tmp_path / "teacher")),
                               data=DataConfig(prompts=str(tmp_path / "d.jsonl")),
                               train=TrainConfig(steps=1, batch_size=4, save_every=0, log_every=1, bf16="auto"),
                               distill=cached, sampling=SamplingConfig(max_new_tokens=4)))
        assert keyed[-1] is want
