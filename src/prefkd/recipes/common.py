"""What every recipe does with its run directory and inputs: claim it, write the resolved config, read data."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import yaml

from prefkd import atomic, config, rundir, stages
from prefkd.config import opt
from prefkd.console import console
from prefkd.data.chat import TEMPLATE_HELP, Renderer, same_rendering
from prefkd.distributed import process_state
from prefkd.errors import DataError, PrefkdError
from prefkd.train import TrainConfig, resolve_bf16

# config.yaml's record of what `auto` settings became when the run started ({"train.bf16": {"value", "why"}}):
# left out of the settings a rerun is compared on (rundir.IGNORED_KEYS), read back so that a resumed run keeps them.
RESOLVED = "_resolved"


@dataclass
class DataConfig:
    train: str = opt("", "SFT: records with references (any format `prefkd.data.load_instructions` reads: prefkd "
                         "jsonl, Dolly, MiniLLM, csv, parquet or a hub dataset id)")
    prompts: str = opt("", "distillation: records whose prompts the method uses (references unused unless the "
                           "method needs them); same formats")
    replay: str = opt("", "records with references replayed with cross-entropy (distill.replay share)")
    corpus: str = opt("", "plain-text pretraining corpus for the LM loss; documents separated by blank lines")
    heldout: str = opt("", "distillation: records whose prompts form the fixed diagnostics batch (e.g. the "
                           "validation split); default: the first distillation prompts")
    template: str = opt("auto", TEMPLATE_HELP)


def check_run(out: Path, cfg: object, existing: str) -> bool:
    """Before any work: may this run use `out` (rundir.claim, on every process)? Returns whether to clear it."""
    return rundir.claim(out, config.to_dict(cfg), existing, ignored=stages.unkeyed(cfg))


def resolve_train(out: Path, train: TrainConfig, models: list[object], clear: bool) -> tuple[TrainConfig, dict]:
    """`train` with `bf16: auto` made true or false, and the record for config.yaml (`begin_run(resolved=...)`).

    Called once the models are loaded and before anything is keyed on the precision (sample caches). A run that
    continues in `out` (not `clear`ed) keeps the choice its config.yaml recorded, whatever the rule says today
    (another machine, another torch): its checkpoints and caches were made with it. Otherwise the rule of
    `train.resolve_bf16` decides. Either way one console line says what was chosen and why."""
    if train.bf16 != "auto":
        return train, {}
    previous = {} if clear else (rundir.read_settings(out) or {}).get(RESOLVED)
    kept = previous.get("train.bf16") if isinstance(previous, dict) else None
    if isinstance(kept, dict) and isinstance(kept.get("value"), bool):
        choice, record = kept["value"], kept
        console.print(f"train.bf16=auto: {'bf16 autocast' if choice else 'fp32'}, as when this run started "
                      f"({out / 'config.yaml'}: {kept.get('why', '')})")
    else:
        choice, why = resolve_bf16(train.bf16, models)
        record = {"value": choice, "why": why}
        console.print(f"train.bf16=auto: {why}")
    return replace(train, bf16=choice), {"train.bf16": record}


def begin_run(out: Path, cfg: object, clear: bool, resolved: dict | None = None) -> None:
    """Once the inputs are read and checked: the main process clears `out` if asked and writes the config (with
    `resolved`, what its `auto` settings became: `resolve_train`), so a run that fails on bad input leaves nothing
    behind."""
    state = process_state()
    state.wait_for_everyone()
    if state.is_main_process:
        if clear:
            rundir.clear(out)
        write_run_config(out, cfg, resolved)
    state.wait_for_everyone()


def write_run_config(out: Path, cfg: object, resolved: dict | None = None) -> None:
    """The resolved config and the code version, next to the run's outputs."""
    data = config.to_dict(cfg)
    if resolved:
        data[RESOLVED] = resolved
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    data["_git_commit"] = commit or "unknown"
    atomic.write_text(Path(out) / "config.yaml", yaml.safe_dump(data, sort_keys=False))


def need(value: str, key: str) -> str:
    if not value:
        raise PrefkdError(f"set {key}=... (on the command line or in --config)")
    return value


def read_corpus(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise DataError("corpus file not found", path)
    return [d for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()]


def check_same_vocabulary(student: Renderer, teacher: Renderer, method: str) -> None:
    """White-box methods score the same token ids of the same rendered prompt with both models."""
    student_tok, teacher_tok = student.tokenizer, teacher.tokenizer
    if student_tok.get_vocab() != teacher_tok.get_vocab():
        raise PrefkdError(f"method '{method}' is white-box: it scores the same token ids with teacher and student, "
                          f"but their tokenizers differ (student '{student_tok.name_or_path}': {len(student_tok)} "
                          f"tokens; teacher '{teacher_tok.name_or_path}': {len(teacher_tok)} tokens). Use a teacher "
                          f"with the student's tokenizer; or a method that distils across tokenizers: the "
                          f"sequence-level dpkd, dpo, ipo, cpo, simpo (texts and sequence log-probs), seqkd and plad "
                          f"(teacher text only), or uld (token-level).")
    different = same_rendering(student, teacher)
    if different:
        raise PrefkdError(f"method '{method}' is white-box: teacher and student must see the same prompt, but "
                          f"{different} (student '{student_tok.name_or_path}', teacher "
                          f"'{teacher_tok.name_or_path}'). Give both the same chat template (data.template=FILE "
                          f"sets one for both), or a method that distils across tokenizers and templates (dpkd, "
                          f"dpo, ipo, cpo, simpo, seqkd, plad, uld).")


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("prefkd", "torch", "transformers", "rouge-score"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out
