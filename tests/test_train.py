"""The training loop: resume after an interruption ends with the same weights as an uninterrupted run."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from support import reference_examples, tiny_files

from prefkd import stages
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, get_method
from prefkd.models import ModelConfig, build_model, load_model
from prefkd.recipes.common import DataConfig
from prefkd.recipes.compare import ExperimentConfig
from prefkd.recipes.distill import DistillRun
from prefkd.recipes.sft import SFTRun
from prefkd.train import BatchStream, Hardware, RunData, TrainConfig, adamw, model_width, resolve_bf16, train


def _run(tokenizer, suite, out, steps=6, interrupt_at=None, monkeypatch=None):
    recs = suite.d0
    ex = reference_examples(tokenizer, recs)
    model = build_model("gpt2", "nano", tokenizer, seed=0)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, save_every=2, log_every=1)
    if interrupt_at is not None:
        calls = {"n": 0}
        real = torch.optim.AdamW.step

        def step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == interrupt_at:
                raise KeyboardInterrupt
            return real(self, *a, **k)

        monkeypatch.setattr(torch.optim.AdamW, "step", step)
    train(get_method("sft"), model, tokenizer, RunData(ex), cfg, MethodConfig(), SamplingConfig(), out)


def test_resume_after_interruption_matches_uninterrupted(tokenizer, tiny_suite, tmp_path, monkeypatch):
    _run(tokenizer, tiny_suite, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, tiny_suite, tmp_path / "b", interrupt_at=5, monkeypatch=monkeypatch)
    assert list((tmp_path / "b" / "checkpoint").glob("step-*/trainer_state.json"))
    monkeypatch.undo()
    _run(tokenizer, tiny_suite, tmp_path / "b")
    a, b = load_model(str(tmp_path / "a" / "model")), load_model(str(tmp_path / "b" / "model"))
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    rows = (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()
    assert len(rows) == 6  # the log was cut back to the checkpoint and continued, no duplicated steps


def test_the_optimizer_is_fused_adamw_and_takes_adamws_steps():
    """Three steps against AdamW's update written out in float64 (decoupled decay, bias-corrected moments)."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    lr, wd, b1, b2, eps = 1e-2, 0.1, 0.9, 0.999, 1e-8
    opt = adamw([w], lr, wd)
    assert opt.defaults["fused"] is True
    start = w.detach().double().clone()
    ref, m, v = start.clone(), torch.zeros(5, 3, dtype=torch.float64), 0
    for t in range(1, 4):
        g = torch.randn(5, 3)
        w.grad = g.clone()
        opt.step()
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = ref * (1 - lr * wd) - lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
        assert torch.allclose(w.detach().double(), ref, rtol=0, atol=1e-6), t
    assert float((ref - start).abs().min()) > 1e-4  # every weight moved 100 times the tolerance or more


def test_batch_stream_covers_each_epoch_once():
    s = BatchStream([3, 1, 2, 5, 4, 6, 7, 8], batch_size=3, seed=0)
    epoch = sorted(i for k in range(s.per_epoch) for i in s.batch(k))
    assert len(epoch) == len(set(epoch)) == 6
    assert s.batch(0) == BatchStream([3, 1, 2, 5, 4, 6, 7, 8], batch_size=3, seed=0).batch(0)


def test_precision_can_change_between_runs_in_one_process(tokenizer, tiny_suite, tmp_path):
    """compare trains its teacher, in bf16 where `auto` chooses it, then fp32 students, in one process."""
    recs = tiny_suite.d0
    ex = reference_examples(tokenizer, recs)
    for i, bf16 in enumerate((True, False, True)):
        model = build_model("gpt2", "nano", tokenizer, seed=0)
        logs = train(get_method("sft"), model, tokenizer, RunData(ex),
                     TrainConfig(steps=2, batch_size=4, bf16=bf16, log_every=1), MethodConfig(), SamplingConfig(),
                     tmp_path / str(i))
        assert len(logs) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)


def test_checkpoint_of_other_settings_is_not_resumed(tokenizer, tiny_suite, tmp_path, monkeypatch):
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, tiny_suite, tmp_path / "b", interrupt_at=5, monkeypatch=monkeypatch)
    monkeypatch.undo()
    _run(tokenizer, tiny_suite, tmp_path / "b", steps=7)  # other settings: starts from scratch
    _run(tokenizer, tiny_suite, tmp_path / "a", steps=7)
    a, b = load_model(str(tmp_path / "a" / "model")), load_model(str(tmp_path / "b" / "model"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def _dropout_models(tokenizer):
    """A GPT-2 with hub-like dropout 0.1 (nn.Dropout modules) and a Llama with attention_dropout 0.1 (a float the
    attention passes to its kernel in training mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = {"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, resid_pdrop=0.1,
                                      embd_pdrop=0.1, attn_pdrop=0.1, **ids))
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                         attention_dropout=0.5, attn_implementation="eager", **ids))
    return {"gpt2": gpt2, "llama": llama}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_disable_dropout_makes_training_forwards_those_of_eval_mode(tokenizer, arch):
    from prefkd.train import disable_dropout

    model = _dropout_models(tokenizer)[arch]
    x = torch.tensor([tokenizer("### Instruction:\nName a colour.")["input_ids"]])
    model.eval()
    with torch.no_grad():
        ref = model(x).logits
        model.train()
        assert not torch.allclose(model(x).logits, ref)  # the dice are on: the check below can fail
        disable_dropout(model)
        assert model.training and torch.equal(model(x).logits, ref)


@pytest.mark.parametrize("disable", [True, False])
def test_training_disables_the_students_dropout_unless_told_and_scores_the_teacher_in_eval_mode(
        tokenizer, tiny_suite, tmp_path, disable):
    student, teacher = (build_model("gpt2", "nano", tokenizer, seed=0) for _ in range(2))
    for model in (student, teacher):  # hub models keep their config's dropout (GPT-2: 0.1)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.1
    teacher.train()
    recs = tiny_suite.d0[:8]
    ex = reference_examples(tokenizer, recs)
    train(get_method("kd"), student, tokenizer, RunData(ex),
          TrainConfig(steps=1, batch_size=4, log_every=1, save_every=0, disable_dropout=disable), MethodConfig(),
          SamplingConfig(), tmp_path, teacher)
    rates = {m.p for m in student.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == ({0.0} if disable else {0.1})
    assert not teacher.training


# ---- train.bf16: true, false and auto ---------------------------------------------------------------------------

AMX = Hardware(cuda=False, amx=True, avx512_bf16=True)
AVX512_BF16 = Hardware(cuda=False, avx512_bf16=True)
NO_BF16_CPU = Hardware(cuda=False)


def _wide(width):
    """A module whose config says how wide it is, as a transformers model's does."""
    m = torch.nn.Linear(2, 2)
    m.config = SimpleNamespace(hidden_size=width)
    return m


@pytest.mark.parametrize(("hardware", "widths", "want"), [
    (Hardware(cuda=True, cuda_bf16=True), [128], True),  # a GPU with bf16: always
    (Hardware(cuda=True, cuda_bf16=False), [768], False),
    (NO_BF16_CPU, [768, 1024], False),  # no native bf16: emulated, never
    (AMX, [768, 768], True),
    (AVX512_BF16, [768], True),
    (AMX, [384], True),  # the threshold itself is wide enough
    (AMX, [383], False),
    (AMX, [768, 192], False),  # the narrowest model decides: a small teacher under autocast is slower too
    (AMX, [128, 192], False),  # the demo's models
])
def test_bf16_auto_rule(hardware, widths, want):
    choice, why = resolve_bf16("auto", [_wide(w) for w in widths], hardware)
    assert choice is want
    assert why.startswith("bf16 autocast" if want else "fp32")


def test_bf16_auto_reads_gpt2_width_and_skips_what_is_not_a_model(tokenizer):
    """GPT-2 keeps its width in n_embd (transformers maps hidden_size to it); a teacher server or no teacher (None)
    runs nothing under autocast here."""
    model = build_model("gpt2", "micro", tokenizer, seed=0)  # 64 wide
    assert model_width(model) == 64
    assert resolve_bf16("auto", [model, None, object()], AMX)[0] is False
    assert resolve_bf16("auto", [_wide(768), None], AMX)[0] is True
    assert resolve_bf16("auto", [torch.nn.Linear(2, 2)], AMX) == (False, "fp32: a model's width (config.hidden_size) "
                                                                         "is unknown")


def test_bf16_true_and_false_are_kept_whatever_the_hardware():
    for setting in (True, False):
        for hw in (AMX, NO_BF16_CPU, Hardware(cuda=True, cuda_bf16=True)):
            assert resolve_bf16(setting, [_wide(128)], hw)[0] is setting


def test_bf16_true_and_false_keep_their_run_and_stage_keys():
    """Keys of runs made before `auto` existed (the fingerprints main computed) stay valid: a finished stage or a
    checkpoint of bf16 true or false is still found."""
    want = {False: ("b990b3c3a4cbee8e", "4320fccc9368f34d", "3a2b4f226e412ac0"),
            True: ("4453319c78929d83", "603fdcc93c254fb3", "86ef7fce28afa935")}
    for bf16, keys in want.items():
        got = (stages.fingerprint(stages.settings(TrainConfig(bf16=bf16))),
               stages.fingerprint(stages.settings(DistillRun(train=TrainConfig(lr=5e-5, bf16=bf16)))),
               stages.fingerprint(stages.settings(SFTRun(train=TrainConfig(bf16=bf16)))))
        assert got == keys
    # The demo's teacher trained with bf16 true before its default became auto: that setting keeps its key.
    old_teacher = TrainConfig(steps=2400, batch_size=32, lr=1e-3, bf16=True, save_every=400)
    assert stages.fingerprint(stages.settings(ExperimentConfig(teacher_train=old_teacher))) == "a70dc5fe1bf33e6e"


def test_bf16_bad_value_is_a_config_error():
    with pytest.raises(ConfigError, match="train.bf16 must be true, false or auto, not 'fast'"):
        TrainConfig(bf16="fast")


def _sft(files, out, monkeypatch, hardware, existing="auto"):
    """`prefkd sft` of a nano model with train.bf16=auto on `hardware`, 16 wide counting as wide enough; returns the
    train.bf16 the loop was given."""
    import prefkd.recipes.sft as sft

    monkeypatch.setattr("prefkd.train.AUTO_BF16_MIN_WIDTH", 16)
    monkeypatch.setattr(Hardware, "detect", classmethod(lambda cls: hardware))
    given = []

    def spy(*args, **kwargs):
        given.append(args[4].bf16)  # train(method, model, tokenizer, data, cfg, ...)
        return train(*args, **kwargs)

    monkeypatch.setattr(sft, "train", spy)
    cfg = SFTRun(out=str(out), model=ModelConfig(size="nano"), tokenizer=str(files["tokenizer"]),
                 data=DataConfig(train=str(files["train"])),
                 train=TrainConfig(steps=2, batch_size=4, save_every=0, log_every=1, bf16="auto"))
    sft.run_sft(cfg, existing=existing)
    return given[0]


def test_bf16_auto_is_recorded_and_a_rerun_keeps_the_choice(tmp_path, tokenizer, monkeypatch):
    files = tiny_files(tmp_path, tokenizer)
    out = tmp_path / "run"
    assert _sft(files, out, monkeypatch, AMX) is True
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["bf16"] == "auto"  # the setting, as given: what a rerun is compared on
    assert saved["_resolved"]["train.bf16"]["value"] is True and "AMX" in saved["_resolved"]["train.bf16"]["why"]
    weights = (out / "model" / "model.safetensors").stat().st_mtime_ns
    # On hardware where the rule says fp32 the same run keeps bf16: its run key is the same, so the finished run is
    # found and nothing is retrained.
    assert _sft(files, out, monkeypatch, NO_BF16_CPU) is True
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == weights
    assert yaml.safe_load((out / "config.yaml").read_text())["_resolved"] == saved["_resolved"]
    # A run started afresh (--overwrite) asks the rule again.
    assert _sft(files, out, monkeypatch, NO_BF16_CPU, existing="overwrite") is False
    assert yaml.safe_load((out / "config.yaml").read_text())["_resolved"]["train.bf16"]["value"] is False


def test_bf16_auto_run_has_the_run_key_of_its_choice(tmp_path, tokenizer, monkeypatch):
    """An auto run that chose bf16 computes what bf16=true computes: the loop gets a bool, and its run key is that
    of bf16=true (so train_state.json of the two agree)."""
    files = tiny_files(tmp_path, tokenizer)
    _sft(files, tmp_path / "auto", monkeypatch, AMX)
    monkeypatch.undo()
    import prefkd.recipes.sft as sft

    sft.run_sft(SFTRun(out=str(tmp_path / "true"), model=ModelConfig(size="nano"), tokenizer=str(files["tokenizer"]),
                       data=DataConfig(train=str(files["train"])),
                       train=TrainConfig(steps=2, batch_size=4, save_every=0, log_every=1, bf16=True)))
    states = [json.loads((tmp_path / d / "train_state.json").read_text())["run_key"] for d in ("auto", "true")]
    assert states[0] == states[1]
