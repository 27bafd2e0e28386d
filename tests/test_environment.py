"""The tested-versions line of the README, the lock and the declared ranges agree."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements-lock.txt"
TESTED = re.compile(r"Tested with Python (\d+\.\d+), torch (\S+) \(CPU build\) and transformers (\S+?):")
OURS = {"headq-core", "headq-kernels", "headq-kivi", "headq-scorecorr", "headq-a2", "headq-gsrq"}


def _pins() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"{LOCK.name}: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version
    return pins


def _declared() -> list[Requirement]:
    out = []
    for path in [
        ROOT / "pyproject.toml",
        ROOT / "kernels" / "pyproject.toml",
        *ROOT.glob("plugins/*/pyproject.toml"),
    ]:
        project = tomllib.loads(path.read_text())["project"]
        out += [Requirement(r) for r in project["dependencies"]]
        for extra in ("dev", "gguf", "peers"):
            out += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    return [r for r in out if canonicalize_name(r.name) not in OURS]


def test_the_readme_names_the_locked_versions() -> None:
    found = TESTED.search((ROOT / "README.md").read_text().replace("\n", " "))
    assert found, "README.md lost its 'Tested with ...' line"
    python, torch, transformers = found.groups()
    pins = _pins()
    assert (torch, transformers) == (pins["torch"], pins["transformers"])
    assert python == "3.11"  # this machine type's Python, on which the lock was resolved


def test_every_declared_dependency_is_locked_inside_its_range() -> None:
    pins = _pins()
    for req in _declared():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} is declared but not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside {req}"
        )
