"""The bench pipeline on a tiny model: rows, derived columns, outputs, suites and compare."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from headq_core.cli import app
from headq_core.errors import HeadqError
from headq_core.harness.bench import Combination, capture_all, finish, measure
from headq_core.harness.perplexity import Windowing
from headq_core.harness.report import load_result, markdown, write_outputs
from headq_core.harness.run import BenchOptions, read_suite


@pytest.fixture(scope="module")
def result() -> dict:
    model = tiny_model("llama", attn="headq")
    generator = torch.Generator().manual_seed(2)
    windows = [torch.randint(0, 128, (96,), generator=generator) for _ in range(2)]
    windowing = Windowing(prefix=64, scored=32, windows=2, batch=2)
    captured = capture_all(model, windows[:1])
    combos = [
        Combination("fp16", "fp16"),
        Combination("kivi:bits=2", "fp16"),
        Combination("kivi:bits=1", "fp16"),
        Combination("kivi:bits=2", "kivi:bits=2"),
    ]
    rows = [
        measure(model, windows, c, windowing, diag_windows=1, captured=captured, speed_steps=2)
        for c in combos
    ]
    extra = finish(rows, Combination("kivi:bits=2", "kivi:bits=2"))
    return {
        "model": {"name": "tiny-llama", "fingerprint": "test", "layers": 2},
        "text": {"name": "random", "sha256": "-", "tokens": 192},
        "windowing": {"prefix": 64, "scored": 32, "windows": 2, "batch": 2},
        "cache": {"window": 0, "sinks": 0},
        "rows": rows,
        **extra,
    }


def test_rows_carry_consistent_numbers(result) -> None:
    exact, kivi2, kivi1, kivi2kv = result["rows"]
    assert exact["delta_ppl"] == 0 and math.isnan(exact["excess_removed"])
    # each kind of row against the baseline of its kind: K-only rows against KIVI-2 keys alone,
    # K+V rows against KIVI-2 keys and values (before, every row against the K-only baseline)
    assert math.isnan(kivi2["excess_removed"]) and kivi2["excess_note"] == "the baseline"
    assert math.isnan(kivi2kv["excess_removed"]) and kivi2kv["excess_note"] == "the baseline"
    assert kivi1["excess_baseline"] == "kivi:bits=2 | fp16"
    if kivi2["delta_ppl"] > 0:
        assert kivi1["excess_removed"] == pytest.approx(1 - kivi1["delta_ppl"] / kivi2["delta_ppl"])
    else:  # a baseline with no excess has nothing to remove
        assert math.isnan(kivi1["excess_removed"]) and kivi1["excess_note"] == "the baseline has no excess"
    assert kivi2kv["bits"]["all"]["total"] < kivi2["bits"]["all"]["total"] < exact["bits"]["all"]["total"]
    for row in result["rows"]:
        parts = row["cache_bytes_by_part"]
        assert row["cache_bytes"] == sum(sum(p.values()) for p in parts.values())
        assert set(row["metrics"]) >= {"attn_kl", "fisher", "key_mse"}
        assert row["decode_tokens_per_s"] > 0
    # The exact row equals the plain model up to float32 rounding of the logits (KL ~ 1e-16; see
    # EXACT_TOLERANCE in test_metrics.py); quantization moves KL by orders of magnitude more.
    assert exact["metrics"]["attn_kl"] < 1e-12 and exact["metrics"]["key_mse"] == 0
    assert kivi1["metrics"]["attn_kl"] > kivi2["metrics"]["attn_kl"] > 1e-6
    assert "fisher" in result["correlation_with_attn_kl"]


def test_every_row_reports_its_one_pass_to_streaming_gap(result) -> None:
    """The streaming check scores the first window token by token too: the exact cache agrees
    with its one-pass scoring to float rounding, and the table says how far the rows are apart."""
    from headq_core.harness.report import stream_gap_line

    gaps = [row["stream_gap_pct"] for row in result["rows"]]
    assert all(math.isfinite(g) for g in gaps)
    assert abs(gaps[0]) < 1e-3  # the exact row: the same attention either way
    line = stream_gap_line(result)
    assert line is not None and "token-by-token streaming" in line
    assert line in markdown(result)


def test_outputs_are_written_and_compare_renders_them(result, tmp_path: Path) -> None:
    paths = write_outputs(result, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert [r["keys"] for r in data["rows"]] == [r["keys"] for r in result["rows"]]
    assert paths["plot"].stat().st_size > 1000
    md = paths["markdown"].read_text()
    assert md == markdown(result) and md.count("\n| ") >= 4
    assert load_result(paths["json"])["label"] == "bench"
    copy = tmp_path / "other.json"
    copy.write_text(paths["json"].read_text())
    out = CliRunner().invoke(app, ["compare", str(paths["json"]), str(copy)])
    assert out.exit_code == 0, out.output
    assert "other" in out.output and (tmp_path / "compare.png").exists()


def test_compare_rejects_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    out = CliRunner().invoke(app, ["compare", str(bad)])
    assert out.exit_code == 2 and "not a headq bench result" in out.output


def test_suite_files_and_flag_precedence(tmp_path: Path) -> None:
    suite = tmp_path / "suite.toml"
    suite.write_text(
        '[bench]\nwindows = 3\nprefix = 100\n\n[[rows]]\nkeys = "kivi:bits=2"\nvalues = "fp16"\n'
    )
    settings, rows = read_suite(suite)
    assert settings == {"windows": 3, "prefix": 100} and rows == [Combination("kivi:bits=2", "fp16")]
    options = BenchOptions.from_cli(
        model=None, text=None, keys=[], values=[], suite=suite, prefix=None, scored=None, windows=5,
        batch=2, window=None, sinks=None, diag_windows=1, baseline=("kivi", "fp16"),
    )  # fmt: skip
    assert options.windowing.windows == 5 and options.windowing.prefix == 100
    assert options.combinations == (Combination("kivi:bits=2", "fp16"),)
    grid = BenchOptions.from_cli(
        model=None, text=None, keys=["fp16", "kivi"], values=["fp16", "kivi:bits=4"], suite=None, prefix=None,
        scored=None, windows=None, batch=2, window=None, sinks=None, diag_windows=1, baseline=("kivi", "fp16"),
    )  # fmt: skip
    assert len(grid.combinations) == 4
    suite.write_text('[[rows]]\nkeys = "kivi"\n')
    with pytest.raises(HeadqError, match="needs 'keys' and 'values'"):
        read_suite(suite)


def test_skipped_stages_leave_their_columns_empty(result, tmp_path: Path) -> None:
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, attn_implementation="headq",
        )
    ).eval()  # fmt: skip
    windows = [torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(2))]
    windowing = Windowing(prefix=64, scored=32, windows=1, batch=1)
    skip = frozenset({"prefill", "distortion", "speed"})
    row = measure(model, windows, Combination("kivi:bits=2", "fp16"), windowing, skip=skip)
    assert math.isfinite(row["decode_ppl"]) and row["bits"]["keys"]["total"] < 16
    assert row["prefill_ppl"] is None and row["decode_tokens_per_s"] is None and row["metrics"] == {}
    table = markdown({**result, "rows": [row]})
    (line,) = [line for line in table.splitlines() if line.startswith("| kivi")]
    assert line.count("–") >= 3  # prefill PPL, attention KL, tok/s

    suite = tmp_path / "suite.toml"
    suite.write_text('[bench]\nskip = ["speed"]\n\n[[rows]]\nkeys = "kivi"\nvalues = "fp16"\n')
    flags = dict(model=None, text=None, keys=[], values=[], suite=suite, prefix=None, scored=None,
                 windows=None, batch=1, window=None, sinks=None, diag_windows=1, baseline=("kivi", "fp16"))  # fmt: skip
    assert BenchOptions.from_cli(**flags).skip == {"speed"}
    assert BenchOptions.from_cli(**flags, skip=["prefill"]).skip == {"prefill"}
    with pytest.raises(HeadqError, match="optional stages are prefill, distortion, speed"):
        BenchOptions.from_cli(**flags, skip=["perplexity"])


def test_excess_removed_is_against_the_baseline_of_the_rows_kind() -> None:
    rows = [
        {"keys": k, "values": v, "decode_ppl": ppl, "metrics_per_layer_head": {}}
        for k, v, ppl in [
            ("fp16", "fp16", 10.0), ("kivi", "fp16", 12.0), ("headq", "fp16", 11.0),
            ("kivi", "kivi", 14.0), ("headq", "a2", 12.0), ("fp16", "a2", 11.0),
        ]
    ]  # fmt: skip
    finish(rows, Combination("kivi", "kivi"))
    by = {(r["keys"], r["values"]): r for r in rows}
    assert by["headq", "fp16"]["excess_removed"] == pytest.approx(0.5)  # 1 of the K-only baseline's 2
    assert by["headq", "fp16"]["excess_baseline"] == "kivi | fp16"
    assert by["headq", "a2"]["excess_removed"] == pytest.approx(0.5)  # 2 of the K+V baseline's 4
    assert by["headq", "a2"]["excess_baseline"] == "kivi | kivi"
    assert by["fp16", "a2"]["excess_note"] == "baseline fp16 | kivi not in the run"
    assert math.isnan(by["fp16", "a2"]["excess_removed"])


def test_the_plot_puts_each_kind_of_row_on_its_own_axis(tmp_path) -> None:
    """K-only rows against their key bits, K+V rows against all bits, with Pareto fronts: a
    K-only row at ~18 bits no longer shares an axis with 3-bit K+V rows."""
    from headq_core.harness.report import pareto_front, plot

    assert pareto_front([(3.0, 20.0), (2.0, 25.0), (4.0, 21.0), (5.0, 16.0)]) == [
        (2.0, 25.0),
        (3.0, 20.0),
        (5.0, 16.0),
    ]

    def row(keys: str, values: str, key_bits: float, all_bits: float, ppl: float) -> dict:
        return {"keys": keys, "values": values, "decode_ppl": ppl,
                "bits": {"keys": {"total": key_bits}, "all": {"total": all_bits}}}  # fmt: skip

    rows = [row("fp16", "fp16", 32, 32, 16.5), row("kivi", "fp16", 2.5, 17.3, 20.6),
            row("kivi3", "fp16", 3.5, 17.8, 16.9), row("kivi", "kivi", 2.5, 3.6, 23.8)]  # fmt: skip
    path = plot([{"rows": rows, "model": {"name": "m"}}], tmp_path / "p.png")
    assert path.stat().st_size > 10_000
    import matplotlib.pyplot as plt
    from PIL import Image

    width, height = Image.open(path).size
    assert width > 1.5 * height  # two panels side by side
    plt.close("all")


def test_the_bench_warns_where_a_row_would_quantize_nothing() -> None:
    """``kivi:group=1000000`` or ``window=10**9`` store every token exact (32 bits/elem at float32)
    while the spec reads as 2 bits: the bench says so for the window length it measures."""
    from headq_core import QuantizedKVCache
    from headq_core.harness.run import exact_warnings

    assert not exact_warnings(QuantizedKVCache("kivi:bits=2", "kivi:bits=2", window=32), 768)
    [warning] = exact_warnings(QuantizedKVCache("kivi:group=1000000", "fp16"), 768)
    assert "keys (kivi:group=1000000)" in warning and "stays exact" in warning
    assert len(exact_warnings(QuantizedKVCache("kivi", "kivi", window=10**9), 768)) == 2


def test_describe_reads_the_head_dim_from_a_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """HeadQ's side code is a rank: its bits per element depend on the model's head_dim (0.75 at
    64, 0.375 at 128): describe --model states them for that model."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from headq_core import cli
    from headq_core.harness import loading
    from headq_core.testing import model_config

    config = model_config(head_dim=128)
    monkeypatch.setattr(
        loading, "load_model", lambda name: SimpleNamespace(model=SimpleNamespace(config=config))
    )
    out = CliRunner().invoke(
        cli.app, ["describe", "headq", "--kind", "key", "--model", "mine"], env={"COLUMNS": "300"}
    )
    assert out.exit_code == 0, out.output
    assert (
        "mine: head_dim 128" in out.output and "at head_dim 128" in out.output and "side 0.375" in out.output
    )
    both = CliRunner().invoke(cli.app, ["describe", "headq", "--model", "mine", "--head-dim", "64"])
    assert both.exit_code != 0


def test_the_default_suite_has_a_row_for_every_installed_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every installed key and value method has a row, a third-party one too (its default spec
    behind KIVI-2 keys, or the rows it states); the rows issue 19 asks for are there, at matched bits."""
    import copy

    from headq_scorecorr.headq import HALF_BIT

    from headq_core.harness import bench
    from headq_core.registry import get_registry

    registry = copy.copy(get_registry())
    registry._entries = dict(registry._entries)
    kivi_values = type(registry.value_policy("kivi"))

    class Rounded(kivi_values):  # type: ignore[misc,valid-type]
        name = "rounded"

    class Stated(kivi_values):  # type: ignore[misc,valid-type]
        name = "stated"
        suite_rows = (("kivi:bits=4", "stated:bits=4"), ("kivi:bits=2", "not-installed"))

    registry.add_value_policy(Rounded)
    registry.add_value_policy(Stated)
    monkeypatch.setattr(bench, "get_registry", lambda: registry)
    rows = [(row.keys, row.values) for row in bench.default_suite()]
    in_rows = {"key": {k.split(":")[0] for k, _ in rows}, "value": {v.split(":")[0] for _, v in rows}}
    for kind in ("key", "value"):
        assert set(registry.names(kind)) <= in_rows[kind]
    assert ("kivi:bits=2", "rounded") in rows and ("kivi:bits=4", "stated:bits=4") in rows
    assert not any("not-installed" in row[1] for row in rows)  # a row naming a missing method is left out
    for wanted in [
        ("fp16", "fp16"), ("kivi:bits=2", "fp16"), (HALF_BIT, "fp16"), ("kivi3", "fp16"),
        ("kivi:bits=2", "kivi:bits=2"), (HALF_BIT, "a2"), ("gsrq:bits=1", "gsrq:bits=1"),
    ]:  # fmt: skip
        assert wanted in rows
    assert len(rows) == len(set(rows))


class _Characters:
    """A tokenizer of one id per character (for a tiny model's vocabulary)."""

    def __call__(self, text: str, **_: object) -> dict:
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_methods_that_learn_are_calibrated_once_then_read_from_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The bench fits HeadQ on the default calibration text the first time it needs it, keeps the
    artifact under the cache directory, and reads it the next time (another spec: another fit)."""
    import io

    from rich.console import Console

    from headq_core.harness.bench import calibration_methods
    from headq_core.harness.loading import LoadedModel
    from headq_core.harness.run import calibration_on_demand

    monkeypatch.setenv("HEADQ_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="headq",
    )  # fmt: skip
    loaded = LoadedModel(LlamaForCausalLM(config).eval(), _Characters(), "tiny", "0123456789abcdef")
    combos = [
        Combination("headq", "fp16"),
        Combination("kivi:bits=2", "kivi:bits=2"),
        Combination("headq", "a2"),
    ]
    methods = calibration_methods(combos)
    assert [(kind, str(m.spec).split(":")[0]) for kind, m in methods] == [("key", "headq")]
    log = io.StringIO()
    console = Console(file=log, width=200)
    first = calibration_on_demand(loaded, methods, console)
    assert "calibrating" in log.getvalue() and "(cached)" not in log.getvalue()
    assert first.metadata["tokens"] > 4000 and first.metadata["text"] == "wikitext-2-valid"
    second = calibration_on_demand(loaded, methods, console)
    assert "(cached)" in log.getvalue()
    assert first.tensors.keys() == second.tensors.keys()
    assert all(torch.equal(first.tensors[k], second.tensors[k]) for k in first.tensors)
    other = calibration_methods([Combination("headq:rank=4", "fp16")])
    calibration_on_demand(loaded, other, console)
    assert len(list((tmp_path / "calibration").glob("*.safetensors"))) == 2


def test_the_spread_over_windows_is_paired_and_matches_the_delta_method() -> None:
    """± on every PPL figure: a bootstrap over windows, the same resamples for every row. A row
    whose windows score exactly as the exact row's has no ΔPPL spread (paired), the PPL spread of
    40 windows is the delta method's PPL·σ/√n to within 15%, excess removed gets one too, and
    compare says whether two runs differ by more than their spreads."""
    from headq_core.harness.bench import spread
    from headq_core.harness.report import _cell, versus

    gen = torch.Generator().manual_seed(0)
    per_token = 3.0 + 0.3 * torch.randn(40, generator=gen, dtype=torch.float64)

    def row(keys: str, values: str, shift: float, base: str | None = None) -> dict:
        nll = ((per_token + shift) * 256).tolist()
        ppl = math.exp(sum(nll) / (40 * 256))
        return {"keys": keys, "values": values, "window_nll": nll, "scored_tokens": 40 * 256, "decode_ppl": ppl,
                "excess_baseline": base, "excess_removed": 0.5 if base else math.nan}  # fmt: skip

    exact, same = row("fp16", "fp16", 0.0), row("kivi:bits=8", "fp16", 0.0, "kivi | fp16")
    base, half = row("kivi", "fp16", 0.2), row("headq", "fp16", 0.1, "kivi | fp16")
    rows = [exact, same, base, half]
    spread(rows, exact, {(r["keys"], r["values"]): r for r in rows})
    assert same["delta_ppl_se"] == 0.0 and half["delta_ppl_se"] > 0
    delta_method = exact["decode_ppl"] * float(per_token.std()) / math.sqrt(40)
    assert exact["decode_ppl_se"] == pytest.approx(delta_method, rel=0.15)
    assert 0 < half["excess_removed_se"] < 0.1  # the per-token shift is the same in every window
    assert versus(half, half).startswith("+0.00 (within") and "beyond" in versus(base, exact)
    assert _cell(exact, "decode_ppl") == f"{exact['decode_ppl']:.2f} ± {exact['decode_ppl_se']:.2f}"
    half["delta_ppl"] = half["decode_ppl"] - exact["decode_ppl"]
    assert "% ± " in _cell(half, "excess_removed") and " ± " in _cell(half, "delta_ppl")


def test_compare_pairs_runs_that_scored_the_same_windows() -> None:
    """Two runs on the same windows: a row that is worse by the same small amount in every window
    is beyond the spread of the difference, though well within the two runs' spreads combined;
    runs on another text, model or windowing are not paired."""
    from headq_core.harness.report import same_windows, versus

    gen = torch.Generator().manual_seed(1)
    per_token = 3.0 + 0.3 * torch.randn(8, generator=gen, dtype=torch.float64)

    def row(shift: float) -> dict:
        nll = ((per_token + shift) * 256).tolist()
        return {"keys": "kivi", "values": "fp16", "window_nll": nll, "scored_tokens": 8 * 256,
                "decode_ppl": math.exp(sum(nll) / (8 * 256)), "decode_ppl_se": 2.0}  # fmt: skip

    before, after = row(0.0), row(0.01)
    assert "beyond the paired spread" in versus(after, before, paired=True)
    assert "within the spread" in versus(after, before)
    run = {"model": {"fingerprint": "f"}, "text": {"name": "t", "sha256": "s", "tokens": 9},
           "windowing": {"prefix": 512, "scored": 256, "windows": 8, "batch": 4}}  # fmt: skip
    assert same_windows(run, {**run, "windowing": {**run["windowing"], "batch": 1}})
    assert not same_windows(run, {**run, "text": {**run["text"], "name": "t (last 10%)"}})
    assert not same_windows(run, {**run, "windowing": {**run["windowing"], "windows": 4}})
