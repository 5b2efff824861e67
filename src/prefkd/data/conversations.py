"""Conversational rows (TRL messages and prompt-completion, ShareGPT) read into turns and split at the response.

The last turn, when it is an assistant turn, is the reference response; every turn before it is the context. A
conversation that ends with a user turn is a prompt without a reference. This module knows nothing of files: its
errors carry a reason and the field (e.g. `messages[2].role`), and the loader adds the file and line.
"""

from __future__ import annotations

from typing import NamedTuple

from prefkd.data.records import ROLES

# Role values per turn style; ShareGPT writes human/gpt, and some ShareGPT exports already use user/assistant.
_ROLE_NAMES = {"role": {r: r for r in ROLES},
               "from": {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                        "assistant": "assistant"}}
_CONTENT_KEY = {"role": "content", "from": "value"}
LIST_KEYS = ("messages", "conversations")


class TurnError(Exception):
    """One bad conversation: `reason` for skip_bad's counts, `field` such as `messages[2].content`."""

    def __init__(self, reason: str, message: str, field: str):
        super().__init__(message)
        self.reason, self.message, self.field = reason, message, field


class Turn(NamedTuple):
    role: str  # system, user or assistant, whatever the file calls it
    content: str
    field: str  # where the role is written, e.g. `conversations[3].from`, for order errors


def style(turns: object) -> str:
    """The format name for detection: sharegpt when the first turn is written {from, value}, else messages."""
    first = turns[0] if isinstance(turns, list) and turns else None
    return "sharegpt" if isinstance(first, dict) and ("from" in first or "value" in first) else "messages"


def messages_turns(row: dict) -> tuple[list[Turn], str]:
    """The turns of a `messages` or `conversations` row (each turn read by its own keys) and the list's name."""
    present = [k for k in LIST_KEYS if row.get(k) is not None]
    if len(present) > 1:
        raise TurnError("ambiguous_conversation", "both 'messages' and 'conversations'; keep one list of turns",
                        "conversations")
    key = present[0] if present else "messages"
    return read_turns(row.get(key), key), key


def prompt_completion_turns(row: dict) -> tuple[list[Turn], str]:
    """TRL's conversational prompt-completion: the prompt's turns, then the completion's one assistant turn.

    A row without a completion (TRL's prompt-only form) is a prompt without a reference."""
    prompt = read_turns(row.get("prompt"), "prompt")
    if row.get("completion") is None:
        return prompt, "completion"
    completion = read_turns(row["completion"], "completion", allow_empty=True)
    if len(completion) != 1 or completion[0].role != "assistant":
        got = ", ".join(t.role for t in completion) or "nothing"
        raise TurnError("bad_completion", f"expected exactly one assistant message, got {got}; put earlier turns in "
                        "the prompt", "completion")
    return prompt + completion, "completion"


def read_turns(value: object, key: str, allow_empty: bool = False) -> list[Turn]:
    if value is None:
        raise TurnError("missing_field", f"missing required field '{key}' (a list of turns)", key)
    if not isinstance(value, list | tuple):
        hint = (" (a csv cell cannot hold a conversation; use jsonl, json or parquet)" if isinstance(value, str)
                else "")
        raise TurnError("wrong_type", f"expected a list of turns, got {type(value).__name__}{hint}", key)
    if not value and not allow_empty:
        raise TurnError("empty_conversation", "empty conversation; a record needs at least one user turn", key)
    return [_turn(item, f"{key}[{i}]") for i, item in enumerate(value)]


def _turn(item: object, field: str) -> Turn:
    if not isinstance(item, dict):
        raise TurnError("wrong_type", f"expected a turn {{'role': ..., 'content': ...}}, got {type(item).__name__}",
                        field)
    # Parquet and hub datasets store turns as structs: a key some turns lack is null in the others, so null = absent.
    turn = {k: v for k, v in item.items() if v is not None}
    role_key = "from" if "from" in turn or "value" in turn else "role"
    content_key = _CONTENT_KEY[role_key]
    unknown = sorted(set(turn) - {role_key, content_key})
    if unknown:
        raise TurnError("unknown_field", f"unknown key(s) {unknown} in a turn; a turn is {{'{role_key}': ..., "
                        f"'{content_key}': ...}}", f"{field}.{unknown[0]}")
    if role_key not in turn:
        raise TurnError("missing_field", f"missing role; give every turn a '{role_key}'", f"{field}.{role_key}")
    names = _ROLE_NAMES[role_key]
    role = turn[role_key]
    if not isinstance(role, str) or role not in names:
        raise TurnError("unknown_role", f"unknown role {role!r}; use one of {list(names)} (prefkd reads text "
                        "conversations between a user and an assistant, with an optional system prompt)",
                        f"{field}.{role_key}")
    if content_key not in turn:
        raise TurnError("missing_field", f"missing content; give every turn a '{content_key}'",
                        f"{field}.{content_key}")
    content = _content(turn[content_key], f"{field}.{content_key}", names[role])
    return Turn(names[role], content, f"{field}.{role_key}")


def _content(value: object, field: str, role: str) -> str:
    if isinstance(value, list):
        value = _text_parts(value, field)
    if not isinstance(value, str):
        raise TurnError("wrong_type", f"expected a string, got {type(value).__name__}", field)
    if not value.strip():
        fix = "remove the empty system turn" if role == "system" else "give the turn its text or remove the record"
        raise TurnError("empty_content", f"empty content; {fix}", field)
    return value


def _text_parts(parts: list, field: str) -> str:
    """OpenAI-style content parts: text parts only, concatenated as chat templates render them (nothing between)."""
    texts = []
    for i, part in enumerate(parts):
        part = {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
        if not isinstance(part, dict) or part.get("type") != "text" or set(part) != {"type", "text"} \
                or not isinstance(part["text"], str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise TurnError("multimodal_content", f"content part {i} is not text ({kind!r}); prefkd distils "
                            "text-only conversations: flatten the text parts into one string or drop the record",
                            field)
        texts.append(part["text"])
    return "".join(texts)


def split_conversation(turns: list[Turn], reply_field: str, require_references: bool
                       ) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(context, references): the last assistant turn is the reference, the turns before it the context."""
    check_order(turns, reply_field)
    if turns[-1].role == "assistant":
        return tuple((t.role, t.content) for t in turns[:-1]), (turns[-1].content,)
    if require_references:
        raise TurnError("no_response", "the conversation ends with a user turn, but this verb needs the last turn "
                        "to be an assistant reply (the reference); prompt-only conversations are for distillation "
                        "prompts", reply_field)
    return tuple((t.role, t.content) for t in turns), ()


def check_order(turns: list[Turn], field: str) -> None:
    """An optional system turn, then user and assistant turns alternating from a user turn: what chat templates
    accept (several refuse anything else), so a conversation that breaks it fails here, at its line."""
    if not any(t.role == "user" for t in turns):
        raise TurnError("no_user_turn", "no user turn; a conversation needs a user turn for the response to answer",
                        field)
    for i, turn in enumerate(turns):
        if turn.role == "system":
            if i:
                raise TurnError("turn_order", "a system turn must be the first turn; move it to the start or merge "
                                "it into the first one", turn.field)
            continue
        prev = turns[i - 1].role if i else "system"
        if prev == "system" and turn.role != "user":
            raise TurnError("turn_order", "a conversation must start with a user turn (after an optional system "
                            "turn); remove the leading assistant turn", turn.field)
        if prev == turn.role:
            raise TurnError("turn_order", f"two {turn.role} turns in a row; alternate user and assistant turns: "
                            "merge consecutive turns", turn.field)
