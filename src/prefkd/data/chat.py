"""What a model sees: a record rendered with the Alpaca template or with the model's chat template, as token ids.

`data.template` chooses: `auto` (the tokenizer's chat template when it has one, else Alpaca), `alpaca`, `chat` (the
tokenizer's, an error when it has none) or the path of a Jinja file (a template for a base model that has none; it
is set on the tokenizer, so a model saved from the run carries it).

With a chat template:
- the prompt is `apply_chat_template(context, add_generation_prompt=True)`, tokenised without the tokenizer's own
  special tokens (the template writes its BOS itself; one is added only when the tokenizer adds one and the
  rendered text lacks it);
- the response is the assistant content as the template renders it, followed by the template's end-of-turn token
  (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, ...): what the model learns to emit and what sampling stops at;
- for multi-turn SFT, `conversation` marks every assistant turn for the loss (as TRL's `assistant_only_loss`).

Prompt and response are tokenised separately, as in training; `prefkd render` prints what this module produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jinja2 import TemplateError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd.data.records import Instruction
from prefkd.data.templates import render_prompt
from prefkd.errors import ConfigError, DataError, PrefkdError

TEMPLATES = ("auto", "alpaca", "chat")
TEMPLATE_HELP = ("how records become prompts: auto (the model's chat template when its tokenizer has one, else "
                 "Alpaca), alpaca, chat (the tokenizer's; an error when it has none) or the path of a Jinja chat "
                 "template file")
_SENTINEL = "PREFKD-SENTINEL-RESPONSE"


class Renderer:
    """Prompt and response ids of records for one tokenizer and one template choice."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, template: str = "auto"):
        self.tokenizer = tokenizer
        self.kind, self.name = _choose(tokenizer, template)
        self.bos = _added_bos(tokenizer)
        if self.kind == "chat":
            self.lead, self.end_text = _turn_layout(tokenizer)
            self.end_ids = _end_ids(tokenizer, self.end_text)
        else:
            self.lead, self.end_text, self.end_ids = "", tokenizer.eos_token, [tokenizer.eos_token_id]
        self.stop_ids = tuple(dict.fromkeys([*self.end_ids[-1:], tokenizer.eos_token_id]))

    # --- text ---------------------------------------------------------------------------------------------------

    def prompt(self, rec: Instruction) -> str:
        """Everything before the response: the Alpaca prompt, or the chat context with the generation prompt."""
        if self.kind == "alpaca":
            return render_prompt(*_alpaca_fields(rec))
        return self._apply(rec.messages(), rec, generation_prompt=True) + self.lead

    def response(self, rec: Instruction, text: str) -> str:
        """`text` as the template renders an assistant turn's content (some templates trim it), without the
        end-of-turn token."""
        if self.kind == "alpaca":
            return text
        full = self._apply([*rec.messages(), {"role": "assistant", "content": text}], rec)
        prompt = self.prompt(rec)
        end = full.rfind(self.end_text)
        if not full.startswith(prompt) or end < len(prompt):
            raise DataError(f"the chat template ({self.name}) does not render this conversation as its prompt "
                            "followed by the reply; check it with `prefkd render`", rec.id or "record")
        return full[len(prompt):end]

    # --- ids ----------------------------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain text to ids, without the tokenizer's own special tokens."""
        return [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts] if texts else []

    def prompt_ids(self, records: Sequence[Instruction]) -> list[list[int]]:
        return [self.with_bos(ids) for ids in self.encode([self.prompt(r) for r in records])]

    def response_ids(self, rec: Instruction, text: str) -> list[int]:
        """The response's tokens (as plain text) and the end-of-turn token: what training scores."""
        return text_ids(self.tokenizer, self.response(rec, text)) + self.end_ids

    def sample_ids(self, text: str, finished: bool) -> list[int]:
        """A sampled response's decoded text in this tokenizer's tokens, with the end token when it had ended."""
        return text_ids(self.tokenizer, text) + (self.end_ids if finished else [])

    def conversation(self, rec: Instruction, reply: str) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, response ids, loss mask over the prompt ids): every earlier assistant turn's tokens, end
        token included, are marked 1 (multi-turn SFT); the last reply is the response as in `response_ids`."""
        prompt_ids = self.prompt_ids([rec])[0]
        mask = [0] * len(prompt_ids)
        turns = rec.messages()
        if self.kind == "chat" and any(m["role"] == "assistant" for m in turns):
            text = self.prompt(rec)
            offsets = self._offsets(text, len(prompt_ids))
            for start, end in self._assistant_spans(rec, turns, text):
                for i, (a, b) in enumerate(offsets):
                    if start <= a and b <= end and b > a:
                        mask[i] = 1
        return prompt_ids, self.response_ids(rec, reply), mask

    def stop_ids_for(self, model: PreTrainedModel | None) -> tuple[int, ...]:
        """Every token that ends a response: the end-of-turn token, the tokenizer's EOS and the model's
        `generation_config.eos_token_id` (an int or a list)."""
        extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
        return tuple(dict.fromkeys([*self.stop_ids, *extra]))

    def describe(self, model: PreTrainedModel | None = None) -> dict:
        return {"template": self.name, "end_of_turn": self.tokenizer.convert_ids_to_tokens(self.end_ids),
                "stop_tokens": self.tokenizer.convert_ids_to_tokens(list(self.stop_ids_for(model)))}

    # --- helpers ------------------------------------------------------------------------------------------------

    def _apply(self, messages: list[dict], rec: Instruction, generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=generation_prompt)
        except TemplateError as e:  # a template's raise_exception: roles it does not take, and the like
            raise DataError(f"the chat template ({self.name}) refuses this conversation: {e}", rec.id or "record",
                            field="messages") from None

    def with_bos(self, ids: list[int]) -> list[int]:
        """Prompt ids with the BOS the tokenizer adds to plain text, when it adds one and they lack it."""
        return [self.bos, *ids] if self.bos is not None and ids[:1] != [self.bos] else ids

    def _offsets(self, text: str, n: int) -> list[tuple[int, int]]:
        if not self.tokenizer.is_fast:
            raise PrefkdError("multi-turn SFT needs a fast tokenizer (character offsets of tokens); use one, or "
                              "train on the last turn only")
        offsets = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return [(-1, -1)] * (n - len(offsets)) + [tuple(o) for o in offsets]  # an added BOS has no characters

    def _assistant_spans(self, rec: Instruction, turns: list[dict], text: str) -> list[tuple[int, int]]:
        """Character spans, in the prompt text, of each earlier assistant turn's content and end token."""
        spans = []
        for i, m in enumerate(turns):
            if m["role"] != "assistant":
                continue
            before = self._apply(turns[:i], rec, generation_prompt=True) + self.lead
            through = self._apply(turns[: i + 1], rec)
            end = through.rfind(self.end_text)
            if not (through.startswith(before) and text.startswith(through[: end + len(self.end_text)])
                    and end >= len(before)):
                raise DataError(f"the chat template ({self.name}) renders earlier turns differently once the "
                                "conversation goes on (e.g. it drops their reasoning), so their tokens cannot be "
                                "trained on in one sequence; train on the last turn only (`prefkd sft "
                                "assistant_turns=last`)",
                                rec.id or "record", field="messages")
            spans.append((len(before), end + len(self._end_token_text)))
        return spans

    @property
    def _end_token_text(self) -> str:
        return self.tokenizer.decode(self.end_ids)


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A response text's ids as plain text: no special tokens added, and a special token's string inside the text
    (another model's `<|im_end|>`, say) read as the characters it is, not as that token."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def check_assistant_turns(value: str) -> None:
    if value not in ("all", "last"):
        raise ConfigError(f"assistant_turns='{value}': use all (every assistant turn of a conversation is trained "
                          "on) or last")


def renderer_for(tokenizer: PreTrainedTokenizerBase, template: str = "auto") -> Renderer:
    """A renderer; a Jinja file as `template` is set on the tokenizer first (a saved model then carries it)."""
    if template not in TEMPLATES:
        path = Path(template).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.template '{template}' is neither one of {list(TEMPLATES)} nor a Jinja file")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
        renderer = Renderer(tokenizer, "chat")
        renderer.name = f"the Jinja file {path}"
        return renderer
    return Renderer(tokenizer, template)


def same_tokens(student: Renderer, teacher: Renderer) -> bool:
    """Whether teacher and student read every record as the same token ids (same vocabulary, same rendering)."""
    return student.tokenizer.get_vocab() == teacher.tokenizer.get_vocab() and same_rendering(student, teacher) is None


def same_rendering(student: Renderer, teacher: Renderer) -> str | None:
    """Why two renderers would give teacher and student different prompts for the same record, or None."""
    if student.kind != teacher.kind:
        return f"the student renders prompts with {student.name} but the teacher with {teacher.name}"
    if student.kind == "chat" and student.tokenizer.chat_template != teacher.tokenizer.chat_template:
        return f"the student's chat template ({student.name}) differs from the teacher's ({teacher.name})"
    return None


def _choose(tokenizer: PreTrainedTokenizerBase, template: str) -> tuple[str, str]:
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    where = tokenizer.name_or_path or "the tokenizer"
    if template == "alpaca" or (template == "auto" and not has_chat):
        return "alpaca", "the Alpaca template"
    if template not in ("auto", "chat"):
        raise ConfigError(f"data.template '{template}' is neither one of {list(TEMPLATES)} nor a Jinja file")
    if not has_chat:
        raise ConfigError(f"data.template=chat but {where} has no chat template; use data.template=alpaca, or pass "
                          "a Jinja file as data.template")
    return "chat", f"the chat template of {where}"


def _alpaca_fields(rec: Instruction) -> tuple[str, str]:
    if not rec.context:
        return rec.instruction, rec.input
    if len(rec.context) == 1 and rec.context[0][0] == "user":
        return rec.context[0][1], ""
    raise DataError("the Alpaca template renders one instruction, not a conversation with a system prompt or "
                    "several turns; use a model with a chat template (data.template=chat) or a Jinja file as "
                    "data.template", rec.id or "record", field="messages")


def _turn_layout(tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """(text between the generation prompt and the reply, text after the reply) of an assistant turn."""
    user = [{"role": "user", "content": "Hi"}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": _SENTINEL}], tokenize=False)
    except TemplateError as e:
        raise ConfigError(f"the chat template of {tokenizer.name_or_path} fails on a one-turn conversation: {e}") \
            from None
    at = full.find(_SENTINEL)
    if not full.startswith(prompt) or at < len(prompt):
        raise ConfigError(f"the chat template of {tokenizer.name_or_path} does not render a conversation as its "
                          "generation prompt followed by the reply; prefkd cannot tell prompt from response")
    return full[len(prompt):at], full[at + len(_SENTINEL):]


def _end_ids(tokenizer: PreTrainedTokenizerBase, end_text: str) -> list[int]:
    """The template's end-of-turn token: the first special token after the reply, else the EOS."""
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for i in tokenizer(end_text, add_special_tokens=False)["input_ids"]:
        if i in special:
            return [i]
    return [tokenizer.eos_token_id]


def _added_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS the tokenizer adds to plain text (Llama-style), which prompts keep; None when it adds none."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos] else None
