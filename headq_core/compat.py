"""What differs between the transformers releases headq supports.

transformers 5.24 renamed the cache argument of ``forward`` and ``generate`` from
``past_key_values`` to ``cache`` (the old name warns, and goes in 5.40 for ``forward``, 6.0 for
``generate``); earlier releases know only the old name. :func:`cache_kwargs` gives whichever the
installed release and the model's own ``forward`` take.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _forward_takes_cache(forward: Any) -> bool:
    try:
        return "cache" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # a forward without a signature: the old name is the safe one
        return False


def cache_argument(model: Any) -> str:
    """``"cache"`` where ``model``'s forward takes it (transformers >= 5.24), else ``"past_key_values"``."""
    forward = getattr(type(model), "forward", None)
    return "cache" if forward is not None and _forward_takes_cache(forward) else "past_key_values"


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword that hands ``cache`` to ``model(...)`` or ``model.generate(...)``.

    ``model.generate(ids, **cache_kwargs(model, cache))`` runs without a deprecation warning on
    every transformers release headq supports.
    """
    return {cache_argument(model): cache}
