"""Every JSON and JSONL file the project reads goes through these two functions, so that a damaged file
fails with one line naming the file (and the line, for JSONL) and what to do, never with the parser's
words alone ("Unterminated string starting at: line 2 column 23").

A JSONL file that a running process appends to (metrics.jsonl) may end in a torn line when that
process was killed mid-write: `read_jsonl(..., torn_tail_ok=True)` drops such a last line (one that
does not end in a newline and does not parse); everywhere else a bad line is an error.

Run: a library.
"""
from __future__ import annotations

import json
from pathlib import Path


class JSONFileError(ValueError):
    """A JSON or JSONL file that does not parse, or holds the wrong kind of value."""


def read_json(path, what: str = "", fix: str = "") -> dict:
    """The JSON object in `path`; `what` says what the file is ("the teacher's run_config.json") and
    `fix` what to do about a damaged one (default: restore or re-create it)."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise JSONFileError(f"{label} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); "
                            f"{fix or 'restore it or write it again'}") from None
    except UnicodeDecodeError:
        raise JSONFileError(f"{label} is not a text file; {fix or 'restore it or write it again'}") from None
    if not isinstance(value, dict):
        raise JSONFileError(f"{label} holds a JSON {type(value).__name__}, not an object; "
                            f"{fix or 'restore it or write it again'}")
    return value


def read_jsonl(path, what: str = "", fix: str = "", torn_tail_ok: bool = False) -> list:
    """The JSON values of `path`, one per non-empty line. torn_tail_ok: a last line cut short by a kill
    (no final newline, not parseable) is dropped instead of failing."""
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    text = path.read_text()
    lines = text.split("\n")
    values = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_tail_ok and number == len(lines):  # the last line, with no newline after it
                break
            raise JSONFileError(f"{label} line {number} is not valid JSON ({e.msg}); "
                                f"{fix or 'fix or remove that line'}") from None
    return values
