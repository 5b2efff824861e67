"""The method registry. A method (methods/base.py) is its data preparation, its step and its option checks; each
family lives in one module with its config section. Adding a method is one module plus one entry below."""

from __future__ import annotations

import difflib

from prefkd.errors import ConfigError
from prefkd.methods import distillm2, dpkd, on_policy, plad, preference, sft, token_kd
from prefkd.methods.base import Method, MethodOutput, StepInputs
from prefkd.methods.config import MethodConfig

METHODS: dict[str, Method] = {m.name: m for module in (sft, token_kd, on_policy, dpkd, preference, plad, distillm2)
                              for m in module.METHODS}


def get_method(name: str) -> Method:
    if name not in METHODS:
        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown method '{name}'{hint} Known: {', '.join(METHODS)} (see `prefkd methods`)")
    return METHODS[name]


def describe() -> list[str]:
    """One line per method, for `prefkd methods`."""
    return [f"{m.name:12s} {m.description} [{m.paper}; {'white-box' if m.needs_teacher else 'black-box'}; "
            f"trains on {m.trains_on}]" for m in METHODS.values()]


__all__ = ["METHODS", "Method", "MethodConfig", "MethodOutput", "StepInputs", "describe", "get_method"]
