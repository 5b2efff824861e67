"""prefkd.data.loaders: every format on small files written here; the real Dolly files whole in one test."""

import json
from pathlib import Path

import datasets
import pytest
from support import DOLLY_ROWS, REAL_DOLLY, minillm_row, write_dolly_files, write_jsonl

from prefkd.data.loaders import load_instructions, load_instructions_with_report
from prefkd.errors import ConfigError, DataError


def _raw(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_minillm(path: Path, n: int) -> list:
    """Every MiniLLM record loads with the file's prompt byte for byte (the template renders it exactly), its
    fields mapped, and FILE:LINE ids."""
    records = load_instructions(str(path), format="minillm")
    raw = _raw(path)
    assert len(records) == len(raw) == n
    for rec, row in zip(records, raw, strict=True):
        assert rec.prompt.encode("utf-8") == row["prompt"].encode("utf-8")
        assert rec.instruction == row["instruction"] and rec.input == row["input"] and rec.category == row.get("topic")
        out = row["output"]
        assert rec.references == ((out,) if isinstance(out, str) else tuple(out))
    assert [r.id for r in records] == [f"{path.name}:{i}" for i in range(1, n + 1)]
    return records


def test_minillm_format_loads_with_byte_identical_prompts(tmp_path):
    # With and without an input (two templates), and `output` as a list of references.
    # MiniLLM's dev file has no `topic`: a row without one loads with no category.
    rows = [minillm_row(r) for r in DOLLY_ROWS[:4]] + [minillm_row(DOLLY_ROWS[4], topic=False),
                                                       minillm_row(DOLLY_ROWS[5], output=["A pot.", "A kettle."])]
    _check_minillm(write_jsonl(tmp_path / "m.jsonl", rows), 6)


def test_dolly_format_loads_with_categories(tmp_path):
    path = write_dolly_files(tmp_path)["dolly"]
    records = load_instructions(str(path), format="dolly")
    assert len(records) == len(DOLLY_ROWS) + 1
    assert {r.category for r in records} == {"open_qa", "general_qa", "classification", "closed_qa", "brainstorming",
                                             "information_extraction", "summarization", "creative_writing"}
    for rec, row in zip(records, _raw(path), strict=True):
        assert (rec.instruction, rec.input, rec.references, rec.category) == (
            row["instruction"], row["context"], (row["response"],), row["category"])
    assert len({r.id for r in records}) == len(records)


def test_auto_detection_matches_explicit_format(tmp_path):
    files = write_dolly_files(tmp_path)
    for path, expected in ((files["test"], "minillm"), (files["validation"], "minillm"), (files["dolly"], "dolly")):
        assert load_instructions(str(path)) == load_instructions(str(path), format=expected)


@pytest.mark.real_data
def test_minillm_and_dolly_files_load_on_real_dolly():
    """The real files, whole: MiniLLM's 500 test and 1,000 validation records with their prompts byte for byte
    (the template must match the released files, not only the fixture), and all 15,015 Dolly records."""
    test = _check_minillm(REAL_DOLLY / "test-minillm-500.jsonl", 500)
    assert {r.category for r in test} >= {"closed_qa", "open_qa", "brainstorming"}
    _check_minillm(REAL_DOLLY / "dev-minillm-1000.jsonl", 1000)
    dolly = load_instructions(str(REAL_DOLLY / "databricks-dolly-15k.jsonl"))  # auto-detected
    assert len(dolly) == len({r.id for r in dolly}) == 15015
    assert len({r.category for r in dolly}) == 8


def test_auto_detects_prefkd_format(tmp_path):
    f = tmp_path / "ours.jsonl"
    rows = [{"instruction": "Say hi.", "references": ["hi", "hello"], "kind": "skill", "id": "r1"},
            {"instruction": "Say bye.", "references": ["bye"]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_instructions(str(f))
    assert records == load_instructions(str(f), format="prefkd")
    assert records[0].references == ("hi", "hello") and records[0].kind == "skill" and records[0].id == "r1"
    assert records[1].id == "ours.jsonl:2"
    # records.py's parser stays strict (unknown fields, empty references) and its errors are counted by reason.
    with f.open("a") as out:
        out.write('{"instruction": "x", "references": ["y"], "extra": 1}\n{"instruction": "x", "references": []}\n')
    with pytest.raises(DataError, match=r"ours.jsonl:3 field 'extra': unknown field"):
        load_instructions(str(f))
    records, report = load_instructions_with_report(str(f), skip_bad=True)
    assert len(records) == 2 and report == {"loaded": 2, "skipped": 2, "unknown_field": 1, "empty_response": 1}


def test_field_map_on_custom_schema(tmp_path):
    f = tmp_path / "qa.jsonl"
    rows = [{"question": "Who wrote Hamlet?", "passage": "A play.", "answers": ["Shakespeare", "W. Shakespeare"],
             "uid": 7},
            {"question": "Capital of France?", "passage": None, "answers": "Paris", "uid": "x"}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_instructions(str(f), instruction="question", input="passage", references="answers", id="uid")
    assert [r.instruction for r in records] == ["Who wrote Hamlet?", "Capital of France?"]
    assert records[0].input == "A play." and records[1].input == ""
    assert records[0].references == ("Shakespeare", "W. Shakespeare") and records[1].references == ("Paris",)
    assert [r.id for r in records] == ["7", "x"]
    assert "### Input:\nA play." in records[0].prompt


def test_json_list_keeps_line_numbers(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"instruction": "a", "context": "", "response": "b", "category": "open_qa"},\n\n'
                 '  {"instruction": "c",\n   "response": "d"}\n]\n')
    records = load_instructions(str(f))
    assert [r.id for r in records] == ["d.json:2", "d.json:4"]
    assert records[1].category is None


ROWS = [{"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"},
        {"instruction": "Summarise.", "context": "Long text, with a comma.", "response": "Short.",
         "category": "summarization"}]


def test_csv_and_parquet_load(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    from_csv = load_instructions(str(tmp_path / "d.csv"))
    from_parquet = load_instructions(str(tmp_path / "d.parquet"), format="dolly")
    for records, name, first in ((from_csv, "d.csv", 2), (from_parquet, "d.parquet", 1)):
        assert [r.instruction for r in records] == ["Name a colour.", "Summarise."]
        assert records[1].input == "Long text, with a comma." and records[1].references == ("Short.",)
        assert records[0].input == "" and [r.category for r in records] == ["open_qa", "summarization"]
        assert records[0].id == f"{name}:{first}"


GOOD = '{"instruction": "Name a colour.", "response": "Blue."}'
BAD_CASES = [
    # (file content, line, field or None, words the message must contain)
    (GOOD + "\n{not json\n", 2, None, "malformed JSON"),
    (GOOD + '\n{"response": "x"}\n', 2, "instruction", "missing"),
    (GOOD + '\n{"instruction": "a"}\n', 2, "response", "missing"),
    (GOOD + '\n{"instruction": 3, "response": "x"}\n', 2, "instruction", "expected a string"),
    (GOOD + '\n\n{"instruction": "a", "response": ["x", 1]}\n', 3, "response", "list of strings"),
    (GOOD + '\n{"instruction": "  ", "response": "x"}\n', 2, "instruction", "empty instruction"),
    (GOOD + '\n{"instruction": "a", "response": " "}\n', 2, "response", "empty response"),
    (GOOD + "\n[1, 2]\n", 2, None, "expected an object"),
]


@pytest.mark.parametrize("content,line,field,words", BAD_CASES)
def test_bad_records_name_file_line_and_field(tmp_path, content, line, field, words):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as info:
        load_instructions(str(f), format="dolly")
    msg = str(info.value)
    assert msg.startswith(f"{f}:{line}") and words in msg and "skip_bad=True" in msg
    assert info.value.line == line and info.value.field == field and info.value.path == str(f)
    if field:
        assert f"field '{field}'" in msg


def test_invalid_utf8_names_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(GOOD.encode() + b"\n" + b'{"instruction": "caf\xe9", "response": "x"}\n')
    with pytest.raises(DataError, match=rf"{f}:2: invalid UTF-8 .* re-encode the file as UTF-8"):
        load_instructions(str(f))


def test_minillm_prompt_mismatch_names_prompt_field(tmp_path):
    row = minillm_row(DOLLY_ROWS[0])
    rows = [row, {**row, "prompt": row["prompt"].replace("### Response:", "### Answer:")}]
    f = tmp_path / "m.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        load_instructions(str(f))
    assert info.value.line == 2 and info.value.field == "prompt" and str(info.value).startswith(f"{f}:2 field 'prompt'")
    records, report = load_instructions_with_report(str(f), skip_bad=True)
    assert len(records) == 1 and report == {"loaded": 1, "skipped": 1, "prompt_mismatch": 1}


@pytest.mark.parametrize("content", ["", "\n\n", "[]"])
def test_empty_file_is_an_error(tmp_path, content):
    f = tmp_path / "empty.json"
    f.write_text(content)
    with pytest.raises(DataError, match="no records; the file is empty"):
        load_instructions(str(f))


def test_skip_bad_counts_by_reason(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes("\n".join([GOOD, "{oops", '{"instruction": "a"}', '{"instruction": "", "response": "x"}',
                             '{"instruction": "b", "response": ""}', GOOD]).encode() + b"\n\xff\n")
    records, report = load_instructions_with_report(str(f), format="dolly", skip_bad=True)
    assert [r.id for r in records] == ["mixed.jsonl:1", "mixed.jsonl:6"]
    assert report == {"loaded": 2, "skipped": 5, "malformed_json": 1, "missing_field": 1, "empty_instruction": 1,
                      "empty_response": 1, "invalid_utf8": 1}
    assert load_instructions(str(f), format="dolly", skip_bad=True) == records


def test_skip_bad_with_nothing_good_still_raises(tmp_path):
    f = tmp_path / "allbad.jsonl"
    f.write_text('{"instruction": "a", "response": ""}\n')
    with pytest.raises(DataError, match="every record was bad"):
        load_instructions(str(f), format="dolly", skip_bad=True)


def test_missing_local_file_does_not_try_the_hub(tmp_path):
    for source in (str(tmp_path / "nope.jsonl"), "data/train.parquet", "x.csv"):
        with pytest.raises(DataError, match="file not found"):
            load_instructions(source)


def test_unrecognised_schema_and_bad_arguments(tmp_path):
    f = tmp_path / "other.jsonl"
    f.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"cannot tell the format .*'answer', 'question'"):
        load_instructions(str(f))
    with pytest.raises(ConfigError, match="unknown format"):
        load_instructions(str(f), format="alpaca")
    with pytest.raises(ConfigError, match="unknown field_map"):
        load_instructions(str(f), question="instruction")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_instructions(str(txt))


# --- conversational formats -------------------------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Red."}]


def test_messages_last_assistant_turn_is_the_reference(tmp_path):
    rows = [{"messages": CHAT, "id": "c1", "category": "chat", "source": "ultrachat", "score": 3.5},
            # UltraChat's layout: a string `prompt` beside `messages` must not make it a prompt-completion row.
            {"prompt": "Name a colour.", "prompt_id": "ab12", "messages": CHAT[1:3], "category": ["not", "a", "str"]},
            {"messages": CHAT[1:3]}]
    f = write_jsonl(tmp_path / "chat.jsonl", rows)
    records = load_instructions(f)
    assert records == load_instructions(f, format="messages")
    first = records[0]
    assert first.context == (("system", "Be brief."), ("user", "Name a colour."), ("assistant", "Blue."),
                             ("user", "Another?"))
    assert (first.references, first.instruction, first.input, first.category, first.kind) == (
        ("Red.",), "Another?", "", "chat", None)
    assert records[1].context == (("user", "Name a colour."),) and records[1].references == ("Blue.",)
    assert records[1].category is None  # a non-string category is ignored, like the unknown top-level keys
    assert [r.id for r in records] == ["c1", "ab12", "chat.jsonl:3"]
    assert first.messages() == CHAT[:4]


def test_conversation_ending_with_user_is_a_prompt_without_reference(tmp_path):
    f = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": CHAT[:4]}, {"messages": CHAT}])
    records = load_instructions(f, require_references=False)
    assert records[0].context == tuple((t["role"], t["content"]) for t in CHAT[:4])
    assert records[0].references == () and records[0].instruction == "Another?"
    assert records[1].references == ("Red.",)  # a reply is kept even where none is required


def test_conversation_ending_with_user_is_refused_where_references_are_required(tmp_path):
    f = write_jsonl(tmp_path / "sft.jsonl", [{"messages": CHAT}, {"messages": CHAT[:4]}])
    with pytest.raises(DataError) as info:
        load_instructions(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}:2 field 'messages': the conversation ends with a user turn")
    assert "needs the last turn to be an assistant reply" in msg and "prompt-only conversations are for " \
        "distillation prompts" in msg


def test_trl_prompt_completion(tmp_path):
    rows = [{"prompt": CHAT[:4], "completion": [CHAT[4]], "id": 5},
            {"prompt": CHAT[1:2]}]  # TRL's prompt-only form
    f = write_jsonl(tmp_path / "pc.jsonl", rows)
    records = load_instructions(f, require_references=False)
    assert records == load_instructions(f, format="prompt-completion", require_references=False)
    assert records[0].context == tuple((t["role"], t["content"]) for t in CHAT[:4])
    assert records[0].references == ("Red.",) and records[0].instruction == "Another?" and records[0].id == "5"
    assert records[1].context == (("user", "Name a colour."),) and records[1].references == ()
    with pytest.raises(DataError, match=rf"^{f}:2 field 'completion': the conversation ends with a user turn"):
        load_instructions(f)


@pytest.mark.parametrize("completion,got", [([CHAT[2], CHAT[4]], "assistant, assistant"), ([CHAT[1]], "user"),
                                            ([], "nothing")])
def test_completion_must_be_one_assistant_message(tmp_path, completion, got):
    f = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": CHAT[1:2], "completion": completion}])
    with pytest.raises(DataError) as info:
        load_instructions(f)
    assert str(info.value).startswith(f"{f}:1 field 'completion': expected exactly one assistant message, got {got}")


def test_minillm_string_prompt_is_not_a_conversation(tmp_path):
    f = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "Say hi.", "answer": "hi"}])
    with pytest.raises(DataError, match="cannot tell the format"):
        load_instructions(f)


def test_sharegpt(tmp_path):
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi."},
             {"from": "gpt", "value": "Hello."}, {"from": "user", "value": "Bye."},
             {"from": "assistant", "value": "Bye!"}]
    f = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": turns, "id": "sg-1"}])
    records = load_instructions(f)
    assert records == load_instructions(f, format="sharegpt")
    assert records[0].context == (("system", "Be brief."), ("user", "Hi."), ("assistant", "Hello."), ("user", "Bye."))
    assert records[0].references == ("Bye!",) and records[0].id == "sg-1"


def test_conversations_key_with_role_and_content(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"conversations": CHAT[1:3]}])
    assert load_instructions(f) == load_instructions(f, format="messages") == load_instructions(f, format="sharegpt")
    assert load_instructions(f)[0].context == (("user", "Name a colour."),)


def test_text_content_parts_are_concatenated(tmp_path):
    parts = [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]
    f = write_jsonl(tmp_path / "parts.jsonl", [{"messages": [{"role": "user", "content": parts}, CHAT[2]]}])
    assert load_instructions(f)[0].context == (("user", "Name a colour."),)


U, A = {"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}
BAD_CONVERSATIONS = [
    # (row, field, skip reason, words the message must contain)
    ({"messages": [U, {"role": "tool", "content": "x"}]}, "messages[1].role", "unknown_role",
     "unknown role 'tool'; use one of ['system', 'user', 'assistant']"),
    ({"conversations": [{"from": "human", "value": "Hi."}, {"from": "bot", "value": "x"}]}, "conversations[1].from",
     "unknown_role", "unknown role 'bot'; use one of ['human', 'gpt', 'system', 'user', 'assistant']"),
    ({"messages": [{"content": "Hi."}, A]}, "messages[0].role", "missing_field", "missing role"),
    ({"messages": [U, {"role": "assistant"}]}, "messages[1].content", "missing_field", "missing content"),
    ({"messages": [U, {"role": "assistant", "content": " \n"}]}, "messages[1].content", "empty_content",
     "empty content"),
    ({"messages": [{"role": "system", "content": ""}, U, A]}, "messages[0].content", "empty_content",
     "empty content; remove the empty system turn"),
    ({"messages": [U, {"role": "assistant", "content": 3}]}, "messages[1].content", "wrong_type",
     "expected a string, got int"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                 {"type": "image_url", "image_url": {"url": "x.png"}}]}, A]},
     "messages[0].content", "multimodal_content",
     "content part 1 is not text ('image_url'); prefkd distils text-only conversations: flatten the text parts"),
    ({"messages": [U, A, A]}, "messages[2].role", "turn_order",
     "two assistant turns in a row; alternate user and assistant turns: merge consecutive turns"),
    ({"messages": [U, U, A]}, "messages[1].role", "turn_order", "two user turns in a row"),
    ({"messages": [U, A, {"role": "system", "content": "Be brief."}, U, A]}, "messages[2].role", "turn_order",
     "a system turn must be the first turn"),
    ({"messages": [A, U, A]}, "messages[0].role", "turn_order", "must start with a user turn"),
    ({"messages": [{"role": "system", "content": "Be brief."}, A]}, "messages", "no_user_turn", "no user turn"),
    ({"messages": []}, "messages", "empty_conversation", "empty conversation"),
    ({"messages": "user: Hi."}, "messages", "wrong_type", "expected a list of turns, got str"),
    ({"messages": [{**U, "name": "ann"}, A]}, "messages[0].name", "unknown_field", "unknown key(s) ['name']"),
    ({"messages": [U, A], "conversations": [U, A]}, "conversations", "ambiguous_conversation",
     "both 'messages' and 'conversations'"),
]


@pytest.mark.parametrize("row,field,reason,words", BAD_CONVERSATIONS)
def test_bad_conversations_name_file_line_and_field(tmp_path, row, field, reason, words):
    f = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [U, A]}, row])
    with pytest.raises(DataError) as info:
        load_instructions(f, format="messages")
    msg = str(info.value)
    assert msg.startswith(f"{f}:2 field '{field}': ") and words in msg and "skip_bad=True" in msg
    assert (info.value.path, info.value.line, info.value.field) == (str(f), 2, field)
    records, report = load_instructions_with_report(f, format="messages", skip_bad=True)
    assert [r.id for r in records] == ["bad.jsonl:1"] and report == {"loaded": 1, "skipped": 1, reason: 1}


def test_field_map_does_not_apply_to_conversations(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [U, A]}])
    with pytest.raises(ConfigError, match="field_map maps instruction fields; format 'messages' has fixed fields"):
        load_instructions(f, format="messages", id="uid")


def test_parquet_and_saved_dataset_with_messages_column(tmp_path):
    # Turns are structs in arrow: a key one turn has (`name`) is null in the others, which must not count as a key.
    rows = [{"messages": [{"role": "user", "content": "Hi.", "name": None}, {**A, "name": None}], "id": "p1"},
            {"messages": [{"role": "user", "content": "Bye.", "name": None},
                          {"role": "assistant", "content": "Bye!", "name": None}], "id": "p2"}]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "chat.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "saved_dict"))
    for records in (load_instructions(tmp_path / "chat.parquet"), load_instructions(tmp_path / "saved")):
        assert [(r.context, r.references, r.id) for r in records] == [
            ((("user", "Hi."),), ("Hello.",), "p1"), ((("user", "Bye."),), ("Bye!",), "p2")]
    test = load_instructions(tmp_path / "saved_dict", split="test")
    assert [(r.instruction, r.references) for r in test] == [("Bye.", ("Bye!",))]
    with pytest.raises(DataError, match=r"saved_dict: no split 'dev' in this saved dataset; pass split= one of "
                                        r"\['test', 'train'\]"):
        load_instructions(tmp_path / "saved_dict", split="dev")


def test_csv_cannot_hold_a_conversation(tmp_path):
    f = tmp_path / "chat.csv"
    f.write_text('messages\n"[{""role"": ""user""}]"\n')
    with pytest.raises(DataError) as info:
        load_instructions(f)
    assert str(info.value).startswith(f"{f}:2 field 'messages': expected a list of turns, got str (a csv cell "
                                      "cannot hold a conversation; use jsonl, json or parquet)")


def test_skip_bad_counts_conversation_reasons(tmp_path):
    rows = [{"messages": [U, A]}, {"messages": [U, U, A]}, {"messages": [U, {"role": "bot", "content": "x"}]},
            {"messages": [U]}, {"messages": [U, {"role": "assistant", "content": ""}]}, {"messages": [U, A, A]}]
    f = write_jsonl(tmp_path / "mixed.jsonl", rows)
    records, report = load_instructions_with_report(f, skip_bad=True)
    assert [r.id for r in records] == ["mixed.jsonl:1"]
    assert report == {"loaded": 1, "skipped": 5, "turn_order": 2, "unknown_role": 1, "no_response": 1,
                      "empty_content": 1}


# --- files as tools write them, and directories -------------------------------------------------------------------


def test_jsonl_with_bom_and_crlf(tmp_path):
    f = tmp_path / "win.jsonl"
    f.write_bytes(("\ufeff" + GOOD + "\r\n\r\n" + '{"instruction": "Say hi.", "response": "hi"}\r\n').encode())
    records = load_instructions(f)
    assert [(r.instruction, r.references, r.id) for r in records] == [
        ("Name a colour.", ("Blue.",), "win.jsonl:1"), ("Say hi.", ("hi",), "win.jsonl:3")]


def test_json_list_with_bom_and_crlf(tmp_path):
    f = tmp_path / "win.json"
    f.write_bytes(("\ufeff[\r\n" + GOOD + ",\r\n\r\n" + '{"instruction": "Say hi.", "response": "hi"}\r\n]\r\n'
                   ).encode())
    assert [r.id for r in load_instructions(f)] == ["win.json:2", "win.json:4"]


def test_csv_with_bom_and_crlf(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("\ufeffinstruction,context,response,category\r\nName a colour.,,Blue.,open_qa\r\n"
                  'Summarise.,"Two lines,\r\nof text.",Short.,summarization\r\nSay hi.,,hi,open_qa\r\n'.encode())
    records = load_instructions(f)  # the BOM would otherwise glue itself to the first header name
    assert [(r.instruction, r.input, r.references, r.category) for r in records] == [
        ("Name a colour.", "", ("Blue.",), "open_qa"), ("Summarise.", "Two lines,\r\nof text.", ("Short.",),
                                                        "summarization"), ("Say hi.", "", ("hi",), "open_qa")]
    assert [r.id for r in records] == ["excel.csv:2", "excel.csv:3", "excel.csv:5"]


def test_csv_in_prefkds_own_schema_reads_a_references_cell_as_one_reference(tmp_path):
    f = tmp_path / "ours.csv"
    f.write_text('instruction,input,references,category\nName a colour.,,Blue.,open_qa\n'
                 'Add.,"2, 3",5,\n')
    records = load_instructions(f)
    assert [(r.instruction, r.input, r.references, r.category) for r in records] == [
        ("Name a colour.", "", ("Blue.",), "open_qa"), ("Add.", "2, 3", ("5",), None)]
    f.write_text("instruction,references\nName a colour.,\n")
    with pytest.raises(DataError) as info:
        load_instructions(f)
    assert str(info.value).startswith(f"{f}:2 field 'references': this file must have a non-empty reference")
    # A jsonl file can hold the list, so a string there is still the schema error it is.
    j = tmp_path / "ours.jsonl"
    j.write_text('{"instruction": "Name a colour.", "references": "Blue."}\n')
    with pytest.raises(DataError) as info:
        load_instructions(j)
    assert str(info.value).startswith(f"{j}:1 field 'references': wrong type str")


def test_directory_loads_every_data_file_sorted_each_detected_on_its_own(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "b_chat.jsonl", [{"messages": [U, A]}])
    (d / "a_dolly.csv").write_text("instruction,context,response,category\nName a colour.,,Blue.,open_qa\n")
    write_jsonl(d / "c_ours.jsonl", [{"instruction": "Say hi.", "references": ["hi"]}])
    (d / "notes.txt").write_text("not data")
    (d / "sub").mkdir()
    write_jsonl(d / "sub" / "more.jsonl", [{"messages": [U, A]}])  # subdirectories are not read
    records = load_instructions(d)
    assert [r.id for r in records] == ["a_dolly.csv:2", "b_chat.jsonl:1", "c_ours.jsonl:1"]
    assert [(r.instruction, r.context, r.references) for r in records] == [
        ("Name a colour.", (), ("Blue.",)), ("Hi.", (("user", "Hi."),), ("Hello.",)), ("Say hi.", (), ("hi",))]


def test_directory_errors_name_the_file_and_line(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_jsonl(d / "a.jsonl", [{"messages": [U, A]}, {"messages": [U, A]}])
    write_jsonl(d / "b.jsonl", [{"messages": [U, A]}, {"messages": [U, U]}])
    with pytest.raises(DataError) as info:
        load_instructions(d)
    assert str(info.value).startswith(f"{d / 'b.jsonl'}:2 field 'messages[1].role': two user turns in a row")
    records, report = load_instructions_with_report(d, skip_bad=True)
    assert [r.id for r in records] == ["a.jsonl:1", "a.jsonl:2", "b.jsonl:1"]
    assert report == {"loaded": 3, "skipped": 1, "turn_order": 1}


def test_saved_dataset_directory(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "saved_dict"))
    assert [r.id for r in load_instructions(tmp_path / "saved")] == ["saved:1", "saved:2"]
    assert [r.instruction for r in load_instructions(tmp_path / "saved_dict", split="test")] == ["Summarise."]
    with pytest.raises(DataError, match=r"saved_dict: no split 'dev' in this saved dataset; pass split= one of "
                                        r"\['test', 'train'\]"):
        load_instructions(tmp_path / "saved_dict", split="dev")


def test_directory_without_data_files(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError) as info:
        load_instructions(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: no .jsonl/.json/.csv/.parquet file in this directory")


def test_directory_of_several_splits_is_refused(tmp_path):
    for name in ("train.jsonl", "test.jsonl", "d0.jsonl"):
        (tmp_path / name).write_text(GOOD + "\n")
    with pytest.raises(DataError) as info:
        load_instructions(tmp_path)
    assert str(info.value) == (f"{tmp_path}: the files name several splits (test.jsonl (test), train.jsonl (train)); "
                               "loaded together the held-out records would mix into training: pass one file, e.g. "
                               f"{tmp_path / 'train.jsonl'}")
    (tmp_path / "test.jsonl").unlink()
    (tmp_path / "train-2.jsonl").write_text(GOOD + "\n")  # shards of one split load together
    assert [r.id for r in load_instructions(tmp_path)] == ["d0.jsonl:1", "train-2.jsonl:1", "train.jsonl:1"]


def test_loaded_conversations_round_trip_through_prefkd_files(tmp_path):
    from prefkd.data.records import write_records

    records = load_instructions(write_jsonl(tmp_path / "chat.jsonl", [{"messages": CHAT}, {"messages": CHAT[:4]}]),
                                require_references=False)
    write_records(tmp_path / "ours.jsonl", records)
    assert load_instructions(tmp_path / "ours.jsonl", require_references=False) == records


def test_a_hub_split_is_named_in_brackets(monkeypatch):
    """`id[split]` picks a hub dataset's split from a config value (UltraChat's is train_sft, not train)."""
    import datasets

    asked = []

    def fake_load_dataset(source, split):
        asked.append((source, split))
        return [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = load_instructions("HuggingFaceH4/ultrachat_200k[train_sft]")
    assert asked == [("HuggingFaceH4/ultrachat_200k", "train_sft")]
    assert records[0].references == ("Hello.",) and records[0].context == (("user", "Hi"),)
    load_instructions("org/data")
    assert asked[-1] == ("org/data", "train")
