"""Weights as safetensors, pickles only through torch.load(weights_only=True) (ours and the libraries' on our
paths), no model code run without trust_remote_code, and config paths that cannot write outside the run."""

import json
import re
from pathlib import Path

import pytest
import torch
from support import reference_examples
from transformers import GPT2Config
from typer.testing import CliRunner

import prefkd
from prefkd.checkpoints import CheckpointError
from prefkd.cli import app
from prefkd.errors import ConfigError, PrefkdError
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, get_method
from prefkd.models import ModelConfig, build_model, load_model
from prefkd.rundir import inside
from prefkd.train import RunData, TrainConfig, train

SRC = Path(prefkd.__file__).parent
runner = CliRunner()


class Payload:
    """Unpickling this runs code: it opens (creates) `marker`. A safe loader refuses it before that happens."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_source_never_unpickles_or_trusts_remote_code_by_itself():
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)
        assert not re.search(r"\bpickle\.loads?\(|\bdill\b|\bjoblib\b", text), path
        assert "trust_remote_code=True" not in text, path
        assert "safe_serialization=False" not in text, path
    assert ModelConfig().trust_remote_code is False


def _interrupted_run(tokenizer, tiny_suite, out, monkeypatch):
    """An SFT run stopped after its checkpoint at step 2 (as a kill would leave it)."""
    recs = tiny_suite.d0
    ex = reference_examples(tokenizer, recs)

    def run():
        train(get_method("sft"), build_model("gpt2", "nano", tokenizer), tokenizer, RunData(ex),
              TrainConfig(steps=4, batch_size=4, save_every=2), MethodConfig(), SamplingConfig(), out)

    real, calls = torch.optim.AdamW.step, {"n": 0}

    def step(self, *a, **k):
        torch.rand(1)  # as a sampling method does: the checkpoint's RNG state differs from the seed's
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", step)
        with pytest.raises(KeyboardInterrupt):
            run()
    return run


def test_checkpoints_and_models_are_safetensors(tokenizer, tiny_suite, tmp_path, monkeypatch):
    run = _interrupted_run(tokenizer, tiny_suite, tmp_path / "r", monkeypatch)
    ckpt = tmp_path / "r" / "checkpoint" / "step-00000002"
    names = {p.name for p in ckpt.iterdir()}
    assert "model.safetensors" in names and not any(n.endswith((".bin", ".pt", ".pth")) and "model" in n
                                                    for n in names)
    run()
    weights = {p.name for p in (tmp_path / "r" / "model").iterdir() if "model" in p.name}
    assert weights == {"model.safetensors"}


@pytest.mark.parametrize("victim", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_a_checkpoint_pickle_with_code_is_refused_unread(tokenizer, tiny_suite, tmp_path, monkeypatch, victim):
    """Accelerate reads these with torch.load(weights_only=True); for the RNG file it only logs a failure, which
    prefkd's RNG fingerprint turns into an error instead of a silently different run."""
    run = _interrupted_run(tokenizer, tiny_suite, tmp_path / "r", monkeypatch)
    marker = tmp_path / "PWNED"
    torch.save({"state": Payload(marker)}, tmp_path / "r" / "checkpoint" / "step-00000002" / victim)
    with pytest.raises(CheckpointError, match="cannot be read.*--overwrite"):
        run()
    assert not marker.exists()


def test_a_pickled_model_file_with_code_is_refused_unread(tmp_path):
    GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2, bos_token_id=0, eos_token_id=0).save_pretrained(tmp_path)
    marker = tmp_path / "PWNED"
    torch.save({"transformer.wte.weight": Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(PrefkdError, match="holds Python objects.*refused unread"):
        load_model(str(tmp_path))
    assert not marker.exists()


def test_model_code_runs_only_with_trust_remote_code(tmp_path, files):
    evil = tmp_path / "custom"
    evil.mkdir()
    marker = tmp_path / "PWNED"
    cfg = GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2, bos_token_id=0, eos_token_id=0).to_dict()
    cfg.update(model_type="customgpt", auto_map={"AutoConfig": "custom_code.CustomConfig",
                                                 "AutoModelForCausalLM": "custom_code.CustomModel"})
    (evil / "config.json").write_text(json.dumps(cfg))
    for f in files["student"].glob("tokenizer*"):  # a usable tokenizer: only the model's code stands in the way
        (evil / f.name).write_bytes(f.read_bytes())
    (evil / "custom_code.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from transformers import GPT2Config, GPT2LMHeadModel\n"
        "class CustomConfig(GPT2Config):\n    model_type = 'customgpt'\n"
        "class CustomModel(GPT2LMHeadModel):\n    config_class = CustomConfig\n")
    res = runner.invoke(app, ["distill", "--method", "seqkd", f"out={tmp_path / 'out'}",
                              f"student.path={files['student']}", f"teacher.path={evil}",
                              f"data.prompts={files['prompts']}", "sampling.max_new_tokens=4"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "custom code" in res.output and "teacher.trust_remote_code=true" in " ".join(res.output.split())
    assert not marker.exists()


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    from support import tiny_models

    return tiny_models(tmp_path_factory.mktemp("security"), tokenizer)


def test_config_paths_cannot_climb_out_of_the_run_directory(tmp_path, files):
    root = tmp_path / "run"
    assert inside(root, "cache", "k") == root / "cache"
    assert inside(root, "a/../b/./c", "k") == root / "b" / "c"
    assert inside(root, str(tmp_path / "shared"), "k") == tmp_path / "shared"  # absolute: the user's explicit choice
    for bad in ("../x", "a/../../x", "./../x"):
        with pytest.raises(ConfigError, match="would write outside"):
            inside(root, bad, "distill.cache_dir")
    res = runner.invoke(app, ["distill", "--method", "seqkd", f"out={root}", f"student.path={files['student']}",
                              f"teacher.path={files['teacher']}", f"data.prompts={files['prompts']}",
                              "distill.cache_dir=../escaped"])
    assert res.exit_code == 2 and "config key 'distill.cache_dir'" in res.output and "would write outside" in \
        " ".join(res.output.split())
    assert not (tmp_path / "escaped").exists() and not root.exists()  # refused before anything was written
    # A relative cache_dir is taken inside the run directory, not the working directory.
    res = runner.invoke(app, ["distill", "--method", "seqkd", f"out={root}", f"student.path={files['student']}",
                              f"teacher.path={files['teacher']}", f"data.prompts={files['prompts']}",
                              "distill.cache_dir=samples", "sampling.max_new_tokens=4", "train.steps=1",
                              "train.batch_size=2"])
    assert res.exit_code == 0, res.output
    assert list((root / "samples").glob("teacher-*.jsonl")) and not Path("samples").exists()
