"""kill -9 a real `prefkd distill` / `prefkd generate` process, rerun with --resume, and end with exactly what an
uninterrupted run gives: the same weights bit for bit on CPU, the same log, the same samples."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from support import cli_env, one_thread, tiny_models
from typer.testing import CliRunner

from prefkd.cli import app
from prefkd.models import load_model

pytestmark = pytest.mark.slow
STEPS, SAVE_EVERY = 24, 3


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    return tiny_models(tmp_path_factory.mktemp("kill"), tokenizer)


def _distill_args(files, out):
    # dpkd samples y_t and y_s every step (temperature 1): resuming is bitwise only if the RNG states come back too.
    return ["distill", "--method", "dpkd", f"out={out}", f"student.path={files['student']}",
            f"teacher.path={files['teacher']}", f"data.prompts={files['prompts']}", f"data.replay={files['train']}",
            f"data.corpus={files['corpus']}", "distill.lm_block_size=16", "sampling.max_new_tokens=6",
            "sampling.batch_size=4", f"train.steps={STEPS}", "train.batch_size=4", "train.log_every=1",
            f"train.save_every={SAVE_EVERY}"]


def _start(args):
    return subprocess.Popen([sys.executable, "-m", "prefkd.cli", *args], env=cli_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_when(proc, ready, timeout=300.0):
    """SIGKILL `proc` as soon as `ready()` holds (polled every half millisecond); False if it ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.0005)
    if proc.poll() is None:
        proc.kill()
        pytest.fail("the run neither finished nor reached the kill point in time")
    return False


def _steps_done(ckpt):
    return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*")) if ckpt.is_dir() else []


def _log(out):
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed"}
            for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_distill_killed_twice_resumes_to_the_uninterrupted_weights(files, tmp_path):
    with one_thread():
        res = CliRunner().invoke(app, _distill_args(files, tmp_path / "whole"))
    assert res.exit_code == 0, res.output

    out, ckpt = tmp_path / "killed", tmp_path / "killed" / "checkpoint"
    # Kill 1: while checkpoint 6 is being written (its temporary directory exists), checkpoint 3 complete.
    proc = _start(_distill_args(files, out))
    assert _kill_when(proc, lambda: (ckpt / f".step-{2 * SAVE_EVERY:08d}.tmp").exists()), proc.stderr.read()
    assert _steps_done(ckpt) == [SAVE_EVERY] and not (out / "model").exists()

    # Without --resume the interrupted run is not touched.
    res = CliRunner().invoke(app, _distill_args(files, out))
    assert res.exit_code == 2 and "interrupted run (last checkpoint: step 3)" in res.output, res.output

    # Kill 2: at a random moment after a random later checkpoint.
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    target, delay = rng.randrange(3 * SAVE_EVERY, STEPS - SAVE_EVERY, SAVE_EVERY), rng.uniform(0.0, 0.3)
    where = f"second kill {delay:.3f} s after checkpoint {target} appeared"
    proc = _start([*_distill_args(files, out), "--resume"])
    seen = {}

    def ready():
        if not seen and target in _steps_done(ckpt):
            seen["at"] = time.time()
        return bool(seen) and time.time() - seen["at"] >= delay

    assert _kill_when(proc, ready), f"{where}: the run finished first\n{proc.stderr.read()}"
    assert _steps_done(ckpt) and not (out / "model").exists(), where

    proc = _start([*_distill_args(files, out), "--resume"])
    assert proc.wait(timeout=300) == 0, f"{where}\n{proc.stderr.read()}"
    whole, resumed = load_model(str(tmp_path / "whole" / "model")), load_model(str(out / "model"))
    for (name, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), f"{where}: {name} differs"
    assert _log(out) == _log(tmp_path / "whole"), where  # every step logged once, with the same values
    assert not ckpt.exists() and json.loads((out / "train_state.json").read_text())["finished"]


def _generate_args(files, out):
    return ["generate", f"model={files['teacher']}", f"data={files['prompts']}", f"out={out}",
            "sampling.max_new_tokens=8", "sampling.batch_size=2", "seed=3"]


def test_generation_cache_killed_midway_keeps_its_rows_and_completes(files, tmp_path):
    with one_thread():
        res = CliRunner().invoke(app, _generate_args(files, tmp_path / "whole.jsonl"))
    assert res.exit_code == 0, res.output
    whole = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)

    out = tmp_path / "killed.jsonl"
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    rows = rng.randrange(3, len(whole) - 4)  # killed once at least this many lines are on disk, maybe mid-batch
    proc = _start(_generate_args(files, out))
    assert _kill_when(proc, lambda: out.is_file() and out.read_bytes().count(b"\n") >= rows), proc.stderr.read()
    kept = out.read_bytes()
    assert 0 < kept.count(b"\n") < len(whole), f"killed after {rows} lines"

    res = CliRunner().invoke(app, _generate_args(files, out))
    assert res.exit_code == 2 and "--resume" in res.output  # an existing cache is not touched without a flag
    with one_thread():
        res = CliRunner().invoke(app, [*_generate_args(files, out), "--resume"])
    assert res.exit_code == 0, res.output
    final = out.read_bytes()
    complete = kept[: kept.rfind(b"\n") + 1]  # a line cut by the kill is dropped, every finished one kept as is
    assert final.startswith(complete), f"killed after {rows} lines"
    assert sorted(final.decode().splitlines(keepends=True)) == sorted(whole), f"killed after {rows} lines"
