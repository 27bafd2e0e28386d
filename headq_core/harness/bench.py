"""``headq bench``: a grid of (keys, values) combinations on one model and text, measured alike.

Every combination gets decode perplexity (primary), prefill perplexity, the distortion metrics
per layer and head, bits per element from the cache's own accounting, measured cache bytes and a
projection to a long-context shape, and decode speed. The exact cache is always measured first:
every difference is against it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import attrs
import torch

from headq_core.errors import HeadqError
from headq_core.harness.diagnostics import capture_window, distortion, spearman
from headq_core.harness.perplexity import CacheSettings, Windowing, decode_speed, perplexity, window_nll
from headq_core.registry import get_registry

EXACT = ("fp16", "fp16")


@attrs.frozen
class Combination:
    keys: str
    values: str

    @property
    def label(self) -> str:
        return f"{self.keys} | {self.values}"


@attrs.frozen
class LongContextShape:
    """A named model shape to project cache bytes onto."""

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    tokens: int
    batch: int = 1

    @property
    def elements(self) -> int:
        return self.layers * self.kv_heads * self.head_dim * self.tokens * self.batch


PROJECTIONS = {
    "llama-3-8b@32k": LongContextShape("llama-3-8b@32k", 32, 8, 128, 32768),
    "llama-3-8b@128k": LongContextShape("llama-3-8b@128k", 32, 8, 128, 131072),
}


def canonical(combo: Combination) -> Combination:
    registry = get_registry()
    return Combination(str(registry.resolve("key", combo.keys)), str(registry.resolve("value", combo.values)))


CORE_ROWS = (
    Combination("fp16", "fp16"),
    Combination("kivi:bits=4", "kivi:bits=4"),
    Combination("kivi:bits=2", "fp16"),
    Combination("kivi:bits=2", "kivi:bits=2"),
)


def default_suite() -> list[Combination]:
    """Exact, KIVI-4, KIVI-2 keys alone and with KIVI-2 values, then the rows of every other
    installed method, third-party ones included: those it states (``suite_rows``), else its
    default spec with exact values (a key quantizer) or behind KIVI-2 keys (a value policy).

    A row that names a method which is not installed (HeadQ with A² values, without the A²
    plugin) is left out; methods that learn from data are calibrated by the bench on demand.
    """
    registry = get_registry()
    rows = list(CORE_ROWS)
    for kind in ("key", "value"):
        for entry in registry.entries(kind):
            if entry.name in ("fp16", "kivi"):
                continue
            stated = getattr(entry.obj(), "suite_rows", ())
            default = (entry.name, "fp16") if kind == "key" else ("kivi:bits=2", entry.name)
            rows += [Combination(k, v) for k, v in stated or (default,)]
    out: list[Combination] = []
    for row in rows:
        try:
            registry.resolve("key", row.keys), registry.resolve("value", row.values)
        except HeadqError:
            continue
        if row not in out:
            out.append(row)
    return out


def calibration_methods(combos: list[Combination]) -> list[tuple[str, Any]]:
    """(kind, method) of every method of ``combos`` that learns from data, each spec once."""
    registry = get_registry()
    out: dict[tuple[str, str], Any] = {}
    for combo in combos:
        for kind, spec in (("key", combo.keys), ("value", combo.values)):
            method = registry.key_quantizer(spec) if kind == "key" else registry.value_policy(spec)
            if method.calibration_needs:
                out.setdefault((kind, str(method.spec)), method)
    return [(kind, method) for (kind, _), method in sorted(out.items())]


def project(bits: dict[str, dict[str, float]], exact_tokens: float, shape: LongContextShape) -> float:
    """Bytes of K and V at ``shape``: per-element costs carried over, the exact window re-sized.

    bits: the cache's ``bits_per_element()``; exact_tokens: tokens per (layer, row) held exact.
    """
    total = 0.0
    for kind in ("keys", "values"):
        per_element = bits[kind]["total"] - bits[kind]["exact"]
        total += per_element / 8 * shape.elements
    window_elements = (
        shape.layers * shape.kv_heads * shape.head_dim * shape.batch * min(exact_tokens, shape.tokens)
    )
    return total + 2 * 2 * window_elements  # K and V, 2 bytes each


def _exact_tokens(cache: Any) -> float:
    layers = cache.quantized_layers()
    if not layers:
        return 0.0
    layer = layers[0]
    return float(layer.k.sink_len() + (0 if layer.k.window is None else layer.k.window.shape[-2]))


def measure(
    model: Any,
    windows: list[torch.Tensor],
    combo: Combination,
    windowing: Windowing,
    *,
    window: int = 0,
    sinks: int = 0,
    calibration: Any = None,
    diag_windows: int = 2,
    positions_per_window: int = 16,
    captured: list[Any] | None = None,
    speed_steps: int = 32,
    skip: frozenset[str] = frozenset(),
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Every number of one row of the table; stages named in `skip` (see OPTIONAL_STAGES) are left out."""
    settings = CacheSettings(combo.keys, combo.values, window=window, sinks=sinks, calibration=calibration)
    start = time.perf_counter()
    say = progress or (lambda _: None)
    say("decode perplexity")
    decode = perplexity(model, windows, settings, windowing, mode="decode")
    prefill_ppl = None
    if "prefill" not in skip:
        say("prefill perplexity")
        prefill_ppl = perplexity(model, windows, settings, windowing, mode="prefill").ppl
    stream_gap = None
    if "stream" not in skip:
        say("streaming check")
        stream_gap = streaming_gap(model, windows[0][None], settings, windowing)
    cache = decode.caches[0]
    bits = cache.bits_per_element()
    means: dict[str, torch.Tensor] = {}
    if "distortion" not in skip:
        say("distortion")
        table = distortion(
            model,
            windows[:diag_windows],
            settings,
            windowing.prefix,
            positions_per_window=positions_per_window,
            captured=captured,
        )
        means = table.means()
    speed = None
    if "speed" not in skip:
        say("decode speed")
        speed = decode_speed(model, windows[0][None, : windowing.prefix], settings, steps=speed_steps)
    exact_tokens = _exact_tokens(cache)
    return {
        "keys": combo.keys,
        "values": combo.values,
        "decode_ppl": decode.ppl,
        "prefill_ppl": prefill_ppl,
        "stream_gap_pct": stream_gap,
        "scored_tokens": decode.tokens,
        "window_nll": list(decode.window_nll),  # per window, for the spread over windows
        "bits": bits,
        "cache_bytes": cache.nbytes(),
        "cache_bytes_by_part": cache.nbytes_by_part(),
        "cache_tokens": cache.get_seq_length(),
        "cache_batch": min(windowing.batch, len(windows)),
        "fp16_bytes": _fp16_bytes(cache),
        "model_cache_bytes": model_cache_bytes(cache),
        "projected_bytes": {name: project(bits, exact_tokens, shape) for name, shape in PROJECTIONS.items()},
        "metrics": {name: float(v.mean()) for name, v in means.items()},
        "metrics_per_layer_head": {name: v.tolist() for name, v in means.items()},
        "decode_tokens_per_s": speed,
        "harness_tokens_per_s": decode.tokens_per_second,
        "seconds": time.perf_counter() - start,
    }


STREAM_CHECK_TOKENS = 64  # scored tokens of the first window that the streaming check decodes one by one


def streaming_gap(model: Any, ids: torch.Tensor, settings: CacheSettings, windowing: Windowing) -> float:
    """How far one-pass decode scoring (every scored token in one pass, each reading the cache as
    streaming would leave it) is from true token-by-token streaming on the first
    STREAM_CHECK_TOKENS scored tokens of one window ``ids`` (1, n): 100 * (PPL_stream /
    PPL_one_pass - 1). Not zero in float32: a few codes flip with the order of operations."""
    prefix, chunk = windowing.prefix, windowing.prefill_chunk
    ids = ids[:, : prefix + STREAM_CHECK_TOKENS]
    one_pass, _ = window_nll(model, ids, prefix, settings, "decode", chunk)
    streamed, _ = window_nll(model, ids, prefix, settings, "stream", chunk)
    return 100 * math.expm1(float(streamed.sum() - one_pass.sum()) / (ids.shape[-1] - prefix))


def _fp16_bytes(cache: Any) -> int:
    return sum(2 * layer.elements() * 2 for layer in cache.quantized_layers())


def model_cache_bytes(cache: Any) -> int:
    """Bytes the model's own ``DynamicCache`` would hold for the same tokens: keys and values in
    the model's dtype, every token of a full-attention layer, the last ``sliding_window - 1`` of a
    sliding one."""
    total = 0
    for layer in cache.quantized_layers():
        held = layer.length - layer.k.dropped
        if not layer.is_initialized or held <= 0:
            continue
        per_token = layer.elements() // held  # batch x kv heads x head_dim
        tokens = layer.length if layer.sliding_window is None else min(layer.length, layer.sliding_window - 1)
        total += 2 * per_token * tokens * torch.empty((), dtype=layer.dtype).element_size()
    return total


def row_kind(keys: str, values: str) -> str:
    """ "K" (values exact), "V" (keys exact) or "K+V"."""
    if values == EXACT[1]:
        return "K"
    return "V" if keys == EXACT[0] else "K+V"


def baselines(baseline: Combination) -> dict[str, Combination]:
    """The baseline of each row kind: its keys alone, its values alone, both."""
    return {
        "K": Combination(baseline.keys, EXACT[1]),
        "V": Combination(EXACT[0], baseline.values),
        "K+V": Combination(baseline.keys, baseline.values),
    }


def finish(rows: list[dict[str, Any]], baseline: Combination | None) -> dict[str, Any]:
    """Add ΔPPL and % excess removed to each row; correlations of metrics with KL.

    A row's excess removed is measured against the baseline of its own kind (K-only rows against
    the baseline's keys with exact values, K+V rows against the baseline's keys and values), and
    the row says which (``excess_baseline``), or why there is none (``excess_note``).
    """
    exact = next((r for r in rows if (r["keys"], r["values"]) == EXACT), None)
    found = {(r["keys"], r["values"]): r for r in rows}
    for row in rows:
        row["delta_ppl"] = row["decode_ppl"] - exact["decode_ppl"] if exact else math.nan
        row["excess_removed"] = math.nan
        row["excess_baseline"] = row["excess_note"] = None
        if exact is None or row is exact:
            continue
        if baseline is None:
            row["excess_note"] = "no baseline"
            continue
        base_combo = baselines(baseline)[row_kind(row["keys"], row["values"])]
        row["excess_baseline"] = base_combo.label
        base = found.get((base_combo.keys, base_combo.values))
        if base is None:
            row["excess_note"] = f"baseline {base_combo.label} not in the run"
        elif base is row:
            row["excess_note"] = "the baseline"
        elif base["decode_ppl"] - exact["decode_ppl"] <= 0:
            row["excess_note"] = "the baseline has no excess"
        else:
            row["excess_removed"] = 1 - row["delta_ppl"] / (base["decode_ppl"] - exact["decode_ppl"])
    spread(rows, exact, found)
    return {"correlation_with_attn_kl": correlations(rows), "bootstrap": BOOTSTRAP}


BOOTSTRAP = 2000  # resamples of the windows for the spread of every PPL figure


def resampled_ppl(row: dict[str, Any]) -> torch.Tensor:
    """A row's decode PPL on each of BOOTSTRAP resamples of its windows, (BOOTSTRAP,) float64:
    the same resamples for every row of as many windows (rows on the same windows pair up)."""
    n = len(row["window_nll"])
    pick = torch.randint(0, n, (BOOTSTRAP, n), generator=torch.Generator().manual_seed(0))
    per_token = torch.tensor(row["window_nll"], dtype=torch.float64) * n / row["scored_tokens"]
    return per_token[pick].mean(-1).exp()


def spread(
    rows: list[dict[str, Any]], exact: dict[str, Any] | None, found: dict[Any, dict[str, Any]]
) -> None:
    """The spread over windows of each row's decode PPL, ΔPPL and excess removed: the standard
    deviation over BOOTSTRAP resamples of the windows, the same resamples for every row (rows are
    measured on the same windows, so their differences are paired). Adds ``*_se`` keys; a figure
    without per-window numbers (an old result) gets none."""
    if not rows or any(len(r.get("window_nll") or []) != len(rows[0].get("window_nll") or []) for r in rows):
        return
    n = len(rows[0].get("window_nll") or [])
    if n < 2:
        return
    ppl = {}
    for row in rows:
        ppl[id(row)] = resampled_ppl(row)
        row["decode_ppl_se"] = float(ppl[id(row)].std())
    if exact is None:
        return
    for row in rows:
        if row is exact:
            continue
        delta = ppl[id(row)] - ppl[id(exact)]
        row["delta_ppl_se"] = float(delta.std())
        base = found.get(tuple(row["excess_baseline"].split(" | "))) if row.get("excess_baseline") else None
        if base is not None and not math.isnan(row["excess_removed"]):
            base_delta = ppl[id(base)] - ppl[id(exact)]
            kept = base_delta > 0
            if bool(kept.any()):
                row["excess_removed_se"] = float((1 - delta[kept] / base_delta[kept]).std())


def correlations(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Spearman correlation of each metric with attention KL across (layer, head, row) cells."""
    cells = [r for r in rows if (r["keys"], r["values"]) != EXACT and r["metrics_per_layer_head"]]
    if not cells:
        return {}
    names = cells[0]["metrics_per_layer_head"].keys()
    kl = torch.tensor([r["metrics_per_layer_head"]["attn_kl"] for r in cells]).flatten()
    return {
        name: spearman(torch.tensor([r["metrics_per_layer_head"][name] for r in cells]).flatten(), kl)
        for name in names
        if name != "attn_kl"
    }


OPTIONAL_STAGES = ("prefill", "distortion", "speed", "stream")


def capture_all(model: Any, windows: list[torch.Tensor]) -> list[Any]:
    """Exact attention inputs for the diagnostic windows, shared by every row."""
    return [capture_window(model, ids[None]) for ids in windows]
