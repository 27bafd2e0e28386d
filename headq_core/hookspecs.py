"""The hooks a headq plugin implements. Each receives the :class:`~headq_core.registry.Registry`
and adds to it; every implementation is called (none wins over another), once, when the registry
is first used. A plugin is a module named by an entry point in the ``headq`` group::

    [project.entry-points."headq"]
    mymethod = "my_package.plugin"

and implements any of these hooks with ``@headq_core.hookimpl``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from headq_core.registry import Registry

PROJECT = "headq"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_key_quantizers(registry: Registry) -> None:
    """Add key quantizer classes with ``registry.add_key_quantizer(cls)``.

    ``cls`` subclasses :class:`~headq_core.interfaces.KeyQuantizer` and sets ``name`` and
    ``config_class``. A name another plugin also registers is refused, naming both.
    """


@hookspec
def register_value_policies(registry: Registry) -> None:
    """Add value policy classes with ``registry.add_value_policy(cls)``.

    ``cls`` subclasses :class:`~headq_core.interfaces.ValuePolicy`. Same naming rules as keys.
    """


@hookspec
def register_distortion_metrics(registry: Registry) -> None:
    """Add metrics with ``registry.add_metric(metric)``, a
    :class:`~headq_core.interfaces.DistortionMetric` whose function maps an
    :class:`~headq_core.interfaces.AttentionSample` to a value per (batch, kv_head)."""
