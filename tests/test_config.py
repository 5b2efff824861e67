import pytest

from prefkd import config
from prefkd.errors import ConfigError
from prefkd.recipes.compare import ExperimentConfig


def test_overrides_and_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher_train:\n  steps: 7\ndistill:\n  dpkd:\n    beta: 0.5\n")
    cfg = config.load(ExperimentConfig, f, ["teacher_train.lr=0.01", "eval.seeds=1,2", "distill.kappa=1"])
    assert cfg.teacher_train.steps == 7 and cfg.teacher_train.lr == 0.01
    assert cfg.distill.dpkd.beta == 0.5 and cfg.distill.kappa == 1.0 and cfg.eval.seeds == [1, 2]
    assert cfg.student_train.steps == ExperimentConfig().student_train.steps  # untouched sections keep defaults


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match="did you mean 'distill.kappa'"):
        config.load(ExperimentConfig, None, ["distill.kapa=0.5"])


def test_wrong_type_is_rejected():
    with pytest.raises(ConfigError, match="teacher_train.steps"):
        config.load(ExperimentConfig, None, ["teacher_train.steps=many"])


def test_describe_lists_every_key_with_default():
    lines = config.describe(ExperimentConfig)
    assert any(line.startswith("distill.dpkd.beta = 0.1") for line in lines)
    assert any(line.startswith("eval.sampling.top_k = 0") for line in lines)


def test_overriding_one_key_keeps_the_sections_own_defaults():
    default = ExperimentConfig()
    cfg = config.load(ExperimentConfig, None, ["teacher_train.steps=7", "eval.sampling.max_new_tokens=9"])
    assert cfg.teacher_train.steps == 7
    assert cfg.teacher_train.lr == default.teacher_train.lr and cfg.teacher_train.bf16 == default.teacher_train.bf16
    assert cfg.eval.sampling.max_new_tokens == 9
    assert cfg.eval.sampling.batch_size == default.eval.sampling.batch_size
    assert cfg.eval.seeds == default.eval.seeds
    helped = "\n".join(config.describe(ExperimentConfig))
    assert f"teacher_train.steps = {default.teacher_train.steps!r}" in helped


def test_exponent_without_a_dot_is_a_float():
    cfg = config.load(ExperimentConfig, None, ["distill_train.lr=1e-4"])
    assert cfg.distill_train.lr == 1e-4
    with pytest.raises(ConfigError, match="distill_train.lr"):
        config.load(ExperimentConfig, None, ["distill_train.lr=fast"])
