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


def test_renamed_keys_still_load_with_a_deprecation_message(tmp_path, capsys):
    from prefkd.recipes.distill import DistillRun

    saved = tmp_path / "old.yaml"  # a config saved before each preference form had its own section
    saved.write_text("method: dpo\ndistill:\n  pref: {dpo_beta: 0.3, simpo_gamma: 0.7}\n  plad: {beta: 2.0}\n")
    cfg = config.load(DistillRun, saved, ["distill.pref.cpo_nll_weight=0.5"])
    assert (cfg.distill.dpo.beta, cfg.distill.simpo.gamma, cfg.distill.cpo.nll_weight) == (0.3, 0.7, 0.5)
    assert (cfg.distill.plad.score_scale, cfg.distill.plad.margin) == (2.0, 1.0)  # margin is PLaD's beta
    err = capsys.readouterr().err
    assert "'distill.pref.dpo_beta' is now 'distill.dpo.beta'" in err
    assert "'distill.plad.beta' is now 'distill.plad.score_scale'" in err
    with pytest.raises(ConfigError, match="same setting: give only 'distill.dpo.beta'"):
        config.load(DistillRun, None, ["distill.pref.dpo_beta=0.3", "distill.dpo.beta=0.2"])
    with pytest.raises(ConfigError, match="unknown config key 'distill.pref'"):
        config.load(DistillRun, None, ["distill.pref.ipo_tau=0.3"])


@pytest.mark.parametrize(("raw", "want"), [("true", True), ("false", False), ("auto", "auto")])
def test_bf16_takes_true_false_or_auto(raw, want):
    assert config.load(ExperimentConfig, None, [f"distill_train.bf16={raw}"]).distill_train.bf16 == want


@pytest.mark.parametrize("raw", ["1", "0", "Auto", "fast", "bf16", ""])
def test_bf16_other_values_name_the_key_and_the_choices(raw):
    # 1 must not pass for true (1 == True in Python), nor "Auto" for auto
    with pytest.raises(ConfigError, match=r"config key 'distill_train.bf16': expected true, false or auto, got"):
        config.load(ExperimentConfig, None, [f"distill_train.bf16={raw}"])
