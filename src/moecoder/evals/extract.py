"""Deterministic code extraction from model output. Raw and extracted text are both kept by the runner.

Single file (`extract_code`):
  1. Fenced blocks (``` or ~~~, three or more) are found; an info string's first word is the
     language tag. A fence left open at the end of the output (the answer was cut by
     max_tokens) runs to the end of the text.
  2. Blocks tagged python/py/python3 are preferred; if there are none, untagged blocks; blocks
     tagged with another language are never used.
  3. Among those, the first block that defines `entry_point` (when given) wins, else the longest
     (ties: the first). No fences at all: the whole output, if it parses as Python.

Multi-file answers (`extract_files`), the ONE format moecoder documents and prompts for:
  a heading line `### path/to/file.py` (the path alone, optionally in backticks), then,
  after optional blank lines, a fenced block holding that file's complete contents:

      ### pkg/model.py
      ```python
      import torch
      ```

  Paths must be relative, use `/`, and contain no `..` or empty parts; a later block for the
  same path replaces the earlier one. Fenced blocks without a heading are ignored.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

PYTHON_TAGS = {"python", "py", "python3"}
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\n`]*)$")
_HEADING = re.compile(r"^#{3}[ \t]+`?([^`\s]+)`?[ \t]*$")


@dataclass
class Block:
    lang: str  # lower-cased first word of the info string, "" when untagged
    info: str
    code: str
    start_line: int  # index of the opening fence line
    closed: bool


def fenced_blocks(text: str) -> list[Block]:
    """All fenced blocks, in order. A closing fence is the same character, at least as long, no info."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group(1), m.group(2).strip()
        body: list[str] = []
        j = i + 1
        closed = False
        while j < len(lines):
            stripped = lines[j].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                closed = True
                break
            body.append(lines[j])
            j += 1
        lang = info.split()[0].lower() if info else ""
        code = "\n".join(body)
        blocks.append(Block(lang, info, code + "\n" if body else "", i, closed))
        i = j + 1
    return blocks


def parses(code: str) -> bool:
    """True if `code` is syntactically valid Python."""
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _defines(code: str, name: str) -> bool:
    return re.search(rf"^\s*(async\s+)?(def|class)\s+{re.escape(name)}\b", code, re.MULTILINE) is not None


def extract_code(text: str, entry_point: str | None = None) -> str | None:
    """The Python module a model answer contains, or None when there is none (status `extract`)."""
    blocks = fenced_blocks(text)
    if not blocks:
        stripped = text.strip("\n")
        return stripped + "\n" if stripped.strip() and parses(stripped) else None
    candidates = [b for b in blocks if b.lang in PYTHON_TAGS] or [b for b in blocks if b.lang == ""]
    candidates = [b for b in candidates if b.code.strip()]
    if not candidates:
        return None
    if entry_point:
        for b in candidates:
            if _defines(b.code, entry_point):
                return b.code
    return max(candidates, key=lambda b: len(b.code)).code  # max() keeps the first of equals


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """Cut a completion at the earliest stop sequence (servers that ignore `stop` still get cut)."""
    cut = len(text)
    for s in stop:
        k = text.find(s)
        if s and k != -1:
            cut = min(cut, k)
    return text[:cut]


class UnsafePath(ValueError):
    """A multi-file answer named a path outside the answer's own folder."""


def _check_path(path: str) -> str:
    parts = path.split("/")
    if path.startswith("/") or "\\" in path or ":" in path or any(p in ("", ".", "..") for p in parts):
        raise UnsafePath(f"unsafe file path in answer: {path!r}")
    return path


def extract_files(text: str) -> dict[str, str]:
    """Files by path from a multi-file answer (format in the module docstring). Empty dict: none found."""
    lines = text.splitlines()
    files: dict[str, str] = {}
    for b in fenced_blocks(text):
        k = b.start_line - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        m = _HEADING.match(lines[k].strip()) if k >= 0 else None
        if m:
            files[_check_path(m.group(1))] = b.code
    return files
