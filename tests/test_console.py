"""Console output read later (CI logs, `| tee run.log`, notebooks): whole tables, one line per stage, no bars."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import support

from prefkd.console import LOG_WIDTH, LineProgress, LogAwareConsole, console, progress
from prefkd.data.records import Instruction
from prefkd.recipes.compare import ExperimentConfig, summarize
from prefkd.report import results_table

NAMES = ("teacher", "sft", "sft_continued", "dpkd-paper-variant")
BAR = "━"  # rich's bar glyph


def _results() -> dict:
    """A results dict as `prefkd compare` prints it (built as in tests/test_compare.py), with long row names."""
    rng = np.random.default_rng(0)
    records = [Instruction(f"q{i}", references=("a b c",), kind="D" if i % 2 else "skill") for i in range(20)]
    base = rng.uniform(0, 60, size=20)
    scores = {name: {"rougeL": np.stack([[base + shift + rng.normal(0, 2, 20)]]),
                     "exact_match": np.stack([[base / 2]])} for name, shift in zip(NAMES, (30, 0, 2, 12), strict=True)}
    return summarize(scores, records, ExperimentConfig(methods=["dpkd-paper-variant"], bootstrap=100))


def _log_to_string(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point the module's console at a string, as a pipe or a log file is to rich: no tty. `_file`, not the `file`
    property: undoing the property would pin the console to this test's captured stderr; `_file` goes back to None
    (follow sys.stderr)."""
    monkeypatch.setattr(console, "_file", io.StringIO())


def _table_text(target: LogAwareConsole, results: dict) -> str:
    target.print(results_table(results))
    return target.file.getvalue()  # type: ignore[attr-defined]


def test_results_table_is_printed_whole_where_the_console_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    results = _results()
    _log_to_string(monkeypatch)
    assert console.log_mode
    text = _table_text(console, results)
    assert "…" not in text
    header = next(line for line in text.splitlines() if "model" in line)
    for col in ("model", "Rouge-L", "vs sft", "gap recovered", "EM", "D items", "skill items"):
        assert col in header
    rows = [line for line in text.splitlines() if line.startswith("│") and line.split("│")[1].strip() in NAMES]
    assert [line.split("│")[1].strip() for line in rows] == list(NAMES)
    assert all(f"{r['rougeL']['mean']:.2f} [" in line for r, line in zip(results["rows"], rows, strict=True))
    assert max(len(line) for line in text.splitlines()) > 80
    # On an 80-column terminal the same table is still fitted to the screen (and cut): the log width is the change.
    terminal = LogAwareConsole(file=io.StringIO(), force_terminal=True, width=80)
    assert not terminal.log_mode
    assert "…" in _table_text(terminal, results)


def _sft(files: dict, out: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefkd.cli", "sft", f"out={out}", f"tokenizer={files['tokenizer']}",
                           "model.size=nano", f"data.train={files['train']}", "train.steps=3", "train.batch_size=4"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_a_training_run_logs_one_line_per_stage_and_no_progress_bars(tmp_path: Path, tokenizer) -> None:
    files = support.tiny_files(tmp_path, tokenizer)
    env = {k: v for k, v in support.cli_env().items() if k not in ("COLUMNS", "TTY_COMPATIBLE", "FORCE_COLOR")}
    res = _sft(files, tmp_path / "log", env)  # stdout and stderr are pipes, as under `| tee` or in CI
    assert res.returncode == 0, res.stderr
    log = res.stdout + res.stderr
    assert "\r" not in log and "\x1b[" not in log and BAR not in log
    done = [line for line in log.splitlines() if re.fullmatch(r"sft SFT: done 3/3 in \d+\.\d s, loss \d+\.\d{3}", line)]
    assert len(done) == 1, log
    assert f"wrote {tmp_path / 'log'}/model" in log
    # The same run where rich sees a terminal (TTY_COMPATIBLE=1) draws and redraws its bar: the check above is the
    # log mode's doing, not a quiet stage.
    res = _sft(files, tmp_path / "tty", {**env, "TTY_COMPATIBLE": "1"})
    assert res.returncode == 0, res.stderr
    assert BAR in res.stderr and "sft: done" not in res.stderr


def test_an_asked_width_wins_over_the_log_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("JUPYTER_COLUMNS", raising=False)
    assert LogAwareConsole(file=io.StringIO()).width == LOG_WIDTH
    assert LogAwareConsole(file=io.StringIO(), width=100).width == 100
    # A notebook is a log too (rich's own notebook width, 115, would cut the table), unless JUPYTER_COLUMNS says.
    notebook = LogAwareConsole(file=io.StringIO(), force_jupyter=True)
    assert notebook.log_mode and notebook.width == LOG_WIDTH
    monkeypatch.setenv("COLUMNS", "132")
    assert LogAwareConsole(file=io.StringIO()).width == 132


def test_a_stage_that_ends_early_logs_where_it_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    _log_to_string(monkeypatch)
    with pytest.raises(RuntimeError), progress() as bar:
        assert isinstance(bar, LineProgress)
        done = bar.add_task("teacher samples", total=4, completed=1, info="seed 10")
        bar.update(done, advance=3)
        bar.update(done, advance=0)  # a finished stage is logged once
        cut = bar.add_task("dpkd", total=10, info="")
        bar.update(cut, advance=2, info="loss 0.500")
        raise RuntimeError("the run failed here")
    lines = console.file.getvalue().splitlines()  # type: ignore[attr-defined]
    assert len(lines) == 2, lines
    assert re.fullmatch(r"teacher samples: done 4/4 \(from 1\) in \d+\.\d s, seed 10", lines[0])
    assert re.fullmatch(r"dpkd: stopped at 2/10 in \d+\.\d s, loss 0\.500", lines[1])
    # Non-main processes of a multi-process run stay silent, in a log as on a terminal.
    with progress(disable=True) as bar:
        bar.update(bar.add_task("x", total=1, info=""), advance=1)
    assert len(console.file.getvalue().splitlines()) == 2  # type: ignore[attr-defined]
