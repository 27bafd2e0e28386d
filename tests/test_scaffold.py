"""``headq new-plugin``: the distribution it writes installs for real (pip, no network), is found
by name by ``headq list`` in a fresh process, and passes its own conformance tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from headq_core.cli import app
from headq_core.scaffold import ScaffoldError, plugin_files, write_plugin
from headq_pytest import Conformance

KEY_NAME, VALUE_NAME = "scafk", "scafv"


def _tool(name: str) -> list[str] | None:
    """A console script of this environment (beside the interpreter), if installed."""
    path = Path(sys.executable).parent / name
    return [str(path)] if path.exists() else None


def _run(args: list[str], env: dict[str, str], cwd: Path, timeout: int = 180) -> str:
    done = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{output}"
    return output


@pytest.mark.parametrize("name", ["Bad", "bad-name", "1st", "", "x" * 33, "a b"])
def test_names_that_cannot_be_spec_and_package_names_are_refused(name: str) -> None:
    with pytest.raises(ScaffoldError, match="lower-case letters"):
        plugin_files(name, "key")


def test_the_cli_refuses_an_installed_name_a_bad_kind_and_a_used_folder(tmp_path: Path) -> None:
    runner = CliRunner()
    taken = runner.invoke(app, ["new-plugin", "fp16", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert taken.exit_code != 0 and "already installed" in taken.output and "headq-core" in taken.output
    kind = runner.invoke(app, ["new-plugin", "ok", "--kind", "keys", "--out", str(tmp_path)])
    assert kind.exit_code != 0 and "--kind must be key or value" in kind.output
    write_plugin("ok", "key", tmp_path)
    again = runner.invoke(app, ["new-plugin", "ok", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert again.exit_code == 2 and "is not empty" in again.output
    assert not list(tmp_path.glob("*/*/ok*"))  # nothing written by the refused calls


def test_scaffolded_plugins_install_are_found_by_name_and_conform(tmp_path: Path) -> None:
    runner = CliRunner()
    projects = []
    for name, kind in ((KEY_NAME, "key"), (VALUE_NAME, "value")):
        result = runner.invoke(app, ["new-plugin", name, "--kind", kind, "--out", str(tmp_path)])
        assert result.exit_code == 0, result.output
        projects.append(tmp_path / f"headq-{name}")
    key_project = projects[0]
    assert {p.relative_to(key_project).as_posix() for p in key_project.rglob("*") if p.is_file()} == {
        "pyproject.toml",
        "README.md",
        f"headq_{KEY_NAME}/__init__.py",
        f"headq_{KEY_NAME}/py.typed",
        f"tests/test_{KEY_NAME}.py",
    }
    assert f'{KEY_NAME} = "headq_{KEY_NAME}"' in (key_project / "pyproject.toml").read_text()

    ruff = _tool("ruff")
    if ruff is not None:  # the generated code meets its own lint and format settings
        for project in projects:
            _run([*ruff, "check", "--no-cache", "."], dict(os.environ), project)
            _run([*ruff, "format", "--check", "--no-cache", "."], dict(os.environ), project)

    # A real install, no network: build with this environment's setuptools into a target folder.
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip, "--target", str(site), *map(str, projects)], dict(os.environ), tmp_path)
    assert (site / f"headq_{KEY_NAME}" / "__init__.py").is_file()
    for project in projects:  # build leftovers must not shadow the installed copy
        shutil.rmtree(project / "build", ignore_errors=True)

    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    headq = _tool("headq") or [sys.executable, "-c", "from headq_core.cli import main; main()"]
    listing = _run([*headq, "list"], env, tmp_path)
    for name in (KEY_NAME, VALUE_NAME):
        assert name in listing and f"headq-{name}" in listing, listing
    assert "broken plugin" not in listing

    tests = [str(project / "tests") for project in projects]
    report = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], env, tmp_path)
    summary = report.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed in [\d.]+s.*", summary), report


def test_the_conformance_fixture_checks_every_side_and_names_what_is_missing(
    headq_conformance: Conformance,
) -> None:
    assert headq_conformance("fp16:dtype=float16") == ["key", "value"]
    assert headq_conformance("fp16", kind="value") == ["value"]
    with pytest.raises(pytest.fail.Exception, match="no key quantizer or value policy named 'nosuch'"):
        headq_conformance("nosuch:bits=2")


def test_the_pytest_plugin_imports_neither_headq_nor_torch() -> None:
    """pytest loads the plugin in every run of the environment: headq (torch, transformers) is
    imported only when the fixture is used."""
    code = (
        "import sys, headq_pytest; print(sorted({'headq_core', 'torch', 'transformers'} & set(sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout
