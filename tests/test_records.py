from dataclasses import replace

import pytest

from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction, write_records
from prefkd.errors import DataError


def test_round_trip(tmp_path):
    recs = [Instruction("Say hi", "", ("hi",), "x", "skill", "1"), Instruction("Add", "1 2", ("3", "three"))]
    write_records(tmp_path / "r.jsonl", recs)
    # A record without an id gets FILE:LINE, so its generations and scores can be traced back.
    assert load_instructions(tmp_path / "r.jsonl") == [recs[0], replace(recs[1], id="r.jsonl:2")]


@pytest.mark.parametrize("line, field, msg", [
    ('{"instruction": "a"', None, "malformed JSON"),
    ('{"input": "a"}', "instruction", "missing required field"),
    ('{"instruction": 3}', "instruction", "wrong type"),
    ('{"instruction": "  "}', "instruction", "empty instruction"),
    ('{"instruction": "a", "refs": []}', "refs", "unknown field"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, msg):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "fine", "references": ["ok"]}\n' + line + "\n")
    with pytest.raises(DataError, match=msg) as e:
        load_instructions(f)
    assert f"{f}:2" in str(e.value)
    if field:
        assert f"field '{field}'" in str(e.value)


def test_missing_references_and_invalid_utf8(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text('{"instruction": "a"}\n')
    with pytest.raises(DataError, match="field 'references'"):
        load_instructions(f)
    assert load_instructions(f, require_references=False)[0].references == ()  # a prompt set
    f.write_bytes(b'{"instruction": "\xff"}\n')
    with pytest.raises(DataError, match="invalid UTF-8"):
        load_instructions(f)
    f.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_instructions(f)
