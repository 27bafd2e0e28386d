"""Every hook, implemented by a throwaway distribution found through its entry point, registers what
it adds under that distribution's name (``tests/test_docs.py`` requires a test per hook)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from headq_core import get_registry

PLUGIN = """
import torch

from headq_core import DistortionMetric, hookimpl
from headq_core.builtin import ExactKeys, ExactValues


class HookKeys(ExactKeys):
    name = "hookkeys"


class HookValues(ExactValues):
    name = "hookvalues"


def _zero(sample):
    return torch.zeros(sample.logits.shape[:2])


@hookimpl
def register_key_quantizers(registry):
    registry.add_key_quantizer(HookKeys)


@hookimpl
def register_value_policies(registry):
    registry.add_value_policy(HookValues)


@hookimpl
def register_distortion_metrics(registry):
    registry.add_metric(DistortionMetric("hookmetric", _zero, "always zero"))
"""

MODULE = "headq_hooks_plugin"


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[None]:
    """The plugin laid out as pip would: a module and a ``*.dist-info`` with the entry point."""
    (tmp_path / f"{MODULE}.py").write_text(PLUGIN)
    info = tmp_path / "headq_hooks-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: headq-hooks\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[headq]\nhooks = {MODULE}\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(MODULE, None)
        importlib.invalidate_caches()
        get_registry(reload=True)


@pytest.mark.parametrize(
    ("kind", "name"), [("key", "hookkeys"), ("value", "hookvalues"), ("metric", "hookmetric")]
)
def test_each_hook_registers_under_its_distribution(installed: None, kind: str, name: str) -> None:
    registry = get_registry(reload=True)
    entry = registry.entry(kind, name)
    assert (entry.source.distribution, entry.source.version, entry.source.plugin) == (
        "headq-hooks",
        "1.0",
        "hooks",
    )
    assert not [b for b in registry.broken if b.distribution == "headq-hooks"]


def test_a_metric_registered_by_a_plugin_is_used_by_name(installed: None) -> None:
    from headq_core import AttentionSample

    metric = get_registry(reload=True).metric("hookmetric")
    x = torch.zeros(2, 3, 4, 8)
    logits = torch.zeros(2, 3, 1, 4)
    sample = AttentionSample(
        query=x[..., :1, :], keys=x, keys_hat=x, values=x, values_hat=x, logits=logits,
        logits_hat=logits, probs=logits, probs_hat=logits, mask=torch.ones(2, 1, 1, 4, dtype=torch.bool),
    )  # fmt: skip
    assert metric(sample).shape == (2, 3) and metric.description == "always zero"


def test_nothing_of_the_hook_plugin_remains() -> None:
    registry = get_registry()
    assert "hookkeys" not in registry.names("key") and "hookmetric" not in registry.names("metric")
