"""Bad input, a busy output directory (another run's, or one another live process holds), corrupt checkpoints and
caches, non-finite losses: each through the real CLI, each a one-line error (exit 2, no traceback) that names the
file, line and field where there is one and says what to do, with nothing half-written left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support import reference_examples
from typer.testing import CliRunner

from prefkd import distributed, rundir
from prefkd.cli import app
from prefkd.data.collate import encode_prompts
from prefkd.distributed import TrainingDiverged
from prefkd.errors import ConfigError
from prefkd.generation import SamplingConfig
from prefkd.methods import MethodConfig, get_method
from prefkd.models import build_model
from prefkd.train import RunData, TrainConfig, train

runner = CliRunner()
GOOD = {"instruction": "Say hi", "input": "", "references": ["hi"]}


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    from support import tiny_models

    return tiny_models(tmp_path_factory.mktemp("failures"), tokenizer)


def _error(res, *needles):
    """Exit 2, the error on one last line starting with 'error:' and holding every needle, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1, res.output
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


def _sft(files, out, *extra):
    return runner.invoke(app, ["sft", f"out={out}", f"tokenizer={files['tokenizer']}", "model.size=nano",
                               f"data.train={files['train']}", "train.steps=2", "train.batch_size=4", *extra])


BAD_LINES = [
    ("malformed_json", b'{"instruction": "a"', ["bad.jsonl:2", "malformed JSON"]),
    ("missing_field", b'{"input": "a", "references": ["b"]}', ["bad.jsonl:2 field 'instruction'", "missing required"]),
    ("wrong_type", b'{"instruction": 3, "references": ["b"]}', ["bad.jsonl:2 field 'instruction'", "wrong type int"]),
    ("empty_instruction", b'{"instruction": "  ", "references": ["b"]}', ["field 'instruction'", "empty instruction"]),
    ("empty_response", b'{"instruction": "a", "references": [""]}', ["bad.jsonl:2 field 'references'", "non-empty"]),
    ("invalid_utf8", b'{"instruction": "\xff", "references": ["b"]}', ["bad.jsonl:2", "invalid UTF-8", "re-encode"]),
]


@pytest.mark.parametrize("case, line, needles", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_bad_record_names_file_line_and_field(files, tmp_path, case, line, needles):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(GOOD).encode() + b"\n" + line + b"\n")
    _error(_sft(files, tmp_path / "out", f"data.train={bad}"), *needles)
    assert not (tmp_path / "out").exists()  # nothing written: a fixed rerun needs no --overwrite


def test_empty_and_missing_files(files, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _error(_sft(files, tmp_path / "a", f"data.train={empty}"), "empty.jsonl", "no records; the file is empty")
    _error(_sft(files, tmp_path / "b", f"data.train={tmp_path / 'nope.jsonl'}"), "nope.jsonl", "file not found")
    res = runner.invoke(app, ["distill", f"out={tmp_path / 'c'}", f"student.path={tmp_path / 'no-model'}",
                              f"teacher.path={files['teacher']}", f"data.prompts={files['prompts']}"])
    _error(res, "no-model", "cannot load a tokenizer")
    res = runner.invoke(app, ["distill", f"out={tmp_path / 'd'}", f"student.path={files['student']}",
                              f"teacher.path={tmp_path / 'no-teacher'}", f"data.prompts={files['prompts']}"])
    _error(res, "no-teacher")


def test_white_box_method_names_both_vocabularies(files, tmp_path):
    from prefkd.models import build_model, save_pretrained, train_tokenizer

    other = train_tokenizer(["a completely different corpus " * 40], vocab_size=300)
    save_pretrained(build_model("gpt2", "nano", other), other, tmp_path / "other")
    res = runner.invoke(app, ["distill", "--method", "kd", f"out={tmp_path / 'x'}", f"student.path={files['student']}",
                              f"teacher.path={tmp_path / 'other'}", f"data.prompts={files['prompts']}"])
    _error(res, "method 'kd' is white-box", f"student '{files['student']}': 400 tokens",
           f"teacher '{tmp_path / 'other'}': ", "a method that distils across tokenizers")
    assert not (tmp_path / "x").exists()


def test_unknown_method_and_misspelt_key_suggest_the_closest(files, tmp_path):
    res = runner.invoke(app, ["distill", "--method", "dpdk", f"out={tmp_path / 'x'}"])
    _error(res, "unknown method 'dpdk'", "did you mean 'dpkd'")
    _error(_sft(files, tmp_path / "y", "train.setps=3"), "unknown config key 'train.setps'",
           "did you mean 'train.steps'")
    _error(_sft(files, tmp_path / "z", "train.lr=fast"), "config key 'train.lr'", "expected float")


def test_prompts_over_the_limit_are_filtered_with_a_count(files, tmp_path, tokenizer):
    rows = [json.loads(line) for line in files["train"].read_text().splitlines()]
    lengths = sorted(len(p) for p in encode_prompts(tokenizer, [_prompt(r) for r in rows]))
    limit = lengths[len(lengths) // 2]  # about half the prompts are longer
    over = sum(n > limit for n in lengths)
    res = _sft(files, tmp_path / "half", f"train.max_prompt_tokens={limit}")
    assert res.exit_code == 0, res.output
    assert f"dropped {over} of {len(rows)} examples over the length limits" in " ".join(res.output.split())
    # Nothing left is an error, not an empty run.
    _error(_sft(files, tmp_path / "none", "train.max_prompt_tokens=2"), "no example is left", "train.max_prompt_tokens")


def _prompt(row):
    from prefkd.data.templates import render_prompt

    return render_prompt(row["instruction"], row.get("input", ""))


def test_output_directory_holding_a_run_needs_resume_or_overwrite(files, tmp_path):
    out = tmp_path / "run"
    assert _sft(files, out).exit_code == 0
    weights = out / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    # Other settings: refused, with the differing key named; --resume does not apply to them either.
    _error(_sft(files, out, "train.lr=1e-3"), f"{out} holds a finished run of other settings",
           "train.lr: 0.0005 -> 0.001", "--overwrite")
    _error(_sft(files, out, "train.lr=1e-3", "--resume"), "--resume continues a run of the same settings only")
    # The same settings: refused without a flag, kept as is with --resume.
    _error(_sft(files, out), "holds a finished run of these settings", "--resume", "--overwrite")
    res = _sft(files, out, "--resume")
    assert res.exit_code == 0 and "nothing to do" in res.output and weights.stat().st_mtime_ns == stamp
    # --overwrite retrains with the new settings.
    res = _sft(files, out, "train.lr=1e-3", "--overwrite")
    assert res.exit_code == 0 and weights.stat().st_mtime_ns != stamp
    assert "lr: 0.001" in (out / "config.yaml").read_text()
    _error(_sft(files, out, "--resume", "--overwrite"), "not both")


def test_non_finite_loss_stops_with_step_and_term_and_keeps_the_checkpoint(files, tmp_path):
    """A learning rate of 1e30 blows the weights up after the first updates: a real divergence, not a mock."""
    out = tmp_path / "nan"
    res = _sft(files, out, "train.lr=1e30", "train.steps=6", "train.save_every=2", "train.log_every=1")
    line = _error(res, "step 3: nll = nan is not finite", "the last good checkpoint (step 2) is kept",
                  "train.lr")
    assert "(also non-finite: loss)" in line
    assert (out / "checkpoint" / "step-00000002" / "model.safetensors").is_file()
    assert not (out / "model").exists()
    assert [json.loads(r)["step"] for r in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]


def test_non_finite_gradient_names_the_gradient_norm(tokenizer, tiny_suite, tmp_path, monkeypatch):
    recs = tiny_suite.d0
    ex = reference_examples(tokenizer, recs)
    real, calls = distributed.clip_grad_norm, {"n": 0}

    def clip(acc, model, max_norm):
        calls["n"] += 1
        return float("inf") if calls["n"] == 3 else real(acc, model, max_norm)

    monkeypatch.setattr(distributed, "clip_grad_norm", clip)
    with pytest.raises(TrainingDiverged, match=r"step 3: gradient norm = inf is not finite"):
        train(get_method("sft"), build_model("gpt2", "nano", tokenizer), tokenizer, RunData(ex),
              TrainConfig(steps=5, batch_size=4, save_every=0), MethodConfig(), SamplingConfig(), tmp_path / "g")
    assert not (tmp_path / "g" / "model").exists()


def test_check_finite_reports_the_loss_term_before_diagnostics_and_the_total():
    values = {"margin": float("nan"), "pref_loss": float("nan"), "loss": float("nan"), "replay_nll": 1.0}
    with pytest.raises(TrainingDiverged, match=r"^step 7: pref_loss = nan is not finite \(also non-finite: "
                                               r"margin, loss\)"):
        distributed.check_finite(7, values, lambda: "no checkpoint was written yet")
    distributed.check_finite(7, {"loss": 1.0, "lm_loss": -0.0}, lambda: "")  # finite: no error


def test_corrupt_or_truncated_checkpoint_says_what_to_do(files, tmp_path):
    out = tmp_path / "ck"
    _sft(files, out, "train.lr=1e30", "train.steps=6", "train.save_every=2")  # stops at step 3, checkpoint 2 kept
    ckpt = out / "checkpoint" / "step-00000002"
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    _error(_sft(files, out, "train.lr=1e30", "train.steps=6", "train.save_every=2", "--resume"),
           f"checkpoint {ckpt} cannot be read", "--overwrite")
    (ckpt / "trainer_state.json").write_text("{not json")
    _error(_sft(files, out, "train.lr=1e30", "train.steps=6", "train.save_every=2", "--resume"),
           "trainer_state.json", "cannot be read", "--overwrite")
    res = _sft(files, out, "--overwrite")  # the way out the message names
    assert res.exit_code == 0 and (out / "model" / "model.safetensors").is_file()
    assert not (out / "checkpoint").exists()


def test_corrupt_sample_cache_names_its_line(files, tmp_path):
    out = tmp_path / "samples.jsonl"
    args = ["generate", f"model={files['teacher']}", f"data={files['prompts']}", f"out={out}",
            "sampling.max_new_tokens=4", "sampling.batch_size=16"]
    assert runner.invoke(app, args).exit_code == 0
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3] + ["{not json\n"] + lines[4:]))
    _error(runner.invoke(app, [*args, "--resume"]), f"{out}:4", "malformed line", "delete the file")
    _error(runner.invoke(app, args), f"{out} already holds a file that is not a readable sample cache", "--overwrite")
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert len(out.read_text().splitlines()) == len(lines)


def test_installed_command_prints_one_line_and_exits_2(tmp_path):
    """The console script itself, not the in-process runner: one line on stderr, no traceback, status 2."""
    from support import cli_env

    res = subprocess.run([sys.executable, "-m", "prefkd.cli", "sft", f"out={tmp_path}", "train.stesp=1"],
                         capture_output=True, text=True, env=cli_env(), timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == ["error: unknown config key 'train.stesp'; did you mean 'train.steps'?"]
    res = runner.invoke(app, ["sft", f"out={tmp_path}", "train.stesp=1", "--debug"])
    assert res.exit_code == 1 and isinstance(res.exception, ConfigError)  # --debug lets the traceback through



def _sft_args(files, out, steps, *extra):
    return ["sft", f"out={out}", f"tokenizer={files['tokenizer']}", "model.size=nano", f"data.train={files['train']}",
            f"train.steps={steps}", "train.batch_size=4", "train.log_every=1", *extra]


def _start_sft(files, out, steps, *extra):
    from support import cli_env

    return subprocess.Popen([sys.executable, "-m", "prefkd.cli", *_sft_args(files, out, steps, *extra)],
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(proc, out):
    """Until `proc` holds out's lock (it writes its pid right after taking it); fails if it ends first."""
    lock = out / rundir.LOCK
    while proc.poll() is None:
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return
        time.sleep(0.01)
    pytest.fail(f"the run ended (exit {proc.returncode}) before it took the lock:\n{proc.stderr.read()[-3000:]}")


def _stop(*procs):
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)  # a stopped process does not act on SIGKILL until continued on some systems
            p.kill()
            p.wait()


def test_run_directory_lock_refuses_another_process_and_is_released(tmp_path):
    """In-process claim() takes the lock; a second process claiming the same out is refused with this pid; after
    release the lock file is gone, and so is the directory claim() created for a run that wrote nothing."""
    out = tmp_path / "new" / "run"
    assert rundir.claim(out, {"a": 1}, "refuse") is False
    try:
        assert (out / rundir.LOCK).read_text().strip() == str(os.getpid())
        assert rundir.claim(out, {"a": 1}, "refuse") is False  # re-entrant within the holding process
        probe = f"from prefkd import rundir; rundir.claim({str(out)!r}, {{'a': 1}}, 'refuse')"
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
        assert res.returncode != 0 and "RunDirBusy" in res.stderr, res.stderr[-2000:]
        assert f"{out} is in use by another run (pid {os.getpid()}" in res.stderr
        # A process of rank 1 in a launch does not take it: rank 0 holds it for the launch.
        res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "RANK": "1"})
        assert res.returncode == 0, res.stderr[-2000:]
    finally:
        rundir.release_all()
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_second_run_into_a_busy_directory_is_refused_with_the_holders_pid(files, tmp_path):
    """Two real `prefkd sft` processes on one out=: the second is refused while the first holds the directory
    (stopped with SIGSTOP once it holds the lock, so the overlap does not depend on timing), the first finishes,
    and its log has every step once."""
    out, steps = tmp_path / "run", 30
    first = _start_sft(files, out, steps)
    second = None
    try:
        _wait_for_lock(first, out)
        os.kill(first.pid, signal.SIGSTOP)
        second = _start_sft(files, out, steps)
        _, err = second.communicate(timeout=300)
        assert second.returncode == 2, err[-3000:]
        line = [x for x in err.splitlines() if x.startswith("error:")]
        assert len(line) == 1 and f"is in use by another run (pid {first.pid}" in line[0], err[-3000:]
        assert "wait for it to finish" in line[0] and "Traceback" not in err
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-3000:]
    finally:
        _stop(first, *([second] if second else []))
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert (out / "model").is_dir() and not (out / rundir.LOCK).exists()


@pytest.mark.slow
def test_run_killed_while_holding_the_lock_resumes_without_cleanup(files, tmp_path):
    """kill -9 leaves the lock file behind, but the kernel dropped the lock with the process: --resume goes on."""
    out, steps = tmp_path / "run", 60  # the kill lands after checkpoint 5, long before the end
    first = _start_sft(files, out, steps, "train.save_every=5")
    try:
        while first.poll() is None and not list((out / "checkpoint").glob("step-*")):
            time.sleep(0.01)
        assert first.poll() is None, f"the run ended before its first checkpoint:\n{first.stderr.read()[-3000:]}"
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        _stop(first)
    assert (out / rundir.LOCK).read_text().strip() == str(first.pid)  # stale: its holder is gone
    resumed = _start_sft(files, out, steps, "train.save_every=5", "--resume")
    try:
        _, err = resumed.communicate(timeout=300)
    finally:
        _stop(resumed)
    assert resumed.returncode == 0, err[-3000:]
    assert json.loads((out / "train_state.json").read_text())["finished"] and not (out / rundir.LOCK).exists()
