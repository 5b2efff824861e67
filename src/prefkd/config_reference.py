"""docs/configuration.md, generated from the config dataclasses: every verb's keys, defaults and help.

Regenerate after changing a config: `python -m prefkd.config_reference > docs/configuration.md`
(tests/test_docs.py fails while the page is stale)."""

from __future__ import annotations

import dataclasses
import typing

from prefkd.config import field_default
from prefkd.recipes.analyze import NoiseRun
from prefkd.recipes.compare import ExperimentConfig
from prefkd.recipes.distill import DistillRun
from prefkd.recipes.evaluate import EvaluateRun
from prefkd.recipes.generate import GenerateRun
from prefkd.recipes.prepare import PrepareRun
from prefkd.recipes.sft import SFTRun
from prefkd.recipes.teacher_logits import TeacherLogitsRun
from prefkd.recipes.winrate import WinRateRun
from prefkd.serve import ServeRun

VERBS = [("prefkd sft", SFTRun), ("prefkd distill", DistillRun), ("prefkd generate", GenerateRun),
         ("prefkd teacher-logits", TeacherLogitsRun),
         ("prefkd evaluate", EvaluateRun), ("prefkd winrate", WinRateRun),
         ("prefkd compare / prefkd demo", ExperimentConfig), ("prefkd prepare", PrepareRun),
         ("prefkd analyze noise", NoiseRun), ("prefkd serve", ServeRun)]


def _rows(cls: type, prefix: str = "", base: object = None) -> list[tuple[str, str, str]]:
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = getattr(base, f.name) if base is not None else field_default(f)
        if dataclasses.is_dataclass(hints[f.name]):
            rows += _rows(hints[f.name], f"{prefix}{f.name}.", default)
        else:
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows


def _aliases(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    out = [(f"{prefix}{old}", f"{prefix}{new}") for old, new in getattr(cls, "ALIASES", {}).items()]
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _aliases(hints[f.name], f"{prefix}{f.name}.")
    return out


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the config dataclasses by `python -m prefkd.config_reference > docs/configuration.md`; "
             "a test fails when it is stale. Every verb takes `--config FILE.yaml` and `key.sub=value` overrides "
             "(defaults < file < overrides); `prefkd VERB --help` prints the same keys.", ""]
    for verb, cls in VERBS:
        lines += [f"## {verb}", "", "| key | default | meaning |", "| --- | --- | --- |"]
        for key, default, help_ in _rows(cls):
            cell = help_.replace("|", "\\|")
            lines.append(f"| `{key}` | `{default}` | {cell} |")
        aliases = _aliases(cls)
        if aliases:
            lines += ["", "Old names that still load (with a deprecation message): "
                      + ", ".join(f"`{old}` -> `{new}`" for old, new in aliases) + "."]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
