"""`prefkd teacher-logits` and `teacher.logits=DIR` in `prefkd distill`: the whole path from a cache to a step."""

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

import prefkd.methods.data as method_data
import prefkd.recipes.distill as distill
from prefkd.cli import app
from prefkd.data.records import write_records
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig
from prefkd.methods.on_policy import GKDConfig
from prefkd.methods.token_kd import KDConfig
from prefkd.models import ModelConfig, build_model, save_pretrained
from prefkd.recipes.common import DataConfig
from prefkd.recipes.distill import DistillRun, TeacherConfig, run_distill
from prefkd.recipes.teacher_logits import TeacherLogitsRun, run_teacher_logits
from prefkd.train import TrainConfig

VOCAB = 400  # the conftest tokenizer's


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer, tiny_suite):
    root = tmp_path_factory.mktemp("teacher_logits")
    save_pretrained(build_model("gpt2", "micro", tokenizer, seed=1), tokenizer, root / "teacher")
    save_pretrained(build_model("gpt2", "nano", tokenizer, seed=2), tokenizer, root / "student")
    write_records(root / "d.jsonl", tiny_suite.d[:12])
    return root


def _run(root, out, method="kd", logits="", tail="renorm", steps=3, **distill_kw):
    return DistillRun(out=str(out), method=method, student=ModelConfig(path=str(root / "student")),
                      teacher=TeacherConfig(path=str(root / "teacher"), logits=str(logits), logits_tail=tail),
                      data=DataConfig(prompts=str(root / "d.jsonl")),
                      train=TrainConfig(steps=steps, batch_size=4, lr=1e-3, log_every=1, save_every=0),
                      distill=MethodConfig(replay=0.0, lm_weight=0.0, cache_dir=str(root / "samples"), **distill_kw),
                      sampling=SamplingConfig(max_new_tokens=12))


def _logits(root, out, k=VOCAB, dtype="float32", samples=""):
    return run_teacher_logits(TeacherLogitsRun(model=str(root / "teacher"), data=str(root / "d.jsonl"),
                                               samples=str(samples), out=str(out), top_k=k, dtype=dtype,
                                               shard_records=5))


def _weights(out):
    return load_file(str(out / "model" / "model.safetensors"))


def _close(a, b, atol):
    return max((a[k] - b[k]).abs().max().item() for k in a) <= atol


@pytest.fixture
def loads(monkeypatch):
    """The paths of every model loaded by the distill recipe and its data preparation."""
    seen = []
    for module in (distill, method_data):
        real = module.load_model
        monkeypatch.setattr(module, "load_model", lambda path, *a, _real=real, **kw: seen.append(path) or
                            _real(path, *a, **kw))
    return seen


@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_kd_from_a_full_vocabulary_cache_equals_kd_with_the_live_teacher(files, tmp_path, tail, loads):
    """k = the vocabulary, float32: the cache is the teacher's whole distribution, so every step must equal the
    live one up to float rounding (the KL is summed in another order) and the teacher is never loaded."""
    _logits(files, tmp_path / "cache")
    live = run_distill(_run(files, tmp_path / "live"))
    assert loads.count(str(files / "teacher")) == 1
    loads.clear()
    cached = run_distill(_run(files, tmp_path / "cached", logits=tmp_path / "cache", tail=tail))
    assert str(files / "teacher") not in loads
    for a, b in zip(live, cached, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["divergence"] == pytest.approx(b["divergence"], rel=1e-4, abs=1e-6)
    assert _close(_weights(tmp_path / "live"), _weights(tmp_path / "cached"), 1e-5)


def test_teacher_samples_from_the_run_cache_and_gkd_off_policy(files, tmp_path, tiny_suite, loads):
    """Prompts without references: kd trains on cached teacher samples. The cache is computed on the run's own
    sample cache (--samples); the run then loads no teacher at all. gkd with lmbda 0 is its off-policy part."""
    write_records(tmp_path / "prompts.jsonl", [r.__class__(**{**r.__dict__, "references": ()})
                                               for r in tiny_suite.d[:12]])
    root = tmp_path / "root"
    root.mkdir()
    for name in ("teacher", "student"):
        (root / name).symlink_to(files / name)
    (root / "d.jsonl").symlink_to(tmp_path / "prompts.jsonl")
    gkd = {"gkd": GKDConfig(lmbda=0.0, beta=0.5)}
    live = run_distill(_run(root, tmp_path / "live", method="gkd", **gkd))  # samples the teacher into the cache
    (sample_file,) = (root / "samples").glob("teacher-*.jsonl")
    _logits(root, tmp_path / "cache", samples=sample_file)
    loads.clear()
    cached = run_distill(_run(root, tmp_path / "cached", method="gkd", logits=tmp_path / "cache", **gkd))
    assert loads == [str(root / "student")]
    assert [r["divergence"] for r in live] == pytest.approx([r["divergence"] for r in cached], rel=1e-4)


def test_a_16_bit_top_k_cache_is_close_to_the_live_teacher(files, tmp_path):
    _logits(files, tmp_path / "cache", k=VOCAB, dtype="float16")
    live = run_distill(_run(files, tmp_path / "live", steps=1))
    cached = run_distill(_run(files, tmp_path / "cached", logits=tmp_path / "cache", steps=1))
    assert cached[0]["divergence"] == pytest.approx(live[0]["divergence"], rel=2e-3)


def test_what_cannot_train_from_the_cache_is_refused_before_any_work(files, tmp_path):
    _logits(files, tmp_path / "cache", k=16)
    cache = tmp_path / "cache"
    cases = [
        (_run(files, tmp_path / "a", method="dpkd", logits=cache), "cannot train from offline teacher logits"),
        (_run(files, tmp_path / "b", method="akl", logits=cache), "use teacher.logits_tail=bucket"),
        (_run(files, tmp_path / "c", method="gkd", logits=cache), "set distill.gkd.lmbda=0"),
        (_run(files, tmp_path / "d", method="kd", logits=cache, tail="bucket", kd=KDConfig(temperature=2.0)),
         "needs the divergence's temperature 1"),
        (_run(files, tmp_path / "e", method="kd", logits=tmp_path / "nothing"), "no readable manifest.json"),
    ]
    for cfg, message in cases:
        with pytest.raises(ConfigError, match=message):
            run_distill(cfg)
        assert not (tmp_path / cfg.out).joinpath("config.yaml").exists()
    # akl with the bucket and kd at another temperature with renorm do train.
    run_distill(_run(files, tmp_path / "f", method="akl", logits=cache, tail="bucket", steps=1))
    run_distill(_run(files, tmp_path / "g", method="kd", logits=cache, kd=KDConfig(temperature=2.0), steps=1))
    with pytest.raises(ConfigError, match="logits_tail must be one of renorm, bucket"):
        TeacherConfig(logits_tail="spread")


def test_a_run_on_other_sequences_is_refused(files, tmp_path, tiny_suite):
    _logits(files, tmp_path / "cache", k=16)
    write_records(tmp_path / "other.jsonl", tiny_suite.d[12:20])
    cfg = _run(files, tmp_path / "run", logits=tmp_path / "cache")
    cfg.data.prompts = str(tmp_path / "other.jsonl")
    with pytest.raises(ConfigError, match="8 of this run's 8 sequences .* are not in the cache"):
        run_distill(cfg)


def test_cli_writes_the_cache_and_refuses_other_settings_in_the_same_directory(files, tmp_path):
    runner = CliRunner()
    base = ["teacher-logits", "--model", str(files / "teacher"), "--data", str(files / "d.jsonl"),
            "--out", str(tmp_path / "c")]
    res = runner.invoke(app, [*base, "--top-k", "4"])
    assert res.exit_code == 0, res.output
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["k"] == 4 and manifest["dtype"] == "float16" and manifest["complete"]
    assert manifest["tokenizer"]["size"] == VOCAB and manifest["n_sequences"] == 12
    assert len(manifest["records"]) == 12 and manifest["record_fields"] == ["sequence", "shard", "offset", "length"]
    assert runner.invoke(app, [*base, "--top-k", "4"]).exit_code == 0  # the same settings: reused
    res = runner.invoke(app, [*base, "--top-k", "8"])
    assert res.exit_code == 2 and "other settings" in res.output
    assert runner.invoke(app, [*base, "--top-k", "8", "--overwrite"]).exit_code == 0
    assert json.loads((tmp_path / "c" / "manifest.json").read_text())["k"] == 8
