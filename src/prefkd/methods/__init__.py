"""The method registry. A method (methods/base.py) is its data preparation, its step and its option checks; each
family lives in one module with its config section. Adding a method is one module plus one entry below."""

from __future__ import annotations

import difflib

from prefkd.errors import ConfigError
from prefkd.methods import distillm2, dpkd, on_policy, plad, preference, sft, token_kd, uld
from prefkd.methods.base import Method, MethodOutput, StepInputs
from prefkd.methods.config import MethodConfig

FAMILIES = (sft, token_kd, on_policy, dpkd, preference, plad, distillm2, uld)
METHODS: dict[str, Method] = {m.name: m for module in FAMILIES for m in module.METHODS}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint} Known: {', '.join(METHODS)} (see `prefkd methods`)")
    return METHODS[name]


def describe() -> list[str]:
    """One line per method, for `prefkd methods`."""
    return [f"{m.name:12s} {m.description} [{m.paper}; {_kind(m)}; trains on {m.trains_on}]" for m in METHODS.values()]


def _kind(m: Method) -> str:
    if not m.needs_teacher:
        return "black-box"
    return "teacher in training, any tokenizer" if m.cross_tokenizer else "white-box"


__all__ = ["METHODS", "Method", "MethodConfig", "MethodOutput", "StepInputs", "describe", "get_method"]
