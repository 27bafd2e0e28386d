"""Documentation that cannot rot: every hook documented with its exact signature and tested, every
example in the docs run, every ``headq`` command shown parsed or run, every relative link alive.

The convention for fenced blocks in ``README.md`` and ``docs/**/*.md``:

- ```` ```python ````: executed in order, one namespace per Markdown file, in a temporary working
  directory. ```` ```python no-run ```` is only compiled (for examples that need the real model or a
  long run).
- ```` ```console ````: each ``$ headq ...`` line is run (in process, through the CLI app) and must
  exit 0; the lines after it, up to the next ``$``, are expected output: each must appear, in
  order, among the lines printed (``...`` stands for any lines). Every ``$`` line must be a
  ``headq`` command. ```` ```console no-run ```` is only parsed.
- every other block (```` ``` ````, ```` ```shell ````, ```` ```bash ````): never run, but each line that starts
  with ``headq`` (or ``$ headq``) is parsed against the CLI, so a renamed command or option fails
  here; ```` ```toml ```` blocks must parse.
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import typer
from typer.testing import CliRunner

from headq_core import hookspecs
from headq_core.cli import app

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
GUIDE = DOCS / "plugin-author-guide.md"
REGISTRY_SOURCE = ROOT / "headq_core" / "registry.py"
FENCE = re.compile(r"^(`{3,})([^`\s]*)[ \t]*([^`]*?)\s*$")  # CommonMark: no backtick in the info string
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


@attrs.frozen
class Block:
    path: Path
    line: int  # of the first line inside the fence, 1-based
    lang: str
    flags: frozenset[str]
    text: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def runs(self) -> bool:
        return "no-run" not in self.flags


def blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with their info string split into language and flags."""
    out, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        start, body = i + 1, []
        closing = re.compile(rf"^{opening.group(1)}`*\s*$")
        i += 1
        while i < len(lines) and not closing.match(lines[i]):
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{start}: unclosed code fence")
        out.append(
            Block(path, start + 1, opening.group(2), frozenset(opening.group(3).split()), "\n".join(body))
        )
        i += 1
    return out


def command_lines(text: str) -> Iterator[tuple[int, str]]:
    """(offset, command) for each line that is a command, backslash continuations joined."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        start, line = i, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):
            i += 1
            line = line[:-1] + " " + lines[i].strip()
        yield start, line
        i += 1


def headq_args(command: str) -> list[str] | None:
    """The arguments of a ``headq`` command line, or None for any other line."""
    command = command.strip().removeprefix("$ ").strip()
    if not command.startswith("headq ") and command != "headq":
        return None
    return shlex.split(command, comments=True)[1:]


def parse_command(args: list[str]) -> None:
    """Resolve a ``headq`` command line against the CLI without running it; raise on a bad one."""
    group = typer.main.get_command(app)
    ctx = group.make_context("headq", list(args))
    rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
    if not rest:
        return
    name, command, rest = group.resolve_command(ctx, rest)  # type: ignore[attr-defined]
    if command is None:
        raise AssertionError(f"no command {name!r}")
    command.make_context(name, rest, parent=ctx)


def _params() -> list[Any]:
    return [pytest.param(path, id=str(path.relative_to(ROOT))) for path in doc_files()]


# --- hooks ---------------------------------------------------------------------------------------


def hook_signatures() -> dict[str, str]:
    """``name(args) -> return`` of every hook in hookspecs.py, as written in its source."""
    tree = ast.parse(Path(hookspecs.__file__).read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and any(
            ast.unparse(d) == "hookspec" for d in node.decorator_list
        ):
            returns = f" -> {ast.unparse(node.returns)}" if node.returns else ""
            out[node.name] = f"{node.name}({ast.unparse(node.args)}){returns}"
    return out


def test_the_hook_list_is_complete() -> None:
    """Every hookspec found by source is a pluggy hookspec and vice versa."""
    marked = {
        name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), f"{hookspecs.PROJECT}_spec")
    }
    assert set(hook_signatures()) == marked and marked


@pytest.mark.parametrize("hook", sorted(hook_signatures()))
def test_every_hook_is_documented_with_its_exact_signature(hook: str) -> None:
    signature = hook_signatures()[hook]
    guide = GUIDE.read_text(encoding="utf-8")
    assert signature in guide, f"{GUIDE.relative_to(ROOT)} does not show the hook signature `{signature}`"
    first = getattr(hookspecs, hook).__doc__.split("\n\n")[0].split(". ")[0]

    def plain(text: str) -> str:  # RST roles (:class:`~a.b.Name`) and backticks dropped
        text = re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"\1", text)
        return " ".join(text.replace("`", "").split())

    assert plain(first) in plain(guide), f"the guide does not give the contract of {hook}: {first!r}"


@pytest.mark.parametrize("hook", sorted(hook_signatures()))
def test_every_hook_is_called_by_the_registry_and_by_a_test(hook: str) -> None:
    assert f'"{hook}"' in REGISTRY_SOURCE.read_text(encoding="utf-8"), f"load_registry never calls {hook}"
    callers = [
        path.name
        for path in (ROOT / "tests").glob("test_*.py")
        if path.name != Path(__file__).name
        and re.search(rf"def {hook}\(|\.{hook}\(", path.read_text(encoding="utf-8"))
    ]
    assert callers, f"no test implements or calls the hook {hook}"


# --- code blocks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", _params())
def test_every_headq_command_shown_parses(path: Path) -> None:
    failures = []
    for block in blocks(path):
        if block.lang == "toml":
            try:
                tomllib.loads(block.text)
            except tomllib.TOMLDecodeError as err:
                failures.append(f"{block.where}: TOML does not parse: {err}")
        if block.lang == "python":
            continue
        for offset, line in command_lines(block.text):
            args = headq_args(line)
            if block.lang == "console" and line.startswith("$ ") and args is None:
                failures.append(f"{block.where}: only headq commands may be shown as runnable: {line}")
            if args is None:
                continue
            try:
                parse_command(args)
            except Exception as err:  # click's errors, whatever module they live in
                failures.append(f"{block.where} (+{offset}): `{line.strip()}`: {err}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("path", _params())
def test_relative_links_resolve(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    dead = [
        target
        for target in LINK.findall(text)
        if "://" not in target
        and not target.startswith(("#", "mailto:"))
        and not (path.parent / target.split("#")[0]).exists()
    ]
    assert not dead, f"{path.relative_to(ROOT)} links to missing files: {dead}"


def _expect_output(block: Block, command: str, expected: list[str], output: str) -> None:
    got = [line.rstrip() for line in output.splitlines()]
    pos = 0
    for want in (line.rstrip() for line in expected):
        if not want or want == "...":
            continue
        try:
            pos = got.index(want, pos) + 1
        except ValueError:
            raise AssertionError(
                f"{block.where}: `{command}` did not print, in order, the line\n  {want}\nIt printed:\n{output}"
            ) from None


def run_console(block: Block) -> None:
    runner = CliRunner()
    commands: list[tuple[str, list[str]]] = []
    for _, line in command_lines(block.text):
        if line.startswith("$ "):
            commands.append((line[2:], []))
        elif commands:
            commands[-1][1].append(line)
    for command, expected in commands:
        args = headq_args(command)
        assert args is not None, f"{block.where}: not a headq command: {command}"
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0, (
            f"{block.where}: `{command}` exited {result.exit_code}:\n{result.output}"
        )
        _expect_output(block, command, expected, result.output)


@pytest.mark.parametrize("path", _params())
def test_the_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HEADQ_CACHE_DIR", str(tmp_path / "cache"))  # models an example converts stay here
    monkeypatch.setattr(sys, "argv", [str(path)])
    namespace: dict[str, Any] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    ran = 0
    for block in blocks(path):
        if block.lang == "python":
            code = compile(block.text, block.where, "exec")  # no-run blocks must still compile
            if block.runs:
                exec(code, namespace)
                ran += 1
        elif block.lang == "console" and block.runs:
            run_console(block)
            ran += 1
    if ran == 0:
        pytest.skip(f"{path.relative_to(ROOT)} has no runnable examples")


def test_the_convention_is_followed_by_the_guide() -> None:
    """The author guide itself runs: it must hold runnable python and console blocks."""
    kinds = {(b.lang, b.runs) for b in blocks(GUIDE)}
    assert ("python", True) in kinds and ("console", True) in kinds
    assert os.path.exists(DOCS / "methods" / "kivi.md")
