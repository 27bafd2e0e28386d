"""Rendering bench results: the terminal table, Markdown, the JSON file and the bits-vs-PPL plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from headq_core.harness.bench import STREAM_CHECK_TOKENS, resampled_ppl

COLUMNS = (
    ("keys", "keys"),
    ("values", "values"),
    ("bits/elem", "bits"),
    ("× model cache", "memory_ratio"),
    ("decode PPL", "decode_ppl"),
    ("ΔPPL", "delta_ppl"),
    ("excess removed", "excess_removed"),
    ("prefill PPL", "prefill_ppl"),
    ("attn KL", "attn_kl"),
    ("Fisher", "fisher"),
    ("key MSE", "key_mse"),
    ("tok/s", "decode_tokens_per_s"),
)


def _cell(row: dict[str, Any], key: str) -> str:
    if key == "bits":
        return f"{row['bits']['all']['total']:.2f}"
    if key == "memory_ratio":  # the cache's bytes over what the model's own cache holds
        model = row.get("model_cache_bytes")
        return f"{row['cache_bytes'] / model:.2f}" if model else "–"
    value = row.get(key, row.get("metrics", {}).get(key))
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        note = row.get("excess_note") if key == "excess_removed" else None
        return f"– ({note})".replace(" | ", " / ") if note else "–"
    se = row.get(f"{key}_se")
    if key == "excess_removed":
        pm = f" ± {100 * se:.0f}" if se is not None else ""
        return f"{100 * value:.0f}%{pm} of {row['excess_baseline']}".replace(
            " | ", " / "
        )  # no pipes in a cell
    if key in ("decode_ppl", "prefill_ppl"):
        return f"{value:.2f}" + (f" ± {se:.2f}" if se is not None else "")
    if key == "delta_ppl":
        return f"{value:+.2f}" + (f" ± {se:.2f}" if se is not None else "")
    if key == "decode_tokens_per_s":
        return f"{value:.1f}"
    return f"{value:.3g}"


def rows_table(result: dict[str, Any]) -> list[list[str]]:
    return [[_cell(row, key) for _, key in COLUMNS] for row in result["rows"]]


def versus(row: dict[str, Any], reference: dict[str, Any] | None, *, paired: bool = False) -> str:
    """How a row's decode PPL compares with the same row of a reference run: the difference, and
    whether it is within the spread (or "–").

    paired: both runs scored the same windows (:func:`same_windows`), so the spread is that of the
    difference itself over the same resamples of the windows; otherwise the two runs' spreads
    combined, which is wider wherever the windows' difficulty moves both rows alike."""
    if reference is None:
        return "–"
    diff = row["decode_ppl"] - reference["decode_ppl"]
    windows = len(row.get("window_nll") or [])
    if paired and windows >= 2 and windows == len(reference.get("window_nll") or []):
        se = float((resampled_ppl(row) - resampled_ppl(reference)).std())
        return f"{diff:+.2f} ({'within' if abs(diff) <= se else 'beyond'} the paired spread ± {se:.2f})"
    se_a, se_b = row.get("decode_ppl_se"), reference.get("decode_ppl_se")
    if se_a is None or se_b is None:
        return f"{diff:+.2f}"
    combined = math.hypot(se_a, se_b)
    return f"{diff:+.2f} ({'within' if abs(diff) <= combined else 'beyond'} the spread ± {combined:.2f})"


def same_windows(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two bench results scored the same tokens: one model, one text, one windowing."""
    cut = ("prefix", "scored", "windows")
    return (
        a.get("model", {}).get("fingerprint") == b.get("model", {}).get("fingerprint")
        and a.get("text") == b.get("text")
        and all(a["windowing"].get(k) == b["windowing"].get(k) for k in cut)
    )


def stream_gap_line(result: dict[str, Any]) -> str | None:
    """One sentence on how far one-pass decode scoring is from token-by-token streaming, or None."""
    gaps = [(row["stream_gap_pct"], row) for row in result["rows"] if row.get("stream_gap_pct") is not None]
    if not gaps:
        return None
    worst, row = max(gaps, key=lambda g: abs(g[0]))
    return (
        f"One-pass decode scoring against token-by-token streaming (the first {STREAM_CHECK_TOKENS} scored tokens of "
        f"the first window): the streamed PPL differs "
        f"by {min(g for g, _ in gaps):+.2f}% to {max(g for g, _ in gaps):+.2f}% (largest: {row['keys']} | "
        f"{row['values']}, {worst:+.2f}%); read differences between rows smaller than that as within the spread."
    )


def row_label(row: dict[str, Any]) -> str:
    """``keys | values``, or a peer row's one name (the same in both columns)."""
    return str(row["keys"]) if row.get("peer") else f"{row['keys']} | {row['values']}"


def peer_lines(result: dict[str, Any], *, skipped: bool = True) -> list[str]:
    """What a peer row is and how it was measured, and (``skipped``) each peer left out and why."""
    peers = [row for row in result["rows"] if row.get("peer")]
    lines = []
    if peers:
        packages = sorted({row["peer"]["package"] for row in peers if row["peer"].get("package")})
        lines.append(
            "Peer rows run transformers' own QuantizedCache"
            + (f" ({', '.join(packages)})" if packages else "")
            + " on the same windows and batches, its scored tokens fed one at a time (it cannot emulate "
            "streaming in one pass); bits count its stored codes, each group's scale and zero point, and "
            "its full-precision residual window; prefill PPL, the streaming check and the distortion "
            "metrics need headq's cache (–)."
        )
    if skipped:
        lines += [f"Skipped peer {s['peer']}: {s['reason']}." for s in result.get("peers_skipped") or []]
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The results table and the metric/KL correlations as Markdown, with the run's settings."""
    w = result["windowing"]
    lines = [
        f"Model `{result['model']['name']}` ({result['model']['fingerprint']}), text `{result['text']['name']}` "
        f"({result['text']['tokens']} tokens). Decode perplexity over {w['windows']} windows of "
        f"{w['prefix']} prefill + {w['scored']} scored tokens; full-precision window {result['cache']['window']}, "
        f"sinks {result['cache']['sinks']}. Bits per element count every stored byte (K and V averaged); "
        "± is the spread over windows (standard deviation over bootstrap resamples of the windows, the same "
        "resamples for every row).",
        "",
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows_table(result)]
    gap = stream_gap_line(result)
    if gap:
        lines += ["", gap]
    for line in peer_lines(result):
        lines += ["", line]
    corr = result.get("correlation_with_attn_kl") or {}
    if corr:
        lines += ["", "Spearman correlation with attention KL across (layer, head, combination) cells:", ""]
        lines += ["| metric | ρ |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in sorted(corr.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"headq bench · {result['model']['name']} · {result['text']['name']}")
    for name, _ in COLUMNS:
        table.add_column(name, justify="left" if name in ("keys", "values") else "right")
    for cells in rows_table(result):
        table.add_row(*cells)
    console.print(table)
    gap = stream_gap_line(result)
    if gap:
        console.print(gap, highlight=False)
    for line in peer_lines(result, skipped=False):  # the console said so when it skipped them
        console.print(line, highlight=False, markup=False)
    corr = result.get("correlation_with_attn_kl") or {}
    if corr:
        console.print(
            "Spearman ρ with attention KL: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(corr.items()))
        )


PANELS = (
    ("keys only (values exact)", "K", "keys", "key bits per element"),
    ("keys and values", "K+V", "all", "bits per element, keys and values averaged"),
)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both bits and perplexity (lower is better), by bits."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def plot(results: list[dict[str, Any]], path: Path) -> Path:
    """Decode perplexity against bits per element: K-only rows against the key bits, rows that
    quantize values against the bits of keys and values, each panel with its Pareto front and the
    exact model's perplexity; one series per file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    from headq_core.harness.bench import EXACT, row_kind

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (title, kind, bits_of, xlabel) in zip(axes, PANELS, strict=True):
        for i, result in enumerate(results):
            color = f"C{i}"
            rows = result["rows"]
            exact = next((r for r in rows if (r["keys"], r["values"]) == EXACT), None)
            if exact is not None:
                ax.axhline(exact["decode_ppl"], color=color, linestyle=":", linewidth=1, label=None)
            mine = [
                r
                for r in rows
                if (r["keys"], r["values"]) != EXACT and _panel(row_kind(r["keys"], r["values"])) == kind
            ]
            points = [(r["bits"][bits_of]["total"], r["decode_ppl"]) for r in mine]
            if not points:
                continue
            ax.scatter(
                *zip(*points, strict=True), color=color, label=result.get("label") or result["model"]["name"]
            )
            front = pareto_front(points)
            ax.step(*zip(*front, strict=True), where="post", color=color, alpha=0.5, linewidth=1)
            for r, (x, y) in zip(mine, points, strict=True):
                ax.annotate(
                    row_label(r),
                    (x, y),
                    fontsize=6,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("decode perplexity (dotted: exact cache)")
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))  # plain numbers: 24, not 2.4x10^1
        ax.grid(alpha=0.3)
        if len(results) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def _panel(kind: str) -> str:
    return "K" if kind == "K" else "K+V"


def write_outputs(result: dict[str, Any], out_dir: Path, stem: str = "bench") -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / f"{stem}.json",
        "markdown": out_dir / f"{stem}.md",
        "plot": out_dir / f"{stem}.png",
    }
    paths["json"].write_text(json.dumps(result, indent=2, default=_json_default))
    paths["markdown"].write_text(markdown(result))
    plot([result], paths["plot"])
    return paths


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def load_result(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(Path(path).read_text())
    if "rows" not in data or "windowing" not in data:
        raise ValueError(f"{path} is not a headq bench result (no 'rows' or 'windowing')")
    data.setdefault("label", Path(path).stem)
    return data
