"""The training loop: resume after an interruption ends with the same weights as an uninterrupted run."""

import pytest
import torch

from prefkd.data.collate import encode_examples
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, get_method
from prefkd.models import build_model, load_model
from prefkd.train import BatchStream, RunData, TrainConfig, train


def _run(tokenizer, suite, out, steps=6, interrupt_at=None, monkeypatch=None):
    recs = suite.d0
    ex, _ = encode_examples(tokenizer, [r.prompt for r in recs], [r.references[0] for r in recs])
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
    ex, _ = encode_examples(tokenizer, [r.prompt for r in recs], [r.references[0] for r in recs])
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
