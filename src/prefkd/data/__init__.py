"""Instruction records, the prompt template, tokenisation and the embedded suite."""

from prefkd.data.records import Instruction, read_records, write_records
from prefkd.data.templates import render_prompt

__all__ = ["Instruction", "read_records", "render_prompt", "write_records"]
