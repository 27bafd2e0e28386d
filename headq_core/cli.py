"""The ``headq`` command line: list and describe methods, run and compare benchmarks."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from headq_core.errors import HeadqError
from headq_core.registry import Registry, get_registry
from headq_core.spec import parse_spec

app = typer.Typer(
    help="KV-cache quantization methods: list, describe, benchmark, compare, new-plugin.",
    no_args_is_help=True,
)
console = Console(width=None if sys.stdout.isatty() else 160)
MODEL_HELP = "smollm2-135m (the default) or gemma3-270m, a HF model id, a folder or a GGUF file"
DEVICE_MAP_HELP = (
    "where the model's layers go, as from_pretrained takes it: auto (spread over every GPU), cuda:1, ..."
)


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}", highlight=False)
    raise typer.Exit(2)


def _params(cls: Any) -> str:
    parts = []
    for field in cls.config_class.parameters():
        default = field.default
        help_text = field.metadata.get("help", "")
        parts.append(f"{field.name}={default}" + (f" ({help_text})" if help_text else ""))
    return "\n".join(parts) or "–"


@app.command("list")
def list_methods() -> None:
    """Every key quantizer, value policy and metric, with parameters and where it comes from."""
    registry = get_registry()
    for kind, title in (("key", "Key quantizers"), ("value", "Value policies")):
        table = Table(title=title, show_lines=True)
        for column in ("name", "parameters (defaults)", "distribution", "summary"):
            table.add_column(column)
        for entry in registry.entries(kind):
            source = f"{entry.source.distribution} {entry.source.version}"
            table.add_row(entry.name, _params(entry.obj), source, entry.obj.summary)
        console.print(table)
    metrics = Table(title="Distortion metrics")
    for column in ("name", "description", "distribution"):
        metrics.add_column(column)
    for entry in registry.entries("metric"):
        metrics.add_row(entry.name, entry.obj.description, entry.source.distribution)
    console.print(metrics)
    where = Table(title="Installed distributions")
    for column in ("distribution", "version", "installed at", "editable"):
        where.add_column(column)
    sources = {
        e.source.distribution: e.source.version
        for k in ("key", "value", "metric")
        for e in registry.entries(k)
    }
    for distribution, version in sorted(sources.items()):
        path, editable = _installed(distribution)
        where.add_row(distribution, version, path, "yes" if editable else "no")
    console.print(where)
    _report_problems(registry)


def _installed(distribution: str) -> tuple[str, bool]:
    """Where a distribution is installed, and whether it is an editable install (its source tree)."""
    import json
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return "not installed (registered in process)", False
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        return str(direct.get("url", "")).removeprefix("file://"), True
    return str(dist.locate_file("")), False


def _report_problems(registry: Registry) -> int:
    """Print broken plugins, name clashes and disabled plugins; the count of problems."""
    problems = registry.problems()
    for line in problems:
        console.print(f"[red]problem[/red] {line}", highlight=False)
    for disabled in registry.disabled:
        console.print(f"[yellow]disabled plugin[/yellow] {disabled}", highlight=False)
    return len(problems)


@app.command()
def check() -> None:
    """Load every plugin; exit non-zero if one failed to load or two claim one name (for CI)."""
    registry = get_registry()
    count = _report_problems(registry)
    names = {kind: len(registry.entries(kind)) for kind in ("key", "value", "metric")}
    summary = f"{names['key']} key quantizers, {names['value']} value policies, {names['metric']} metrics"
    if count:
        console.print(f"{count} problem{'s' if count > 1 else ''}; {summary} usable", highlight=False)
        raise typer.Exit(1)
    console.print(f"all plugins loaded: {summary}", highlight=False)


@app.command()
def describe(
    spec: Annotated[str, typer.Argument(help="a method spec, e.g. kivi:bits=2,group=32")],
    kind: Annotated[str, typer.Option(help="key, value, or both")] = "both",
    head_dim: Annotated[
        int | None, typer.Option(help="head dimension for the bits figure (default 64)")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="read the head dimension from this model (id, folder or GGUF)")
    ] = None,
) -> None:
    """What a method stores and its bits per element at a head dimension (given, or a model's)."""
    if model is not None:
        from headq_core.harness.loading import load_model

        if head_dim is not None:
            _fail(ValueError("give --head-dim or --model, not both"))
        try:
            head_dim = model_head_dim(load_model(model).model.config)
        except HeadqError as err:
            _fail(err)
        console.print(f"{model}: head_dim {head_dim}", highlight=False)
    head_dim = 64 if head_dim is None else head_dim
    registry = get_registry()
    kinds = ("key", "value") if kind == "both" else (kind,)
    if any(k not in ("key", "value") for k in kinds):
        _fail(ValueError(f"--kind must be key, value or both, got {kind!r}"))
    try:
        parsed = parse_spec(spec)
        shown = 0
        for k in kinds:
            if parsed.name not in registry.names(k):
                continue
            method = registry.key_quantizer(parsed) if k == "key" else registry.value_policy(parsed)
            _describe(registry, k, method, head_dim)
            shown += 1
        if not shown:
            registry.entry(kinds[0], parsed.name)  # raises the unknown-name error with suggestions
    except HeadqError as err:
        _fail(err)


def model_head_dim(config: Any) -> int:
    """The head dimension of a model's (text) config."""
    text = config.get_text_config(decoder=True)
    return int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)


def _describe(registry: Registry, kind: str, method: Any, head_dim: int) -> None:
    entry = registry.entry(kind, method.name)
    bits = method.nominal_bits(head_dim)
    console.print(
        f"[bold]{method.spec}[/bold] ({kind} method from {entry.source.distribution})", highlight=False
    )
    console.print(f"  stores: {method.stores()}", highlight=False)
    console.print(f"  tokens per encode unit: {method.block_tokens}", highlight=False)
    if method.block_tokens > 1024:
        console.print(
            f"  [yellow]warning[/yellow]: a sequence shorter than {method.block_tokens} tokens (plus the window and "
            "sinks) is never encoded: it stays exact, at the model's own width",
            highlight=False,
        )
    console.print(
        f"  parameters: {', '.join(f'{k}={v}' for k, v in method.config.to_params(all_fields=True))}"
    )
    if bits:
        detail = ", ".join(f"{part} {value:.3f}" for part, value in bits.items())
        console.print(
            f"  bits per element at head_dim {head_dim}: {sum(bits.values()):.3f} ({detail}); "
            "plus the full-precision window and sinks",
            highlight=False,
        )


@app.command()
def bench(
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    text: Annotated[str | None, typer.Option(help="text name or path; default wikitext-2-test")] = None,
    keys: Annotated[list[str] | None, typer.Option("--keys", help="key spec (repeatable)")] = None,
    values: Annotated[list[str] | None, typer.Option("--values", help="value spec (repeatable)")] = None,
    suite: Annotated[Path | None, typer.Option(help="TOML suite file with [[rows]] keys/values")] = None,
    prefix: Annotated[int | None, typer.Option(help="prefill tokens per window")] = None,
    scored: Annotated[int | None, typer.Option(help="scored tokens per window")] = None,
    windows: Annotated[int | None, typer.Option(help="number of windows")] = None,
    batch: Annotated[int, typer.Option(help="windows per forward pass")] = 4,
    window: Annotated[int | None, typer.Option(help="full-precision recent tokens (R)")] = None,
    sinks: Annotated[int | None, typer.Option(help="exact attention-sink tokens at the start")] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="feed prompts in chunks of this many tokens (bounded memory)")
    ] = None,
    diag_windows: Annotated[int, typer.Option(help="windows used for the distortion metrics")] = 2,
    baseline_keys: Annotated[
        str, typer.Option(help="baseline keys for '% excess removed' (K-only rows: these keys, exact values)")
    ] = "kivi:bits=2",
    baseline_values: Annotated[
        str, typer.Option(help="baseline values for '% excess removed' (K+V rows: both baselines)")
    ] = "kivi:bits=2",
    calibration: Annotated[Path | None, typer.Option(help="calibration artifact (headq calibrate)")] = None,
    out: Annotated[Path, typer.Option(help="output folder for JSON, Markdown and PNG")] = Path("results"),
    name: Annotated[str, typer.Option(help="file stem of the outputs")] = "bench",
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip", help="leave out a secondary stage: prefill, distortion, speed or stream (repeatable)"
        ),
    ] = None,
    peer: Annotated[
        list[str] | None,
        typer.Option(
            "--peer",
            help="a row of transformers' own QuantizedCache: quanto, hqq or fp8 with its settings, e.g. "
            "quanto:bits=2 or hqq:bits=4,q_group_size=32 (repeatable)",
        ),
    ] = None,
    device_map: Annotated[str | None, typer.Option(help=DEVICE_MAP_HELP)] = None,
) -> None:
    """Run a grid of key x value methods on one model and text and write the results table.

    Under torchrun or accelerate launch, each process measures its share of the rows on its own
    GPU and writes NAME.rank{R}.json; `headq merge` makes the one result of them."""
    from headq_core.harness.run import BenchOptions, run_bench

    try:
        options = BenchOptions.from_cli(
            model=model,
            text=text,
            keys=keys or [],
            values=values or [],
            suite=suite,
            prefix=prefix,
            scored=scored,
            windows=windows,
            batch=batch,
            window=window,
            sinks=sinks,
            diag_windows=diag_windows,
            baseline=(baseline_keys, baseline_values),
            calibration=calibration,
            skip=skip,
            prefill_chunk=prefill_chunk,
            peers=peer,
            device_map=device_map,
        )
        run_bench(options, out_dir=out, stem=name, console=console)
    except HeadqError as err:
        _fail(err)


@app.command()
def calibrate(
    out: Annotated[Path, typer.Option(help="where to write the .safetensors artifact")],
    keys: Annotated[
        list[str] | None, typer.Option("--keys", help="key method spec to fit (repeatable)")
    ] = None,
    values: Annotated[
        list[str] | None, typer.Option("--values", help="value method spec to fit (repeatable)")
    ] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    text: Annotated[str | None, typer.Option(help="text name or path; default wikitext-2-valid")] = None,
    tokens: Annotated[int, typer.Option(help="calibration tokens")] = 8192,
    length: Annotated[int, typer.Option(help="tokens per forward pass")] = 512,
    device_map: Annotated[str | None, typer.Option(help=DEVICE_MAP_HELP)] = None,
) -> None:
    """Fit the methods that learn from data (query bases, codebooks) and save an artifact."""
    from headq_core.harness.loading import load_model
    from headq_core.harness.run import calibrate_with_progress
    from headq_core.harness.texts import load_text

    try:
        registry = get_registry()
        methods: list[tuple[str, Any]] = [("key", registry.key_quantizer(k)) for k in keys or []]
        methods += [("value", registry.value_policy(v)) for v in values or []]
        if not methods:
            raise typer.BadParameter("name at least one method with --keys or --values")
        for kind, method in methods:
            if not method.calibration_needs:
                raise typer.BadParameter(f"{kind} method {method.spec} learns nothing from data")
        with console.status("loading model and text"):
            loaded = load_model(model, device_map=device_map)
            loaded_text = load_text(text, role="calibration")
        artifact = calibrate_with_progress(
            loaded, loaded_text, methods, console, tokens=tokens, length=length
        )
        path = artifact.save(out)
        console.print(
            f"wrote {path} ({artifact.metadata['tokens']} tokens, {artifact.metadata['seconds']} s)"
        )
    except HeadqError as err:
        _fail(err)


@app.command()
def merge(
    parts: Annotated[list[Path], typer.Argument(help="the parts of one bench: OUT/NAME.rank*.json")],
    out: Annotated[Path | None, typer.Option(help="output folder (default: the parts' folder)")] = None,
    name: Annotated[
        str | None, typer.Option(help="file stem of the outputs (default: the parts' NAME)")
    ] = None,
) -> None:
    """Merge the parts of a bench run by several processes (torchrun, accelerate launch) into the
    one result a single process writes: JSON, Markdown and plot."""
    from headq_core.harness.report import print_table, write_outputs
    from headq_core.harness.shard import merge_parts

    try:
        result = merge_parts(parts)
    except HeadqError as err:
        _fail(err)
    print_table(result, console)
    stem = name or parts[0].name.split(".rank")[0]
    paths = write_outputs(result, out or parts[0].parent, stem)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False)


@app.command()
def compare(files: Annotated[list[Path], typer.Argument(help="bench JSON files")]) -> None:
    """Render earlier bench results side by side, with one combined plot. Each row's decode PPL
    is compared with the same row of the first file: against the spread of the difference where
    both runs scored the same windows (same model, text and windowing), else their spreads
    combined."""
    from headq_core.harness.report import COLUMNS, load_result, plot, rows_table, same_windows, versus

    try:
        results = [load_result(f) for f in files]
    except (OSError, ValueError) as err:
        _fail(err)
    table = Table(title="headq compare")
    table.add_column("run")
    for column, _ in COLUMNS:
        table.add_column(column)
    table.add_column(f"decode PPL vs {results[0]['label']}")
    first = {(row["keys"], row["values"]): row for row in results[0]["rows"]}
    for result in results:
        paired = same_windows(result, results[0])
        for row, cells in zip(result["rows"], rows_table(result), strict=True):
            reference = first.get((row["keys"], row["values"]))
            mark = "–" if result is results[0] else versus(row, reference, paired=paired)
            table.add_row(result["label"], *cells, mark)
    console.print(table)
    out = files[0].parent / "compare.png"
    plot(results, out)
    console.print(f"plot: {out}")


@app.command("new-plugin")
def new_plugin(
    name: Annotated[str, typer.Argument(help="the method's name in specs, e.g. rtn")],
    kind: Annotated[str, typer.Option(help="key (a key quantizer) or value (a value policy)")] = "key",
    out: Annotated[Path, typer.Option(help="folder to write headq-NAME/ into")] = Path("."),
) -> None:
    """Write a complete plugin distribution for a new method: pyproject, method, conformance tests."""
    from headq_core import __version__
    from headq_core.scaffold import write_plugin

    try:
        if kind not in ("key", "value"):
            raise typer.BadParameter(f"--kind must be key or value, got {kind!r}")
        registry = get_registry()
        if name in registry.names(kind):
            owner = registry.entry(kind, name).source.distribution
            raise typer.BadParameter(
                f"a {kind} method named {name!r} is already installed (from {owner}); two plugins "
                "claiming one name make it unusable, so choose another"
            )
        root = write_plugin(name, "key" if kind == "key" else "value", out, core_version=__version__)
    except HeadqError as err:
        _fail(err)
    console.print(f"wrote {root}", highlight=False)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        console.print(f"  {path.relative_to(root)}", highlight=False)
    console.print(
        f"next: pip install -e {root}; headq describe {name} --kind {kind}; pytest {root}", highlight=False
    )


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())
