"""``headq new-plugin``: write a complete third-party distribution for one new method.

The project it writes installs with ``pip install`` and is then found by name, with no other
edit: a ``pyproject.toml`` with the ``headq`` entry point, a package holding a small working
method (round-to-nearest affine per token, as a key quantizer or a value policy) and the hook that
registers it, and tests that run the conformance kit through the ``headq_conformance`` fixture.
The files are rendered from ``headq_core/templates/plugin/*.tmpl`` (package data) with
:class:`string.Template`.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template
from typing import Literal

import attrs

from headq_core.errors import HeadqError

Kind = Literal["key", "value"]

NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
TEMPLATES = "templates/plugin"


class ScaffoldError(HeadqError, ValueError):
    """A plugin name or target folder ``headq new-plugin`` cannot use."""


@attrs.frozen
class PluginNames:
    """The names one method's distribution uses, derived from the method name."""

    name: str  # the method name in specs: "rtn"
    kind: Kind

    @property
    def distribution(self) -> str:
        return "headq-" + self.name.replace("_", "-")

    @property
    def package(self) -> str:
        return "headq_" + self.name

    @property
    def classname(self) -> str:
        return "".join(part.capitalize() for part in self.name.split("_"))


def plugin_files(name: str, kind: Kind, *, core_version: str = "0.1") -> dict[str, str]:
    """The files of the distribution for method ``name`` of ``kind``: relative path -> text."""
    if not NAME.fullmatch(name):
        raise ScaffoldError(
            f"plugin name {name!r} must be 1 to 32 lower-case letters, digits and underscores, starting "
            "with a letter (it is the method's name in specs and part of the package name)"
        )
    if kind not in ("key", "value"):
        raise ScaffoldError(f"kind must be 'key' or 'value', got {kind!r}")
    names = PluginNames(name, kind)
    is_key = kind == "key"
    summary = "round-to-nearest affine codes per token in groups of channels, fp16 scale and minimum"
    fields = {
        "name": name,
        "kind": kind,
        "kind_text": "key quantizer" if is_key else "value policy",
        "distribution": names.distribution,
        "package": names.package,
        "classname": names.classname,
        "title": names.classname,
        "core_version": core_version,
        "summary": summary,
        "summary_sentence": f"{'Keys' if is_key else 'Values'} as {summary}.",
        "base": "KeyQuantizer" if is_key else "ValuePolicy",
        "core_imports": "KeyQuantizer, MethodConfig, hookimpl"
        if is_key
        else "MethodConfig, ValuePolicy, hookimpl",
        "suffix": "Keys" if is_key else "Values",
        "tensor_name": "keys" if is_key else "values",
        "extra_param": "" if is_key else "\n        sq_attention: torch.Tensor | None = None,",
        "hook": "register_key_quantizers" if is_key else "register_value_policies",
        "adder": "add_key_quantizer" if is_key else "add_value_policy",
        "getter": "key_quantizer" if is_key else "value_policy",
        "cache_args": f'keys="{name}", values="fp16"' if is_key else f'keys="fp16", values="{name}"',
        "bench_args": f"--keys {name} --values fp16" if is_key else f"--keys fp16 --values {name}",
    }
    layout = {
        "pyproject.toml": "pyproject.toml.tmpl",
        "README.md": "README.md.tmpl",
        f"{names.package}/__init__.py": "method.py.tmpl",
        f"{names.package}/py.typed": None,
        f"tests/test_{name}.py": "test_method.py.tmpl",
    }
    folder = resources.files("headq_core").joinpath(TEMPLATES)
    out: dict[str, str] = {}
    for path, template in layout.items():
        text = "" if template is None else folder.joinpath(template).read_text(encoding="utf-8")
        out[path] = Template(text).substitute(fields)
    return out


def write_plugin(name: str, kind: Kind, out_dir: Path, *, core_version: str = "0.1") -> Path:
    """Write the distribution into ``out_dir/headq-NAME``; refuse a folder that is not empty."""
    files = plugin_files(name, kind, core_version=core_version)
    root = out_dir / PluginNames(name, kind).distribution
    if root.exists() and any(root.iterdir()):
        raise ScaffoldError(f"{root} exists and is not empty; choose another name or --out folder")
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root
