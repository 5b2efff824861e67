"""The optional vLLM backend without vLLM: the import guard, the settings mapping, EOS handling, and the plumbing into
the resumable cache, driven by a stand-in `vllm` module (it checks what prefkd asks of vLLM, not vLLM itself,
which needs a CUDA GPU)."""

import json
import sys
import types

import pytest
from typer.testing import CliRunner

from prefkd.cache import batch_seed, cache_key, generate_cached, read_cache
from prefkd.cli import app
from prefkd.data.chat import Renderer
from prefkd.errors import ConfigError, PrefkdError
from prefkd.generation import SamplingConfig
from prefkd.vllm_backend import VLLMConfig, VLLMSampler, require_vllm, response_ids, sampling_params

EOS = 0


@pytest.fixture
def no_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, installed or not


def test_guard_says_how_to_install(no_vllm):
    with pytest.raises(PrefkdError, match=r"vllm.enabled=true needs the vllm package.*pip install 'prefkd\[vllm\]'"):
        require_vllm()


def test_cli_asks_for_vllm_in_one_line(no_vllm, tmp_path, tiny_suite):
    from prefkd.data.records import write_records

    write_records(tmp_path / "p.jsonl", tiny_suite.d[:2])
    res = CliRunner().invoke(app, ["generate", "model=some/model", f"data={tmp_path / 'p.jsonl'}",
                                   f"out={tmp_path / 's.jsonl'}", "vllm.enabled=true"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "needs the vllm package" in res.output and not (tmp_path / "s.jsonl").exists()


def test_sampling_settings_map_to_vllm():
    assert sampling_params(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=7), 11, EOS) == {
        "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_tokens": 7, "seed": 11, "stop_token_ids": [EOS],
        "skip_special_tokens": True, "detokenize": False}
    hot = sampling_params(SamplingConfig(temperature=0.7, top_k=50, top_p=0.9), 0, EOS)
    assert (hot["temperature"], hot["top_k"], hot["top_p"]) == (0.7, 50, 0.9)
    greedy = sampling_params(SamplingConfig(temperature=0.0, top_k=50, top_p=0.9), 0, EOS)
    assert (greedy["temperature"], greedy["top_k"], greedy["top_p"]) == (0.0, -1, 1.0)
    with pytest.raises(ConfigError, match="no_repeat_ngram_size"):
        sampling_params(SamplingConfig(no_repeat_ngram_size=6), 0, EOS)


def test_responses_end_with_eos_only_when_the_model_stopped():
    assert response_ids([5, 6], "stop", EOS) == [5, 6, EOS]  # vLLM leaves the stop token out
    assert response_ids([5, 6, EOS], "stop", EOS) == [5, 6, EOS]  # or keeps it: the same response
    assert response_ids([5, 6, 7], "length", EOS) == [5, 6, 7]  # cut by max_tokens: no EOS
    assert response_ids([5, EOS, 9], "stop", EOS) == [5, EOS]


class StandIn:
    """A stand-in `vllm` module: records the engine settings and requests, answers deterministically per request."""

    def __init__(self, max_model_len=12):
        self.engines, self.requests = [], []
        stand_in = self

        class LLM:
            def __init__(self, **kwargs):
                stand_in.engines.append(kwargs)
                self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=max_model_len))

            def generate(self, prompts, params, use_tqdm=True):
                out = []
                for prompt, p in zip(prompts, params, strict=True):
                    stand_in.requests.append((prompt["prompt_token_ids"], p.kwargs))
                    n = p.kwargs["seed"] % 3 + 1  # the answer depends on the request's own seed only
                    ids, reason = ([p.kwargs["seed"] % 50 + 1] * n, "stop") if n < 3 else ([4] * 3, "length")
                    out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=ids,
                                                                                   finish_reason=reason)]))
                return out

        class SamplingParams:
            def __init__(self, **kwargs):
                self.kwargs = kwargs

        self.module = types.ModuleType("vllm")
        self.module.LLM, self.module.SamplingParams = LLM, SamplingParams


def test_sampler_feeds_the_resumable_cache(monkeypatch, tokenizer, tiny_suite, tmp_path):
    stand_in = StandIn()
    monkeypatch.setitem(sys.modules, "vllm", stand_in.module)
    records = tiny_suite.d[:5]
    sampling = SamplingConfig(max_new_tokens=4, batch_size=2, temperature=0.7)
    sampler = VLLMSampler("teacher/path", VLLMConfig(enabled=True, tensor_parallel_size=2, dtype="bfloat16"))
    assert stand_in.engines == []  # no engine until something must be sampled
    prompts = [r.prompt for r in records]
    key = cache_key("teacher/path", prompts, sampling, 3, "vllm")
    assert key != cache_key("teacher/path", prompts, sampling, 3)  # other samples than transformers': other key
    path = tmp_path / "teacher.jsonl"
    rows = generate_cached(None, Renderer(tokenizer, "alpaca"), records, sampling, path, key, 3, sampler=sampler)

    assert len(stand_in.engines) == 1 and stand_in.engines[0]["tensor_parallel_size"] == 2
    assert stand_in.engines[0]["dtype"] == "bfloat16" and stand_in.engines[0]["trust_remote_code"] is False
    seeds = [kw["seed"] for _, kw in stand_in.requests]
    assert seeds == [batch_seed(3, start) + i for start in (0, 2, 4) for i in range(2)][:5]  # per prompt
    assert all(len(ids) <= 12 - 4 for ids, _ in stand_in.requests)  # cut from the left to fit the context
    assert all(r["response_ids"][-1] == tokenizer.eos_token_id for r in rows if r["finished"])
    assert any(not r["finished"] for r in rows)  # the "length" answers carry no EOS
    assert read_cache(path) == ({"cache_key": key, "n": 5}, rows)

    # A cache cut after its first batch resumes to the same rows, sampling only what is missing.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:3]))
    stand_in.requests.clear()
    again = generate_cached(None, Renderer(tokenizer, "alpaca"), records, sampling, path, key, 3, sampler=sampler)
    assert again == rows
    assert len(stand_in.requests) == 3
    assert [json.loads(line)["index"] for line in path.read_text().splitlines()[1:]] == list(range(5))


def test_samples_only_then_training_reuses_the_vllm_cache(monkeypatch, tmp_path, tokenizer):
    """The two-step flow of a large-teacher run: sample the teacher once (here with the stand-in), then train
    without starting an engine. --samples-only does not claim the run directory."""
    from support import tiny_models

    files = tiny_models(tmp_path / "files", tokenizer)
    stand_in = StandIn(max_model_len=400)
    monkeypatch.setitem(sys.modules, "vllm", stand_in.module)
    out = tmp_path / "run"
    args = ["distill", "--method", "seqkd", f"out={out}", f"student.path={files['student']}",
            f"teacher.path={files['teacher']}", f"data.prompts={files['prompts']}", "vllm.enabled=true",
            "sampling.max_new_tokens=4", "train.steps=2", "train.batch_size=4"]
    res = CliRunner().invoke(app, [*args, "--samples-only"])
    assert res.exit_code == 0, res.output
    caches = list((out / "cache").glob("teacher-*.jsonl"))
    assert len(caches) == 1 and len(stand_in.engines) == 1 and not (out / "config.yaml").exists()
    stamp, n_requests = caches[0].stat().st_mtime_ns, len(stand_in.requests)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (out / "model" / "model.safetensors").is_file()
    assert caches[0].stat().st_mtime_ns == stamp and len(stand_in.requests) == n_requests  # nothing resampled
    assert len(stand_in.engines) == 1  # and no engine started
