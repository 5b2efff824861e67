"""`prefkd card`: rebuild a saved student's model card from its run directory, optionally with an evaluation's
results, and optionally upload the model directory to the Hub (the way to push a run that was trained without
push_to_hub, or whose push failed)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from prefkd import config
from prefkd.cards import HubConfig, check_push, push, read_run_config, write_card


def run_card(run_dir: str, eval_dir: str | None = None, push_to: str = "", private: bool | None = None) -> Path:
    """Write RUN_DIR/model/README.md; with `eval_dir` (default: RUN_DIR/model/eval, `prefkd evaluate`'s default
    output, when it holds scores.json) add the results. With `push_to`, upload RUN_DIR/model to that repo with the
    run's hub settings (`private` overrides hub.private). Returns the card's path."""
    run = read_run_config(run_dir)
    hub = config.from_dict(HubConfig, run.get("hub") or {})
    if private is not None:
        hub = replace(hub, private=private)
    if push_to:
        check_push(push_to, hub)  # before the card is rewritten: a bad repo id changes nothing
    default_eval = Path(run_dir) / "model" / "eval"
    if eval_dir is None and (default_eval / "scores.json").is_file():
        eval_dir = str(default_eval)
    card = write_card(run_dir, run, eval_dir, name=push_to)
    if push_to:
        push(Path(run_dir) / "model", push_to, hub, run_dir)
    return card
