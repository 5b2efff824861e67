"""prefkd.methods.uld: the ULD step on a teacher of another tokenizer equals the official loss computed by hand from
plain forwards of each model on its own tokens of the same texts."""

import copy
import dataclasses
import json

import pytest
import torch
from support import chat_tokenizer
from typer.testing import CliRunner

from prefkd import losses
from prefkd.cli import app
from prefkd.data.byte_spans import response_byte_spans
from prefkd.data.chat import Renderer
from prefkd.data.records import Instruction
from prefkd.methods import METHODS, uld
from prefkd.models import add_chat_format, build_model, load_model, load_tokenizer, save_pretrained

runner = CliRunner()
TEXTS = ["The cat sat.", " caf\u00e9 \u00fcber", "two\nlines", "four"]


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("uld")
    student_tok = add_chat_format(copy.deepcopy(tokenizer))
    teacher_tok = chat_tokenizer("llama", ["the cat sat on the mat", "caf\u00e9 \u00fcber alles", "two lines"] * 40,
                                 vocab_size=450)
    save_pretrained(build_model("gpt2", "nano", student_tok, seed=2), student_tok, root / "student")
    save_pretrained(build_model("llama", "micro", teacher_tok, seed=1), teacher_tok, root / "teacher")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Item {i}?", "references": [t]}) + "\n"
                               for i, t in enumerate(TEXTS)))
    return root, prompts


def _by_hand(root, alignment):
    """The official ULD total from plain forwards: CE on the text in the student's tokens + 1.5 x the distance."""
    s_tok, t_tok = load_tokenizer(str(root / "student")), load_tokenizer(str(root / "teacher"))
    student, teacher = load_model(str(root / "student")).eval(), load_model(str(root / "teacher")).eval()
    s_r, t_r = Renderer(s_tok), Renderer(t_tok)
    ce_num, ce_den, s_rows, t_rows, s_ids, t_ids, s_spans, t_spans = 0.0, 0, [], [], [], [], [], []
    for i, text in enumerate(TEXTS):
        rec = Instruction(f"Item {i}?", references=(text,))
        for tok, r, model, rows, ids_out, spans_out in ((s_tok, s_r, student, s_rows, s_ids, s_spans),
                                                        (t_tok, t_r, teacher, t_rows, t_ids, t_spans)):
            prompt = r.prompt_ids([rec])[0]
            ids, spans = response_byte_spans(tok, text)
            response = ids + r.end_ids
            end = len(text.encode("utf-8"))
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + response])).logits[0]
            rows.append(logits[len(prompt) - 1: len(prompt) - 1 + len(response)])
            ids_out.append(response)
            spans_out.append(spans + [(end, end)])
            if model is student:
                logp = torch.log_softmax(rows[-1].double(), -1)
                ce_num -= sum(logp[j, t].item() for j, t in enumerate(response))
                ce_den += len(response)
    ce = ce_num / ce_den
    if alignment == "positional":
        dist = torch.stack([losses.uld_distance(s[: min(len(s) - 1, len(t))], t[: min(len(s) - 1, len(t))]).mean()
                            for s, t in zip(s_rows, t_rows, strict=True)]).mean()
    else:
        dist = losses.uld_byte_aligned_loss(s_rows, s_ids, s_spans, t_rows, t_ids, t_spans)
    return ce + 1.5 * dist.item(), ce, dist.item()


@pytest.mark.parametrize("alignment", ["positional", "bytes"])
def test_the_uld_step_is_the_official_loss_across_tokenizers(models, alignment, monkeypatch, tmp_path):
    root, prompts = models
    seen = []
    real = uld.step

    def spy(inp):
        out = real(inp)
        seen.append(out)
        return out

    monkeypatch.setitem(METHODS, "uld", dataclasses.replace(METHODS["uld"], step=spy))
    res = runner.invoke(app, ["distill", "--method", "uld", f"out={tmp_path / 'run'}",
                              f"student.path={root / 'student'}", f"teacher.path={root / 'teacher'}",
                              f"data.prompts={prompts}", "train.steps=1", f"train.batch_size={len(TEXTS)}",
                              "distill.replay=0", "distill.lm_weight=0", f"distill.uld.alignment={alignment}",
                              "train.lr=0"])
    assert res.exit_code == 0, res.output
    (out,) = seen
    total, ce, dist = _by_hand(root, alignment)
    assert out.metrics["nll"] == pytest.approx(ce, abs=1e-4)
    assert out.metrics["uld_distance"] == pytest.approx(dist, abs=1e-4)
    assert out.loss.item() == pytest.approx(total, abs=1e-4)


def test_uld_alignment_is_checked_when_the_config_is_built():
    from prefkd.errors import ConfigError

    with pytest.raises(ConfigError, match="distill.uld.alignment"):
        uld.ULDConfig(alignment="nearest")
