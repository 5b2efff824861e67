"""A teacher whose tokenizer differs from the student's: each model reads the same texts in its own tokens.

Sequence-level methods need only the log-probability of a response *text* under each model, and the probability of
a string is defined whatever the tokenizer. So across tokenizers:
- the teacher renders each prompt with its own tokenizer and template, and samples and scores in its own tokens;
- a sample crosses to the other model as text: decoded without the producing model's special tokens (its end token,
  template markup), encoded as plain text by the other tokenizer (`logprobs.text_ids`: a special token's string
  inside the text stays characters), followed by the other model's own end token when the sample had ended;
- each model scores the text with its canonical tokenization, a tight lower bound on the text's probability
  (docs/methods.md, "Across tokenizers").
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from prefkd.data.chat import Renderer
from prefkd.data.records import Instruction
from prefkd.errors import PrefkdError
from prefkd.logprobs import text_ids


@dataclass
class TeacherTokens:
    """The run's prompts in the teacher's tokens, and the crossing of responses between the two tokenizers."""

    teacher: Renderer
    student: Renderer
    teacher_stops: tuple[int, ...]  # the tokens that end a teacher sample (its model's end tokens)
    prompts: list[list[int]]  # the teacher's prompt ids, by `Example.index`
    context: int | None = None  # the teacher's positions

    @classmethod
    def build(cls, teacher: Renderer, student: Renderer, model: PreTrainedModel | None,
              records: list[Instruction]) -> TeacherTokens:
        config = getattr(model, "config", None)
        context = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        return cls(teacher, student, teacher.stop_ids_for(model), teacher.prompt_ids(records), context)

    def fit(self, prompts: list[list[int]], branches: list[list[list[int]]]) -> list[list[int]]:
        """Prompts cut from the left so that each fits the teacher's context with its longest response (the
        student's limits count student tokens; a text can be longer in the teacher's), as sampling cuts them."""
        if not self.context:
            return prompts
        longest = [max(len(b[i]) for b in branches) for i in range(len(prompts))]
        if max(longest) >= self.context:
            raise PrefkdError(f"a response is {max(longest)} tokens in the teacher's tokenizer, more than its "
                              f"{self.context} positions hold with a prompt; lower sampling.max_new_tokens")
        return [p[-max(1, self.context - n):] if len(p) + n > self.context else p
                for p, n in zip(prompts, longest, strict=True)]

    def text(self, ids: list[int], renderer: Renderer) -> str:
        """A response's text as the model that produced it wrote it, without its special tokens."""
        return renderer.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def to_student(self, teacher_ids: list[int]) -> list[int]:
        """A teacher sample in the student's tokens (the student's end token when the teacher's sample ended)."""
        ended = bool(teacher_ids) and teacher_ids[-1] in self.teacher_stops
        return _cross(self.text(teacher_ids, self.teacher), self.student, ended)

    def to_teacher(self, student_ids: list[int], student_stops: tuple[int, ...]) -> list[int]:
        """A student sample in the teacher's tokens (the teacher's end token when the student's sample ended)."""
        ended = bool(student_ids) and student_ids[-1] in student_stops
        return _cross(self.text(student_ids, self.student), self.teacher, ended)



def byte_length(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> int:
    """UTF-8 length of a response's text without special tokens: the same for every tokenizer."""
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))


def _cross(text: str, to: Renderer, ended: bool) -> list[int]:
    return text_ids(to.tokenizer, text) + (to.end_ids if ended else [])
