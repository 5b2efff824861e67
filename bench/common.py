"""What every benchmark shares: side-by-side timing, peak memory of child processes, the results file, tables.

The machine is noisy (2 cores shared with other jobs), so a figure is always a ratio of two things measured in the
same run: timings alternate between the two sides after a warm-up and are summarised by their median; peak
memory (per process) is read from child processes launched alternately by the same run.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from prefkd import atomic

ROOT = Path(__file__).resolve().parent.parent
# BENCH_RESULTS: another file (bench/gpu_check.sh keeps a GPU run's figures apart from the CPU ones)
RESULTS = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).parent / "results.json")
console = Console()


def set_threads() -> int:
    """torch intra-op threads for the run (children inherit `BENCH_THREADS`): 1 unless `BENCH_THREADS` says
    otherwise (0 = torch's default, one per core).

    One thread because the benchmark machine is shared: with other jobs on its two cores, two threads wait on
    each other at every small op and run 2-4x slower than one. Both sides of every comparison use the same count;
    the MFU benchmark measures both counts."""
    n = int(os.environ.setdefault("BENCH_THREADS", "1") or 0)
    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function: `warmup` untimed calls each, then `reps` rounds calling them in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].append(timed(fn))
    return out


def after_each_trainer_step(then: Callable[[int, float], None], dev: torch.device | None = None):
    """A transformers TrainerCallback that times each step of a Trainer (TRL's) and then calls `then(k, seconds)`,
    k the batch the step trained on (a sequential sampler's step index): the caller times its own step on the same
    batch there, so the two sides alternate step by step. On a GPU the clock reads after a synchronize."""
    from transformers import TrainerCallback

    def sync() -> None:
        if dev is not None and dev.type == "cuda":
            torch.cuda.synchronize(dev)

    class AfterEachStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            then(state.global_step - 1, time.perf_counter() - self.t0)

    return AfterEachStep()


# ---- peak memory, one child process per measurement -----------------------------------------------------------


def rss_kb(field: str = "VmRSS") -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def reset_peak() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); returns that RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_kb()


def child_report(**extra: object) -> None:
    """Last stdout line of a child: its peak RSS since the last `reset_peak`, as JSON."""
    print(json.dumps({"peak_kb": rss_kb("VmHWM"), **extra}), flush=True)


def run_children(commands: dict[str, list[str]], rounds: int, timeout: int = 600) -> dict[str, list[dict]]:
    """Run each command `rounds` times, alternating between them; each returns its child's last JSON line."""
    out: dict[str, list[dict]] = {name: [] for name in commands}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for _ in range(rounds):
        for name, cmd in commands.items():
            proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, cwd=ROOT, env=env,
                                  timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"benchmark child {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            out[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


# ---- results and tables ---------------------------------------------------------------------------------------


def machine() -> dict:
    cpu, flags = platform.processor(), []
    info = Path("/proc/cpuinfo")
    if info.is_file():
        text = info.read_text()
        m = re.search(r"model name\s*:\s*(.+)", text)
        cpu = m.group(1).strip() if m else cpu
        m = re.search(r"flags\s*:\s*(.+)", text)
        have = set(m.group(1).split()) if m else set()
        flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if f in have]
    return {"cpu": cpu, "cpu_flags": flags, "cores": os.cpu_count(), "memory_gb": _memory_gb(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform()}


def _memory_gb() -> float | None:
    m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()) if Path("/proc/meminfo").is_file() \
        else None
    return round(int(m.group(1)) / 2**20, 1) if m else None


def save(bench: str, figures: dict[str, float], settings: dict, details: dict | None = None) -> None:
    """Merge one benchmark's figures (top-level keys), settings and raw details into bench/results.json."""
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    for key in data.get("figure_keys", {}).get(bench, []):  # a figure this benchmark no longer reports goes
        data.pop(key, None)
    data.update(figures)
    data.setdefault("figure_keys", {})[bench] = sorted(figures)
    data.setdefault("settings", {})[bench] = settings
    data.setdefault("details", {})[bench] = details or {}
    data["machine"] = machine()
    data.setdefault("measured_at", {})[bench] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    atomic.write_json(RESULTS, data)


def table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Rows of (figure, value, target)."""
    t = Table(title=title)
    for col in ("figure", "value", "target"):
        t.add_column(col)
    for row in rows:
        t.add_row(*row)
    console.print(t)


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)
