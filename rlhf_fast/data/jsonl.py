"""Users' data: JSONL files in the usual formats, one JSON object per line.

  SFT:  {"prompt": str, "completion": str}  or  {"messages": [{"role": ..., "content": ...}, ...]} (last = assistant)
  RM, DPO: {"prompt": str, "chosen": str, "rejected": str}  or  {"messages": [...], "chosen": str, "rejected": str}
        (the conversation so far, then the two candidate assistant replies)
  PPO:  {"prompt": str}  or  {"messages": [...]} (the conversation so far)

A malformed line raises ``DataError`` naming the file and the line number.
"""

from __future__ import annotations

import json

FORMATS = {
    "sft": "{'prompt': str, 'completion': str} or {'messages': [{'role', 'content'}, ...]}",
    "rm": "{'prompt': str, 'chosen': str, 'rejected': str} or {'messages': [...], 'chosen': str, 'rejected': str}",
    "ppo": "{'prompt': str} or {'messages': [...]}",
}


class DataError(ValueError):
    pass


def _messages(value) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _valid(row, kind: str) -> bool:
    if not isinstance(row, dict):
        return False
    strings = lambda *keys: all(isinstance(row.get(k), str) for k in keys)  # noqa: E731
    if kind == "sft":
        return strings("prompt", "completion") or (_messages(row.get("messages"))
                                                   and row["messages"][-1]["role"] == "assistant")
    if kind == "rm":
        return strings("chosen", "rejected") and (strings("prompt") or _messages(row.get("messages")))
    return strings("prompt") or _messages(row.get("messages"))


def read_jsonl(path: str, kind: str) -> list[dict]:
    """Rows of ``path`` checked against the ``kind`` ('sft', 'rm' or 'ppo') format; blank lines are skipped."""
    if kind not in FORMATS:
        raise ValueError(f"kind must be one of {tuple(FORMATS)}, got {kind!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not _valid(row, kind):
                raise DataError(f"{path}:{lineno}: expected a {kind.upper()} row {FORMATS[kind]}, got "
                                f"{line.strip()[:120]}")
            rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def write_jsonl(path: str, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
