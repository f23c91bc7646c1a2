"""Reading the fenced code blocks of the README and the docs pages, and checking shell commands.

Blocks are typed by their fence: ``python`` blocks are executed, ``bash`` blocks are run (``pmakit``
commands) or checked (other commands must name real scripts, targets, extras and flags), ``yaml``
and ``json`` blocks are parsed, ``text`` blocks are output or layouts and are not run. A fence
without a language is an error: every block says what it is.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
LANGUAGES = ("python", "bash", "yaml", "json", "text")
FENCE = re.compile(r"^```(?P<lang>[^\s`]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block: its language, its text and where it starts (for error messages)."""

    page: str
    line: int
    lang: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def documented_pages() -> list[Path]:
    """The README and every Markdown page of the docs site."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced_blocks(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order; raises on an unclosed fence."""
    name = str(page.relative_to(ROOT))
    blocks, lang, start, lines = [], None, 0, []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        match = FENCE.match(line)
        if lang is None and match:
            lang, start, lines = match.group("lang"), number, []
        elif lang is not None and line.rstrip() == "```":
            blocks.append(Block(name, start, lang, "\n".join(lines) + "\n"))
            lang = None
        elif lang is not None:
            lines.append(line)
    if lang is not None:
        raise AssertionError(f"{name}:{start}: unclosed code fence")
    return blocks


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split like a shell."""
    joined = code.replace("\\\n", " ")
    commands = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def _flags(words: list[str]) -> list[str]:
    return [w.split("=", 1)[0][2:] for w in words if w.startswith("--")]


def _training_fields() -> set[str]:
    from pmakit import PmaArguments

    return {field.name for field in dataclasses.fields(PmaArguments)}


def _module_as_path(words: list[str]) -> list[str]:
    """``-m examples.name ...`` as ``examples/name.py ...`` (the words from ``-m`` on; others unchanged)."""
    if "-m" not in words or words.index("-m") + 1 >= len(words):
        return words
    at = words.index("-m")
    return [*words[:at], words[at + 1].replace(".", "/") + ".py", *words[at + 2 :]]


def _check_script(words: list[str], where: str) -> None:
    """``python script.py --flag ...`` or ``python -m examples.name --flag ...`` (a module of this repository):
    the script exists and takes each flag (its own or PmaArguments')."""
    words = _module_as_path(words)
    script = ROOT / words[0]
    assert script.is_file(), f"{where}: {words[0]} does not exist"
    source = script.read_text()
    known = _training_fields() if "PmaArguments" in source or "HfArgumentParser" in source else set()
    for flag in _flags(words[1:]):
        assert flag == "help" or flag in known or f"--{flag}" in source or f'"{flag}"' in source, (
            f"{where}: {words[0]} has no flag --{flag}"
        )


def _check_launcher(words: list[str], where: str) -> None:
    """``torchrun/deepspeed/accelerate launch ... train.py --flag ...``: every script flag is a PmaArguments field."""
    words = [*words[:1], *_module_as_path(words[1:])] if "-m" in words else words
    script_at = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
    assert script_at is not None, f"{where}: launcher without a script: {shlex.join(words)}"
    fields = _training_fields()
    for flag in _flags(words[script_at + 1 :]):
        assert flag in fields, f"{where}: --{flag} is not a PmaArguments/TrainingArguments field"


def _check_pip(words: list[str], where: str) -> None:
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.M))
    for word in words[2:]:
        for extra in re.findall(r"\[([^\]]+)\]", word):
            for name in extra.split(","):
                assert name.strip() in extras, f"{where}: pyproject.toml has no extra {name!r}"


def check_command(words: list[str], where: str) -> None:
    """Check a shell command that the docs show but a test cannot run (training launches, installs)."""
    env_free = [w for w in words if not re.match(r"^[A-Z_]+=", w)]
    head = env_free[0]
    if head == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in env_free[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: Makefile has no target {target}"
    elif head in ("python", "bash"):
        _check_script(env_free[1:], where)
    elif head in ("torchrun", "deepspeed") or env_free[:2] == ["accelerate", "launch"]:
        _check_launcher(env_free, where)
    elif head == "pip":
        _check_pip(env_free, where)
    else:
        raise AssertionError(f"{where}: no test knows how to run or check {shlex.join(words)!r}")
