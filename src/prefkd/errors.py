"""User-facing errors: the CLI prints these as one line, without a traceback."""

from __future__ import annotations


class PrefkdError(Exception):
    """An error the user can fix; the message says what and how."""


class DataError(PrefkdError):
    """Bad input data. Names the file, the line and the field where there is one."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        where = ":".join(str(p) for p in (path, line) if p is not None)
        if field:
            where = f"{where} field '{field}'" if where else f"field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.line, self.field = path, line, field


class ConfigError(PrefkdError):
    """Bad configuration: unknown key, wrong type, impossible value."""
