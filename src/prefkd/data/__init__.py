"""Instruction records, the readers of every data format, the prompt template and the embedded suite.

`load_instructions` is the one reader: every verb takes what it takes (prefkd jsonl, Dolly, MiniLLM, conversations
in TRL or ShareGPT form; jsonl, json, csv, parquet, a directory of them, a saved or hub dataset)."""

from prefkd.data.loaders import load_instructions
from prefkd.data.records import Instruction, write_records
from prefkd.data.templates import render_prompt

__all__ = ["Instruction", "load_instructions", "render_prompt", "write_records"]
