"""What the image inputs of ``proposals`` and ``pretrain`` may be, expanded into paths.

Each input is one of:

* a folder (its images and archives, recursively), a ``.tar`` / ``.zip`` archive, or one image file;
* a pattern: brace ranges and lists as the shell writes them (``shard-{000000..001281}.tar``: the
  numbers keep the width of the wider bound; ``{train,extra}``) and then glob wildcards (``*``,
  ``?``, ``[...]``), matched in sorted order. Quoting the pattern (``'shard-{000..009}.tar'``)
  leaves the expansion to us, which also works where the shell would expand nothing (YAML, a
  list file) or would exceed its argument limit;
* a list file (``.txt``): one input per line (blank lines and ``#`` comments skipped, the first
  tab-separated field used, as ``train_map.txt`` writes it), relative to the list file's folder;
  lines may be patterns, not list files.

A path named literally like a pattern (a folder called ``a{1..2}``) is taken as it is.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path
from typing import Sequence

from soco_det.errors import UserError

LIST_SUFFIXES = (".txt",)
MAX_EXPANSION = 1_000_000  # paths one pattern may expand to (a typo such as {0..10000000000} stops here)

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_WILDCARDS = re.compile(r"[*?\[]")


def expand_braces(text: str) -> list[str]:
    """Shell-style brace expansion of ``text`` (ranges ``{a..b}`` of whole numbers and comma lists
    ``{x,y}``; a group that is neither stays literal). Raises :class:`UserError` past
    :data:`MAX_EXPANSION` results."""
    out: list[str] = []
    todo = [text]
    while todo:
        word = todo.pop()
        group = next((m for m in _BRACE.finditer(word) if _alternatives(m.group(1)) is not None), None)
        if group is None:
            out.append(word)
            continue
        head, tail = word[: group.start()], word[group.end() :]
        todo += [head + alt + tail for alt in reversed(_alternatives(group.group(1)) or [])]
        if len(out) + len(todo) > MAX_EXPANSION:
            raise UserError(f"{text}: expands to more than {MAX_EXPANSION} paths")
    return out


def _alternatives(body: str) -> list[str] | None:
    m = _RANGE.match(body)
    if m:
        lo, hi = m.group(1), m.group(2)
        a, b = int(lo), int(hi)
        if abs(b - a) >= MAX_EXPANSION:
            raise UserError(f"{{{body}}}: a range of more than {MAX_EXPANSION} values")
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (lo, hi))
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if b >= a else -1
        return [f"{v:0{width}d}" for v in range(a, b + step, step)]
    if "," in body:
        return body.split(",")
    return None


def _expand_word(word: str, where: str = "") -> list[Path]:
    """The existing paths one input word names (literal, else braces, then globs)."""
    origin = f" (in {where})" if where else ""
    if Path(word).exists():
        return [Path(word)]
    found: list[Path] = []
    for item in expand_braces(word):
        if Path(item).exists():
            found.append(Path(item))
        elif _WILDCARDS.search(item):
            found += [Path(p) for p in sorted(glob.glob(item))]
        else:
            missing = f"{item}, one of the paths of {word}" if item != word else item
            raise UserError(f"{missing}: no such file or folder{origin}")
    if not found:
        raise UserError(f"{word}: matches no file or folder{origin}")
    return found


def _read_list(path: Path) -> list[Path]:
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the list of inputs ({exc})") from exc
    out: list[Path] = []
    for line in lines:
        entry = line.split("\t", 1)[0].strip()
        if not entry or entry.startswith("#"):
            continue
        full = entry if Path(entry).is_absolute() else str(path.parent / entry)
        for item in _expand_word(full, str(path)):
            if item.suffix.lower() in LIST_SUFFIXES and item.is_file():
                raise UserError(f"{path}: lists another list file ({item}); list the inputs themselves")
            out.append(item)
    if not out:
        raise UserError(f"{path}: the list of inputs is empty")
    return out


def expand_inputs(inputs: str | Path | Sequence[str | Path]) -> list[Path]:
    """Every path the inputs name (see the module docstring), resolved, each once, in order."""
    words = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    if not words:
        raise UserError("no image inputs given")
    seen: dict[Path, None] = {}
    for word in words:
        for path in _expand_word(str(word)):
            items = _read_list(path) if path.suffix.lower() in LIST_SUFFIXES and path.is_file() else [path]
            for item in items:
                seen.setdefault(item.resolve(), None)
    return list(seen)
