"""Every ```python block of README.md and docs/*.md runs, so the docs cannot rot.

Conventions for doc writers:

- The blocks of one file run in order in one namespace: a later block may use
  what an earlier one defined. Each file starts from a fresh namespace.
- ```python no-run marks a block that is shown but not run (pseudo-code, the
  device-loop pattern chainmesh replaces, long jobs). Other info words are
  errors, so a typo cannot silently skip a block.
- Write realistic lengths (``num_warmup=500, num_samples=1000``); the runner
  caps every ``num_warmup=<int>`` and ``num_samples=<int>`` literal at
  ``LENGTH_CAP`` so the docs test stays fast. Do not assert on those lengths.
- Tests run on 8 host CPU devices (``conftest.py``): a doc that splits the
  CPU calls ``cm.set_host_device_count(8)``; any other count fails here with
  an explanation instead of JAX's RuntimeError.
- Blocks run in a temporary working directory (files they write land there),
  with matplotlib's Agg backend.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LENGTH_CAP = 100
DEVICES = 8

_FENCE = re.compile(r"^```(\S*)[ \t]*(.*)$")
_LENGTH = re.compile(r"\b(num_warmup|num_samples)=(\d+)")
_DEVICES = re.compile(r"set_host_device_count\((\d+)\)")


class Block(NamedTuple):
    """One fenced code block: where it starts, its info words and its code."""

    line: int
    language: str
    flags: tuple[str, ...]
    code: str


def blocks(text: str) -> list[Block]:
    """Fenced blocks of a Markdown text (``line`` is the first code line)."""
    out, open_block, lines = [], None, text.splitlines()
    for number, line in enumerate(lines, start=1):
        match = _FENCE.match(line)
        if open_block is None and match:
            open_block = (number + 1, match.group(1), tuple(match.group(2).split()))
        elif open_block is not None and line.strip() == "```":
            start, language, flags = open_block
            code = "\n".join(lines[start - 1 : number - 1])
            out.append(Block(start, language, flags, code))
            open_block = None
    assert open_block is None, f"unclosed ``` fence opened at line {open_block[0]}"
    return out


def runnable(block: Block) -> bool:
    """A python block without ``no-run``; unknown info words are errors."""
    if block.language != "python":
        return False
    unknown = set(block.flags) - {"no-run"}
    assert not unknown, f"line {block.line}: unknown info words {sorted(unknown)}"
    return "no-run" not in block.flags


def prepare(code: str, where: str) -> str:
    """Cap chain lengths; refuse device counts other than the tests' 8."""
    for count in _DEVICES.findall(code):
        if int(count) != DEVICES:
            pytest.fail(
                f"{where}: set_host_device_count({count}); the docs test runs in "
                f"a process with {DEVICES} host devices (tests/conftest.py), so "
                f"docs must use set_host_device_count({DEVICES}) or pass "
                f"devices=<n> (n <= {DEVICES}) to the sampler"
            )
    return _LENGTH.sub(lambda m: f"{m[1]}={min(int(m[2]), LENGTH_CAP)}", code)


def test_block_parser_and_conventions():
    text = "a\n```python\nx = 1\n```\n```python no-run\nboom()\n```\n```bash\nls\n```\n"
    found = blocks(text)
    assert [(b.line, b.language, b.flags) for b in found] == [
        (3, "python", ()),
        (6, "python", ("no-run",)),
        (9, "bash", ()),
    ]
    assert [runnable(b) for b in found] == [True, False, False]
    with pytest.raises(AssertionError, match="unknown info words"):
        runnable(Block(1, "python", ("norun",), ""))
    code = "cm.Sampler(m, num_warmup=500, num_samples=50, num_chains=4)"
    assert prepare(code, "x") == (
        "cm.Sampler(m, num_warmup=100, num_samples=50, num_chains=4)"
    )
    with pytest.raises(pytest.fail.Exception, match="set_host_device_count"):
        prepare("cm.set_host_device_count(4)", "x")


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(ROOT)) for p in FILES])
def test_doc_code_blocks_run(path, tmp_path, monkeypatch):
    pytest.importorskip("arviz")
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    name = str(path.relative_to(ROOT))
    namespace: dict = {"__name__": f"docs:{name}"}
    ran = 0
    for block in blocks(path.read_text()):
        if not runnable(block):
            continue
        code = prepare(block.code, f"{name}:{block.line}")
        # Leading newlines make tracebacks point at the Markdown line numbers.
        source = "\n" * (block.line - 1) + code
        exec(compile(source, name, "exec"), namespace)  # noqa: S102
        ran += 1
    if ran == 0:
        pytest.skip(f"{name} has no runnable python block")
