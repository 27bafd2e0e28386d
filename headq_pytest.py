"""The headq pytest plugin: the conformance kit as a fixture, for plugin authors' test suites.

Installed with headq-core through the ``pytest11`` entry point, so any test suite in an
environment with headq has it, with no conftest::

    def test_my_method_conforms(headq_conformance):
        headq_conformance("mymethod:bits=2")

The fixture runs :func:`~headq_core.testing.check_key_quantizer` and/or
:func:`~headq_core.testing.check_value_policy` on the spec, for every side (keys, values) its name
is registered on, and fails with the conformance kit's message. headq itself is imported only when
the fixture is used: this module sits outside the ``headq_core`` package, whose import (torch,
transformers) would otherwise come with every pytest run in the environment.
"""

from __future__ import annotations

from typing import Any, Literal

import pytest

Side = Literal["key", "value"]


class Conformance:
    """What the ``headq_conformance`` fixture gives: call it with a spec."""

    def __call__(self, spec: str, *, kind: Side | None = None, **options: Any) -> list[Side]:
        """Check ``spec`` against the conformance kit; returns the sides checked.

        Parameters
        ----------
        spec:
            A method spec, ``"mymethod"`` or ``"mymethod:bits=2"``.
        kind:
            ``"key"`` or ``"value"`` to check one side; by default every side the name is
            registered on (a name registered on neither fails, listing broken plugins).
        options:
            Passed on to the checks: ``registry``, ``head_dim``, ``snr_floor``,
            ``model_config``, ``calibration``, ``windows``.
        """
        from headq_core.registry import get_registry
        from headq_core.spec import parse_spec
        from headq_core.testing import check_key_quantizer, check_value_policy

        registry = options.get("registry") or get_registry()
        name = parse_spec(spec).name
        sides: list[Side] = [kind] if kind is not None else []
        if kind is None:
            sides = [side for side in ("key", "value") if name in registry.names(side)]
        if not sides:
            broken = "".join(f"\n  {b.plugin} ({b.distribution}): {b.error}" for b in registry.broken)
            pytest.fail(
                f"no key quantizer or value policy named {name!r} is installed. Keys: "
                f"{', '.join(registry.names('key'))}; values: {', '.join(registry.names('value'))}."
                + (f"\nPlugins that failed to load:{broken}" if broken else ""),
                pytrace=False,
            )
        for side in sides:
            check = check_key_quantizer if side == "key" else check_value_policy
            check(spec, **options)
        return sides


@pytest.fixture
def headq_conformance() -> Conformance:
    """Run the headq conformance kit on a method spec: ``headq_conformance("mymethod:bits=2")``."""
    return Conformance()
