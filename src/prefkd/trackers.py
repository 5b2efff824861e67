"""Experiment trackers (`train.report_to`): TensorBoard, Weights & Biases, Trackio and MLflow, through Accelerate.

Every tracker gets the same rows as the jsonl logs, named `train/<key>` and `diagnostics/<key>`, at the row's step,
and the run's resolved config once, flattened to dotted keys (`train.lr`). TensorBoard keeps writing to
`OUT/tensorboard` as before; wandb writes its run directory under `OUT/wandb`; MLflow and Trackio write where their
own settings say (MLFLOW_TRACKING_URI, TRACKIO_DIR). `train.run_group` (set by `compare` to its tag) is the wandb and
Trackio group and the MLflow experiment.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import yaml
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

from prefkd.errors import ConfigError

# name in report_to -> (module it imports, what pip installs it from)
TRACKERS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
            "trackio": ("trackio", "trackio"), "mlflow": ("mlflow", "mlflow-skinny")}
PROJECT = "prefkd"  # wandb/Trackio project and MLflow experiment of a run without a group


def parse(report_to: list[str] | str) -> list[str]:
    """The tracker names of `report_to` (a list, or a comma string), checked; `none` alone means no tracker."""
    items = report_to.split(",") if isinstance(report_to, str) else [str(x) for x in report_to]
    names = list(dict.fromkeys(n.strip().lower() for n in items if n.strip()))
    if unknown := [n for n in names if n not in (*TRACKERS, "none")]:
        raise ConfigError(f"train.report_to: unknown tracker {', '.join(unknown)}; choose from "
                          f"{', '.join(TRACKERS)} or none")
    if "none" in names and len(names) > 1:
        raise ConfigError(f"train.report_to: 'none' cannot be combined with other trackers ({','.join(names)})")
    return [n for n in names if n != "none"]


def available(name: str) -> bool:
    """Whether the tracker's package is importable (found without importing it: wandb takes seconds to import)."""
    return importlib.util.find_spec(TRACKERS[name][0]) is not None


def check_installed(*report_tos: list[str] | str) -> None:
    """Fail before any work when a tracker of `report_tos` is not installed, with the pip command that installs it."""
    names = list(dict.fromkeys(n for r in report_tos for n in parse(r)))
    if missing := [n for n in names if not available(n)]:
        pkgs = " ".join(TRACKERS[n][1] for n in missing)
        raise ConfigError(f"train.report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                          f"installed: pip install 'prefkd[tracking]' (or: pip install {pkgs})")


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"train.lr": 5e-4, ...}: trackers' config tables (MLflow params above all) take scalars."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flat_config(value, f"{name}."))
        elif isinstance(value, (list, tuple, dict)):
            flat[name] = ",".join(map(str, value)) if not isinstance(value, dict) else ""
        else:
            flat[name] = value
    return flat


class _TensorBoard(TensorBoardTracker):
    """Accelerate's TensorBoard tracker writing to OUT/tensorboard, with the config as one text entry.

    Accelerate's own config logging (`add_hparams`) adds a directory per call, named by the time, under the log
    directory; a text entry keeps OUT/tensorboard one run, as it was before the trackers."""

    def store_init_configuration(self, values: dict) -> None:
        if getattr(self, "writer", None) is not None:  # started on the main process only
            self.writer.add_text("config", "```\n" + yaml.safe_dump(values, sort_keys=True) + "```")
            self.writer.flush()


class _Trackio(TrackioTracker):
    """Accelerate's Trackio tracker, which also forgets the run once it is finished: trackio's exit hook finishes
    the current run again and prints its "Run finished" banner a second time, after everything else."""

    def finish(self) -> None:
        super().finish()
        from trackio import context_vars

        context_vars.current_run.set(None)


def build(report_to: list[str] | str, out: Path, group: str, run_name: str) -> list[GeneralTracker]:
    """The trackers of one training run; they start in `start` (main process only, after the resume check)."""
    made: list[GeneralTracker] = []
    for name in parse(report_to):
        if name == "tensorboard":
            made.append(_TensorBoard("tensorboard", out))
        elif name == "wandb":
            # WANDB_PROJECT, WANDB_MODE=offline etc. are read by wandb; the run directory goes inside the run's.
            made.append(WandBTracker(os.environ.get("WANDB_PROJECT") or PROJECT, name=run_name, group=group or None,
                                     dir=str(out)))
        elif name == "trackio":
            made.append(_Trackio(os.environ.get("TRACKIO_PROJECT") or PROJECT, name=run_name, group=group or None))
        elif name == "mlflow":
            made.append(MLflowTracker(experiment_name=group or PROJECT, run_name=run_name))
    return made
