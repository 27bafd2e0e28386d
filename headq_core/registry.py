"""Plugin discovery and the name registry of methods and metrics.

Plugins are modules named by entry points in the ``headq`` group. They load on first use, one
at a time: a plugin that fails to import or to register is recorded with its distribution and
error, and the others still load. Two plugins that register one name make that name unusable,
with an error naming both distributions. ``HEADQ_DISABLE_PLUGINS`` (comma-separated entry point
or distribution names, or ``all``) keeps plugins from loading.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pluggy

from headq_core import hookspecs
from headq_core.errors import HeadqError, PluginError, SpecError, suggest
from headq_core.interfaces import DistortionMetric, KeyQuantizer, Method, MethodConfig, ValuePolicy
from headq_core.spec import Spec, parse_spec

ENTRY_POINT_GROUP = "headq"
DISABLE_ENV = "HEADQ_DISABLE_PLUGINS"
CORE_DISTRIBUTION = "headq-core"


@attrs.frozen
class Source:
    """Where a registered name came from."""

    plugin: str
    distribution: str
    version: str


@attrs.frozen
class Entry:
    kind: str  # "key", "value" or "metric"
    name: str
    obj: Any
    source: Source


@attrs.frozen
class BrokenPlugin:
    plugin: str
    distribution: str
    error: str
    detail: str


class Registry:
    """Every key quantizer, value policy and metric known by name, with where it came from."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}
        self._conflicts: dict[tuple[str, str], list[Source]] = {}
        self.broken: list[BrokenPlugin] = []
        self.disabled: list[str] = []
        self._source = Source("headq_core.builtin", CORE_DISTRIBUTION, _version(CORE_DISTRIBUTION))

    # --- registration (called from hook implementations) ---------------------------------

    def add_key_quantizer(self, cls: type[KeyQuantizer]) -> None:
        self._add("key", cls, KeyQuantizer)

    def add_value_policy(self, cls: type[ValuePolicy]) -> None:
        self._add("value", cls, ValuePolicy)

    def add_metric(self, metric: DistortionMetric) -> None:
        if not isinstance(metric, DistortionMetric):
            raise TypeError(f"add_metric takes a DistortionMetric, got {metric!r}")
        self._put(Entry("metric", metric.name, metric, self._source))

    def _add(self, kind: str, cls: Any, base: type) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(f"expected a subclass of {base.__name__}, got {cls!r}")
        for attr in ("name", "config_class"):
            if not hasattr(cls, attr):
                raise TypeError(f"{cls.__name__} must set the class attribute {attr!r}")
        method: Any = cls
        if not _is_spec_name(method.name):
            raise TypeError(
                f"{cls.__name__}.name must be a name a spec can use, like 'kivi'; got {method.name!r}"
            )
        if not (isinstance(method.config_class, type) and issubclass(method.config_class, MethodConfig)):
            raise TypeError(
                f"{cls.__name__}.config_class must subclass MethodConfig, got {method.config_class!r}"
            )
        try:
            method.config_class()
        except (TypeError, ValueError) as err:
            raise TypeError(f"{cls.__name__}: its config rejects its own defaults: {err}") from err
        self._put(Entry(kind, method.name, cls, self._source))

    def _put(self, entry: Entry) -> None:
        key = (entry.kind, entry.name)
        if key in self._conflicts:
            self._conflicts[key].append(entry.source)
        elif key in self._entries:
            self._conflicts[key] = [self._entries.pop(key).source, entry.source]
        else:
            self._entries[key] = entry

    @contextmanager
    def _registering(self, source: Source) -> Iterator[None]:
        previous, self._source = self._source, source
        try:
            yield
        finally:
            self._source = previous

    # --- lookup ----------------------------------------------------------------------------

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in [*self._entries, *self._conflicts] if k == kind)

    def conflicts(self) -> list[str]:
        """One line per name that several plugins register (the name is unusable until one goes)."""
        return [self._conflict_message(kind, name) for kind, name in sorted(self._conflicts)]

    def _conflict_message(self, kind: str, name: str) -> str:
        sources = self._conflicts[(kind, name)]
        owners = " and ".join(f"{s.distribution} ({s.plugin})" for s in sources)
        plugins = [s.plugin for s in sources if s.distribution != "headq-core"]
        fix = f"; leave one out with {DISABLE_ENV}={plugins[-1]} or uninstall it" if plugins else ""
        return f"{_KIND_NAMES[kind]} {name!r} is registered by both {owners}{fix}"

    def problems(self) -> list[str]:
        """What keeps a plugin or a name from being used: broken plugins and name clashes."""
        broken = [f"plugin {b.plugin} ({b.distribution}) failed to load: {b.error}" for b in self.broken]
        return broken + self.conflicts()

    def entries(self, kind: str) -> list[Entry]:
        return sorted((e for e in self._entries.values() if e.kind == kind), key=lambda e: e.name)

    def entry(self, kind: str, name: str) -> Entry:
        key = (kind, name)
        if key in self._conflicts:
            raise PluginError(self._conflict_message(kind, name))
        if key not in self._entries:
            known = self.names(kind)
            broken = "".join(
                f"\n  plugin {b.plugin} ({b.distribution}) failed: {b.error}" for b in self.broken
            )
            raise SpecError(
                f"unknown {_KIND_NAMES[kind]} {name!r}.{suggest(name, known)} "
                f"Known: {', '.join(known) or 'none'}.{broken}"
            )
        return self._entries[key]

    def key_quantizer(self, spec: str | Spec | KeyQuantizer) -> KeyQuantizer:
        """A key quantizer built from a spec such as ``kivi:bits=2,group=32``."""
        method: KeyQuantizer = self._build("key", spec, KeyQuantizer)
        return method

    def value_policy(self, spec: str | Spec | ValuePolicy) -> ValuePolicy:
        """A value policy built from a spec such as ``kivi:bits=2``."""
        method: ValuePolicy = self._build("value", spec, ValuePolicy)
        return method

    def metric(self, name: str) -> DistortionMetric:
        metric: DistortionMetric = self.entry("metric", name).obj
        return metric

    def metrics(self) -> list[DistortionMetric]:
        return [e.obj for e in self.entries("metric")]

    def resolve(self, kind: str, spec: str | Spec) -> Spec:
        """The canonical spec: nested specs resolved, defaults dropped, values normalized."""
        spec_out: Spec = self._build(kind, spec, Method).spec
        return spec_out

    def _build(self, kind: str, spec: Any, base: Any) -> Any:
        if isinstance(spec, base):
            return spec
        spec = parse_spec(spec)
        cls = self.entry(kind, spec.name).obj
        params = _hoist_nested(self, kind, spec)
        try:  # a plugin's validators may raise other types than the ValueError the base class maps
            config = cls.config_class.from_params(params, method=spec.name)
            return cls(config)
        except HeadqError:
            raise
        except (ValueError, TypeError, ArithmeticError) as err:
            raise SpecError(f"invalid parameters for {spec.name!r}: {type(err).__name__}: {err}") from err


_KIND_NAMES = {"key": "key quantizer", "value": "value policy", "metric": "distortion metric"}


def _is_spec_name(name: object) -> bool:
    """True for a name that parses back to itself as a spec (``kivi``, not ``my method``)."""
    if not isinstance(name, str):
        return False
    try:
        return parse_spec(name) == Spec(name)
    except SpecError:
        return False


def _hoist_nested(registry: Registry, kind: str, spec: Spec) -> dict[str, Any]:
    """Parameters of ``spec``, with nested specs resolved and stray parameters moved back out.

    ``headq:base=kivi:bits=2,rank=8`` parses with ``rank`` inside the nested spec; ``kivi`` does
    not know ``rank``, so it belongs to ``headq``.
    """
    out: dict[str, Any] = {}
    for key, value in spec.params:
        if isinstance(value, Spec):
            inner_cls = registry.entry(kind, value.name).obj
            inner_fields = {f.name for f in inner_cls.config_class.parameters()}
            kept = tuple((k, v) for k, v in value.params if k in inner_fields)
            for k, v in value.params:
                if k not in inner_fields:
                    if k in out or any(k == k2 for k2, _ in spec.params):
                        raise SpecError(f"parameter {k!r} is given twice in {spec}")
                    out[k] = v
            inner = Spec(value.name, kept)
            method = registry._build(kind, inner, Method)
            value = method.spec
        out[key] = value
    return out


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "unknown"


def _disabled_names() -> set[str]:
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


def load_registry() -> Registry:
    """Discover and load every plugin, isolating failures. Usually called through :func:`get_registry`."""
    from headq_core import builtin, metrics

    registry = Registry()
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    sources: dict[str, Source] = {}

    for module in (builtin, metrics):
        manager.register(module, name=module.__name__)
        sources[module.__name__] = registry._source

    disabled = _disabled_names()
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        if "all" in disabled or ep.name in disabled or dist in disabled:
            registry.disabled.append(f"{ep.name} ({dist})")
            continue
        # Two distributions may use one entry point name; each must load (and clash by method name).
        plugin_id = f"{dist}:{ep.name}"
        if manager.has_plugin(plugin_id):
            continue
        try:
            module = ep.load()
            manager.register(module, name=plugin_id)
            manager.check_pending()
        except Exception as err:  # a broken plugin must not take the others down
            if manager.has_plugin(plugin_id):
                manager.unregister(name=plugin_id)
            registry.broken.append(_broken(ep.name, dist, err))
            continue
        sources[plugin_id] = Source(ep.name, dist, ep.dist.version if ep.dist else "unknown")

    hooks = ("register_key_quantizers", "register_value_policies", "register_distortion_metrics")
    for plugin, source in sources.items():
        impls = [
            impl
            for hook_name in hooks
            for impl in getattr(manager.hook, hook_name).get_hookimpls()
            if impl.plugin_name == plugin
        ]
        snapshot = dict(registry._entries), {k: list(v) for k, v in registry._conflicts.items()}
        try:
            with registry._registering(source):
                for impl in impls:
                    impl.function(registry=registry)
        except Exception as err:  # roll back what this plugin added before it failed
            registry._entries, registry._conflicts = snapshot
            registry.broken.append(_broken(source.plugin, source.distribution, err))
    return registry


def _broken(plugin: str, dist: str, err: BaseException) -> BrokenPlugin:
    detail = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    return BrokenPlugin(plugin, dist, f"{type(err).__name__}: {err}", detail)


_REGISTRY: Registry | None = None


def get_registry(*, reload: bool = False) -> Registry:
    """The process-wide registry, loaded on first call."""
    global _REGISTRY
    if _REGISTRY is None or reload:
        _REGISTRY = load_registry()
    return _REGISTRY
