"""The training loop: resume after an interruption ends with the same weights as an uninterrupted run."""

import pytest
import torch
from support import reference_examples

from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, get_method
from prefkd.models import build_model, load_model
from prefkd.train import BatchStream, RunData, TrainConfig, train


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


def test_batch_stream_covers_each_epoch_once():
    s = BatchStream([3, 1, 2, 5, 4, 6, 7, 8], batch_size=3, seed=0)
    epoch = sorted(i for k in range(s.per_epoch) for i in s.batch(k))
    assert len(epoch) == len(set(epoch)) == 6
    assert s.batch(0) == BatchStream([3, 1, 2, 5, 4, 6, 7, 8], batch_size=3, seed=0).batch(0)


def test_precision_can_change_between_runs_in_one_process(tokenizer, tiny_suite, tmp_path):
    """The demo trains a bf16 teacher, then fp32 students, in one process."""
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
