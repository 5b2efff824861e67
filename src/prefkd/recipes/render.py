"""`prefkd render`: exactly what a model sees of each record (prompt, response, token counts, trained tokens)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

from transformers import GenerationConfig

from prefkd.config import opt
from prefkd.data.chat import TEMPLATE_HELP, check_assistant_turns, renderer_for
from prefkd.data.loaders import load_instructions
from prefkd.models import load_tokenizer
from prefkd.recipes.common import need


@dataclass
class RenderRun:
    model: str = opt("", "model (or tokenizer) path or hub id whose tokenizer and chat template render the records")
    data: str = opt("", "records, any format `prefkd.data.load_instructions` reads (conversations included)")
    template: str = opt("auto", TEMPLATE_HELP)
    limit: int = opt(3, "records shown; 0 = all")
    assistant_turns: str = opt("all", "which assistant turns SFT trains on: all, or last (as `prefkd sft`)")


def render_records(cfg: RenderRun) -> tuple[dict, list[dict]]:
    """(the template and its end tokens, one row per record): `prompt` (everything before the last assistant turn,
    with the generation prompt), `response` (the last turn's text without its end token), their token counts,
    the ids and which of them SFT trains on."""
    check_assistant_turns(cfg.assistant_turns)
    model = need(cfg.model, "model")
    renderer = renderer_for(load_tokenizer(model), cfg.template)
    records = load_instructions(need(cfg.data, "data"), require_references=False)
    records = records[: cfg.limit] if cfg.limit else records
    rows = []
    for rec in records:
        reply = rec.references[0] if rec.references else ""
        if cfg.assistant_turns == "all":
            prompt_ids, response_ids, mask = renderer.conversation(rec, reply)
        else:  # as SFT renders the last turn: earlier turns are not rendered on their own, nor need to be
            prompt_ids, response_ids = renderer.prompt_ids([rec])[0], renderer.response_ids(rec, reply)
            mask = [0] * len(prompt_ids)
        if not rec.references:
            response_ids = []
        rows.append({"id": rec.id, "prompt": renderer.prompt(rec),
                     "response": renderer.response(rec, reply) if rec.references else "",
                     "prompt_tokens": len(prompt_ids), "response_tokens": len(response_ids),
                     "input_ids": prompt_ids + response_ids,
                     "trained": mask + [1] * len(response_ids)})
    return renderer.describe(_generation_config(model)), rows


def _generation_config(model: str) -> SimpleNamespace | None:
    """The model's generation config (its end tokens are stops too), without loading the weights; None for a
    tokenizer alone."""
    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(model))
    except OSError:
        return None


def as_json_lines(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def rendered_text(about: dict, rows: list[dict]) -> str:
    """Each record's prompt and response verbatim (special tokens and whitespace as the model sees them), between
    rulers that name the token counts."""
    out = [f"template: {about['template']}; end of turn: {' '.join(about['end_of_turn'])}; sampling stops at: "
           f"{' '.join(about['stop_tokens'])}\n"]
    for row in rows:
        trained_in_prompt = sum(row["trained"][: row["prompt_tokens"]])
        out.append(f"\n=== {row['id']}: prompt, {row['prompt_tokens']} tokens"
                   + (f" ({trained_in_prompt} of them earlier assistant turns, trained on)" if trained_in_prompt
                      else "") + " ===\n")
        out.append(row["prompt"])
        out.append(f"\n=== response, {row['response_tokens']} tokens with the end token, trained on ===\n")
        out.append(row["response"] + "\n" if row["response_tokens"] else "(none: a prompt without a reply)\n")
    return "".join(out)
