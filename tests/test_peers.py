"""Peer rows: transformers' own QuantizedCache measured by the bench beside the methods."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import random_ids, tiny_model
from rich.console import Console
from typer.testing import CliRunner

from headq_core.cli import app
from headq_core.errors import HeadqError, SpecError
from headq_core.harness import peers
from headq_core.harness.bench import Combination
from headq_core.harness.peers import PeerSettings, measure_peer, parse_peer
from headq_core.harness.perplexity import CacheSettings, Windowing, perplexity
from headq_core.harness.report import markdown
from headq_core.harness.run import BenchOptions, run_bench

needs_quanto = pytest.mark.skipif(
    peers.installed_version("optimum-quanto") is None, reason="optimum-quanto is not installed"
)
# Flushes the 16-token residual window once within the 31 decoded tokens: 80 of 95 tokens end quantized.
SMALL = "q_group_size=16,residual_length=16"


def test_peer_specs_parse_in_transformers_terms_and_round_trip() -> None:
    spec = parse_peer("quanto:residual_length=16,nbits=2")
    assert spec == parse_peer("quanto:bits=2,residual_length=16")  # bits is short for nbits
    assert str(spec) == "quanto:bits=2,residual_length=16" and parse_peer(str(spec)) == spec
    assert (
        spec.kwargs() == {"nbits": 2, "residual_length": 16}
        and spec.label == "peer quanto:bits=2,residual_length=16"
    )
    assert parse_peer("hqq:bits=3,axis_key=1").kwargs() == {"nbits": 3, "axis_key": 1}
    assert str(parse_peer("fp8")) == "fp8"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("quant:bits=2", "unknown peer backend 'quant'.*quanto, hqq, fp8.*Did you mean 'quanto'"),
        ("quanto:group=32", "no parameter 'group' \\(its parameters: bits, q_group_size"),
        ("quanto:bits=3", "bits must be one of 2, 4, got 3"),
        ("hqq:bits=5", "bits must be one of 1, 2, 3, 4, 8, got 5"),
        ("quanto:bits=two", "bits must be an integer, got two"),
        ("quanto:residual_length=0", "residual_length must be at least 1"),
        ("quanto:axis_key=1", "axis_key must be one of 0, -1"),
        ("quanto:bits=2,nbits=4", "sets bits twice"),
        ("fp8:bits=8", "peer fp8 has no parameter 'bits' \\(its parameters: none\\)"),
    ],
)
def test_bad_peer_specs_are_clear_errors(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_peer(text)


def test_the_cli_refuses_a_bad_peer_before_loading_anything() -> None:
    out = CliRunner().invoke(app, ["bench", "--peer", "quanto:bits=3"], env={"COLUMNS": "200"})
    assert out.exit_code == 2 and "bits must be one of 2, 4, got 3" in out.output


def test_which_peers_a_bench_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--peer, else the suite's [bench] peers, else the default suite's (quanto 4 and 2 bits where
    optimum-quanto is installed) when the method rows are the default suite's."""
    flags: dict[str, Any] = dict(model=None, text=None, keys=[], values=[], suite=None, prefix=None, scored=None,
                                 windows=None, batch=1, window=None, sinks=None, diag_windows=1,
                                 baseline=("kivi", "kivi"))  # fmt: skip
    monkeypatch.setattr(peers, "installed_version", lambda dist: "0.2.7")
    assert [str(p) for p in BenchOptions.from_cli(**flags).peers] == ["quanto:bits=4", "quanto:bits=2"]
    assert BenchOptions.from_cli(**{**flags, "keys": ["kivi"]}).peers == ()
    given = BenchOptions.from_cli(**flags, peers=["hqq:bits=2", "hqq:nbits=2"])
    assert [str(p) for p in given.peers] == ["hqq:bits=2"]  # the same peer once
    suite = tmp_path / "suite.toml"
    suite.write_text('[bench]\npeers = ["fp8"]\n\n[[rows]]\nkeys = "kivi"\nvalues = "fp16"\n')
    assert [str(p) for p in BenchOptions.from_cli(**{**flags, "suite": suite}).peers] == ["fp8"]
    suite.write_text('[bench]\npeers = "fp8"\n')
    with pytest.raises(HeadqError, match="peers must be a list"):
        BenchOptions.from_cli(**{**flags, "suite": suite})
    monkeypatch.setattr(peers, "installed_version", lambda dist: None)
    assert BenchOptions.from_cli(**flags).peers == ()  # no optimum-quanto: no default peers


@needs_quanto
def test_a_quanto_peer_row_runs_through_transformers_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same windows and batches as a method row; the model is handed transformers' QuantizedCache of
    quanto layers at every pass; 4 bits stay close to the exact cache, 2 bits move further; the bits
    count the packed codes, a float32 scale and zero point per 16 elements and the residual."""
    from transformers import QuantizedCache

    model = tiny_model("llama", attn="headq")
    windows = list(random_ids(4, 96))
    windowing = Windowing(prefix=64, scored=32, windows=4, batch=2)
    assert peers.check(parse_peer("quanto:bits=2"), model.config, model.device) is None
    seen: list[Any] = []
    forward = model.forward

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("cache", kwargs.get("past_key_values")))
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    exact = perplexity(model, windows, CacheSettings("fp16", "fp16"), windowing, mode="stream")
    seen.clear()
    rows = {
        bits: measure_peer(
            model, windows, parse_peer(f"quanto:bits={bits},{SMALL}"), windowing, speed_steps=2
        )
        for bits in (4, 2)
    }
    assert seen and all(type(c) is QuantizedCache for c in seen)
    assert {type(layer).__name__ for c in seen for layer in c.layers} == {"QuantoQuantizedLayer"}
    assert len(seen) == 2 * (2 * 32) + 2 * (1 + 2)  # 2 batches of prefill + 31 steps, 2 speed runs of 1 + 2

    def per_token_gap(row: dict) -> float:  # mean |NLL difference| per scored token, against exact
        return (
            sum(abs(a - b) for a, b in zip(row["window_nll"], exact.window_nll, strict=True))
            / row["scored_tokens"]
        )

    four, two = rows[4], rows[2]
    assert math.isfinite(four["decode_ppl"]) and abs(math.log(four["decode_ppl"] / exact.ppl)) < 0.05
    assert 0 < per_token_gap(four) < per_token_gap(two) / 2
    assert four["scored_tokens"] == exact.tokens == 4 * 32
    assert four["peer"]["settings"] == {
        "bits": 4,
        "q_group_size": 16,
        "residual_length": 16,
        "axis_key": 0,
        "axis_value": 0,
    }
    for bits, row in rows.items():  # 80 of 95 tokens quantized, 15 in the float32 residual
        keys = row["bits"]["keys"]
        assert keys["payload"] == pytest.approx(bits * 80 / 95)
        assert keys["scales"] == pytest.approx(2 * 32 / 16 * 80 / 95)
        assert keys["exact"] == pytest.approx(32 * 15 / 95)
        assert row["bits"]["all"]["total"] == pytest.approx(keys["total"])
        assert row["cache_bytes"] == sum(sum(p.values()) for p in row["cache_bytes_by_part"].values())
        assert row["prefill_ppl"] is None and row["metrics"] == {} and row["decode_tokens_per_s"] > 0


class _Characters:
    """A tokenizer of one id per character (for a tiny model's vocabulary)."""

    def __call__(self, text: str, **_: object) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}


def _bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, peer_specs: list[str]) -> tuple[dict, str]:
    from headq_core.harness import loading

    model = tiny_model("llama", attn="headq", max_position_embeddings=512)
    loaded = loading.LoadedModel(model, _Characters(), "tiny", "0123456789abcdef")
    monkeypatch.setattr(loading, "load_model", lambda name, **_: loaded)
    text = tmp_path / "text.txt"
    text.write_text("".join(chr(32 + (7 * i) % 90) for i in range(400)))
    options = BenchOptions(
        text=str(text),
        combinations=(Combination("kivi:bits=2", "kivi:bits=2"),),
        windowing=Windowing(prefix=48, scored=16, windows=2, batch=2),
        skip=frozenset({"prefill", "distortion", "speed", "stream"}),
        peers=tuple(parse_peer(p) for p in peer_specs),
    )
    log = io.StringIO()
    result = run_bench(options, out_dir=tmp_path / "out", console=Console(file=log, width=300))
    return result, log.getvalue()


def test_a_peer_whose_package_is_missing_is_skipped_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(peers, "installed_version", lambda dist: None)
    result, log = _bench(monkeypatch, tmp_path, ["quanto:bits=2", "hqq:bits=4", "fp8"])
    assert "skipped peer quanto:bits=2: transformers' quanto backend needs the optimum-quanto package" in log
    assert "(pip install optimum-quanto or pip install -e '.[peers]')" in log
    assert "skipped peer hqq:bits=4: transformers' hqq backend needs the hqq package" in log
    assert log.lower().count("skipped peer quanto") == 1  # one console line (and a note in the Markdown)
    labels = [row["keys"] for row in result["rows"]]
    assert labels == ["fp16", "kivi", "peer fp8"]  # the rest of the bench runs; fp8 needs no package
    assert [s["peer"] for s in result["peers_skipped"]] == ["quanto:bits=2", "hqq:bits=4"]
    md = (tmp_path / "out" / "bench.md").read_text()
    assert "Skipped peer hqq:bits=4: transformers' hqq backend needs the hqq package" in md


@needs_quanto
def test_peer_rows_are_written_beside_the_methods(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result, log = _bench(monkeypatch, tmp_path, [f"quanto:bits=2,{SMALL}"])
    _, _, peer = result["rows"]
    assert peer["keys"] == peer["values"] == f"peer quanto:bits=2,{SMALL}"
    assert peer["peer"]["package"].startswith("optimum-quanto==") and peer["peer"]["decode"] == "stream"
    assert peer["excess_baseline"] == "kivi | kivi" and "delta_ppl_se" in peer
    line = next(row for row in markdown(result).splitlines() if row.startswith("| peer quanto"))
    assert (
        line.count("–") >= 3
    )  # prefill PPL, attention KL, Fisher, key MSE, tok/s do not apply or were skipped
    assert "Peer rows run transformers' own QuantizedCache (optimum-quanto==" in log
    assert not result["peers_skipped"]


def test_peer_settings_refuse_one_pass_scoring() -> None:
    """transformers' cache cannot emulate streaming: scoring it in one pass would let the scored
    tokens read each other exact, so it is refused rather than measured wrong."""
    model = tiny_model("llama", attn="headq")
    settings = PeerSettings(parse_peer("fp8"))
    with pytest.raises(ValueError, match="score this one in stream mode"):
        perplexity(
            model, list(random_ids(1, 40)), settings, Windowing(prefix=32, scored=8, windows=1), mode="decode"
        )
    with pytest.raises(HeadqError, match="cannot emulate streaming"):
        settings.build(model.config, emulate_streaming=True)
    assert torch.isfinite(torch.tensor(perplexity(model, list(random_ids(1, 40)), settings,
                                                   Windowing(prefix=32, scored=8, windows=1), mode="stream").ppl))  # fmt: skip
