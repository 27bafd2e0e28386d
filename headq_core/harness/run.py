"""Running a bench end to end: load, cut windows, measure every combination, write the outputs."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import torch
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from headq_core.errors import HeadqError, SpecError
from headq_core.harness.bench import (
    EXACT,
    OPTIONAL_STAGES,
    Combination,
    calibration_methods,
    canonical,
    capture_all,
    default_suite,
    measure,
)
from headq_core.harness.peers import PeerSpec, check, default_peers, measure_peer, parse_peer
from headq_core.harness.perplexity import CacheSettings, Windowing
from headq_core.harness.report import print_table, write_outputs
from headq_core.harness.shard import Shard, finished, write_part
from headq_core.registry import get_registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@attrs.frozen
class BenchOptions:
    model: str | None = None
    text: str | None = None
    combinations: tuple[Combination, ...] = ()
    windowing: Windowing = Windowing()
    window: int = 0
    sinks: int = 0
    diag_windows: int = 2
    baseline: Combination | None = Combination("kivi:bits=2", "kivi:bits=2")  # per row kind: see finish()
    calibration: Path | None = None
    skip: frozenset[str] = frozenset()
    peers: tuple[PeerSpec, ...] = ()  # rows of transformers' QuantizedCache (harness.peers)
    device_map: str | None = None  # from_pretrained's: "auto" spreads the layers over every GPU

    @classmethod
    def from_cli(
        cls,
        *,
        model: str | None,
        text: str | None,
        keys: list[str],
        values: list[str],
        suite: Path | None,
        prefix: int | None,
        scored: int | None,
        windows: int | None,
        batch: int,
        window: int | None,
        sinks: int | None,
        diag_windows: int,
        baseline: tuple[str, str],
        calibration: Path | None = None,
        skip: list[str] | None = None,
        prefill_chunk: int | None = None,
        peers: list[str] | None = None,
        device_map: str | None = None,
    ) -> BenchOptions:
        """Flags override the suite file's [bench] table, which overrides the defaults.

        Peer rows come from ``--peer``, else the suite's ``peers`` list, else the default suite's
        (quanto at 4 and 2 bits, where optimum-quanto is installed) when the method rows are the
        default suite's too.
        """
        settings: dict[str, Any] = {}
        combos: list[Combination] = []
        if suite is not None:
            settings, combos = read_suite(suite)
        if keys or values:
            combos = [Combination(k, v) for k in keys or ["fp16"] for v in values or ["fp16"]]
        suite_peers = settings.get("peers", [])
        if not isinstance(suite_peers, list) or not all(isinstance(p, str) for p in suite_peers):
            raise HeadqError(f'{suite}: [bench] peers must be a list of peer specs, e.g. ["quanto:bits=2"]')
        peer_specs = [parse_peer(p) for p in peers or suite_peers]
        if not combos:
            combos = default_suite()
            if not peers and "peers" not in settings:
                peer_specs = default_peers()

        def pick(flag: Any, key: str, default: Any) -> Any:
            return flag if flag is not None else settings.get(key, default)

        windowing = Windowing(
            prefix=pick(prefix, "prefix", 512),
            scored=pick(scored, "scored", 256),
            windows=pick(windows, "windows", 8),
            batch=batch,
            prefill_chunk=pick(prefill_chunk, "prefill_chunk", None),
        )
        return cls(
            model=pick(model, "model", None),
            text=pick(text, "text", None),
            combinations=tuple(combos),
            windowing=windowing,
            window=pick(window, "window", 0),
            sinks=pick(sinks, "sinks", 0),
            diag_windows=diag_windows,
            baseline=Combination(*baseline),
            calibration=calibration,
            skip=_stages(skip if skip is not None else settings.get("skip", [])),
            peers=tuple(dict.fromkeys(peer_specs)),
            device_map=pick(device_map, "device_map", None),
        )


def exact_warnings(cache: Any, length: int) -> list[str]:
    """Why a cache would store every token of a ``length``-token sequence exact, if it would."""
    out = []
    for kind, method in (("keys", cache.key_method), ("values", cache.value_method)):
        if method.stores_exactly(torch.float16):
            continue
        held = cache.sinks + cache.window + method.block_tokens
        if held > length:
            out.append(
                f"{kind} ({method.spec}) encode {method.block_tokens} tokens at a time after {cache.sinks} sinks "
                f"and a window of {cache.window}: every token of a {length}-token window stays exact, and the "
                "row measures no quantization"
            )
    return out


def _stages(names: list[str]) -> frozenset[str]:
    unknown = sorted(set(names) - set(OPTIONAL_STAGES))
    if unknown:
        raise HeadqError(
            f"cannot skip {', '.join(unknown)}: the optional stages are {', '.join(OPTIONAL_STAGES)}"
        )
    return frozenset(names)


def read_suite(path: Path) -> tuple[dict[str, Any], list[Combination]]:
    """A TOML suite: an optional [bench] table of settings and [[rows]] of keys/values specs."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise HeadqError(f"cannot read suite file {path}: {err}") from err
    rows = data.get("rows", [])
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and "keys" in r and "values" in r for r in rows
    ):
        raise HeadqError(f"{path}: every [[rows]] entry needs 'keys' and 'values' specs")
    return dict(data.get("bench", {})), [Combination(str(r["keys"]), str(r["values"])) for r in rows]


def environment() -> dict[str, Any]:
    registry = get_registry()
    plugins = sorted(
        {
            f"{e.source.distribution}=={e.source.version}"
            for kind in ("key", "value", "metric")
            for e in registry.entries(kind)
        }
    )
    versions: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "headq-core", "headq-kernels"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": versions,
        "plugins": plugins,
    }


CALIBRATION_TOKENS = 8192  # ``headq calibrate``'s default, and the bench's on demand
CALIBRATION_LENGTH = 512


def calibrate_with_progress(
    loaded: Any,
    text: Any,
    methods: list[tuple[str, Any]],
    console: Console,
    *,
    tokens: int = CALIBRATION_TOKENS,
    length: int = CALIBRATION_LENGTH,
) -> Any:
    """Fit ``methods`` on ``tokens`` tokens of ``text`` in passes of ``length``, with a progress bar
    in a terminal and one line per stage (with its rate and time) in a log."""
    from headq_core.calibration import calibrate
    from headq_core.harness.texts import token_windows, tokenize

    ids = tokenize(loaded.tokenizer, text.text)
    windows = token_windows(ids, length - 1, 1, max(1, tokens // length))
    with Progress(console=console) as progress:
        task = progress.add_task("calibrating", total=sum(w.shape[-1] for w in windows))

        def stage(line: str) -> None:
            progress.update(task, description=line)
            if not console.is_terminal:
                console.log(line, highlight=False)

        return calibrate(
            loaded.model,
            windows,
            methods,
            model_name=loaded.name,
            fingerprint=loaded.fingerprint,
            text_name=text.name,
            text_sha256=text.sha256,
            progress=lambda n: progress.advance(task, n),
            stage=stage,
        )


def calibration_on_demand(loaded: Any, methods: list[tuple[str, Any]], console: Console) -> Any:
    """The artifact ``methods`` need on the default calibration text: fitted the first time (about
    a minute of statistics plus each method's fit on this machine type), then read from the cache
    directory, keyed by the model's fingerprint, the text's hash and the methods' specs."""
    import hashlib
    import json

    from headq_core.calibration import Calibration
    from headq_core.harness.loading import cache_dir
    from headq_core.harness.texts import load_text

    text = load_text(None, role="calibration")
    specs = sorted(f"{kind}:{method.spec}" for kind, method in methods)
    key = json.dumps([loaded.fingerprint, text.sha256, specs, CALIBRATION_TOKENS, CALIBRATION_LENGTH])
    path = cache_dir() / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        console.print(f"calibration for {', '.join(specs)}: {path} (cached)", highlight=False)
        return Calibration.load(path, loaded.model.config)
    console.print(
        f"calibrating {', '.join(specs)} on {text.name} ({CALIBRATION_TOKENS} tokens), once: the artifact is "
        f"kept at {path}",
        highlight=False,
    )
    artifact = calibrate_with_progress(loaded, text, methods, console)
    artifact.save(path)
    return artifact


def _stage_reporter(progress: Progress, task: Any, console: Console, label: str) -> Callable[[str], None]:
    """The callback that shows a row's stage: on the live bar, or one log line per stage in a file."""

    def say(stage: str) -> None:
        progress.update(task, description=f"{label}: {stage}")
        if not console.is_terminal:
            console.log(f"{label}: {stage}", highlight=False)

    return say


def run_bench(
    options: BenchOptions, *, out_dir: Path, stem: str = "bench", console: Console | None = None
) -> dict[str, Any]:
    """Measure every row and write the outputs; returns the result. Under a launcher
    (:class:`~headq_core.harness.shard.Shard`) this process measures its share of the rows and
    writes them as a part for ``headq merge``; it returns the part."""
    from headq_core.harness.loading import load_model
    from headq_core.harness.texts import load_text, token_windows, tokenize

    console = console or Console()
    shard = Shard.from_env()
    started = time.time()
    combos = [canonical(c) for c in options.combinations]
    if (EXACT[0], EXACT[1]) not in [(c.keys, c.values) for c in combos]:
        combos.insert(0, Combination(*EXACT))
    combos.sort(key=lambda c: (c.keys, c.values) != EXACT)  # the reference first
    seen: set[tuple[str, str]] = set()
    combos = [c for c in combos if not ((c.keys, c.values) in seen or seen.add((c.keys, c.values)))]  # type: ignore[func-returns-value]
    baseline = None
    if options.baseline is not None:
        try:
            baseline = canonical(options.baseline)
        except SpecError:
            baseline = None

    with console.status("loading model and text"):
        device_map = options.device_map or (shard.device_map() if shard else None)
        loaded = load_model(options.model, device_map=device_map)
        text = load_text(options.text, role="eval")
        ids = tokenize(loaded.tokenizer, text.text)
        w = options.windowing
        windows = [row[0] for row in token_windows(ids, w.prefix, w.scored, w.windows)]

    calibration = None
    if options.calibration is not None:
        from headq_core.calibration import Calibration

        calibration = Calibration.load(options.calibration, loaded.model.config)
    elif methods := calibration_methods(combos):
        calibration = calibration_on_demand(loaded, methods, console)

    # Build every cache once before measuring anything: a missing calibration or a bad spec fails now.
    for combo in combos:
        settings = CacheSettings(combo.keys, combo.values, options.window, options.sinks, calibration)
        cache = settings.build(loaded.model.config)
        for warning in exact_warnings(cache, w.length):
            console.print(f"[yellow]warning[/yellow] {combo.label}: {warning}", highlight=False)
    peers, skipped = [], []
    for peer in options.peers:
        with console.status(f"preparing {peer.label}"):  # optimum-quanto may build its CPU extension once
            reason = check(peer, loaded.model.config, loaded.model.device)
        if reason is None:
            peers.append(peer)
        else:
            skipped.append({"peer": str(peer), "reason": reason})
            console.print(f"[yellow]skipped[/yellow] {peer.label}: {escape(reason)}", highlight=False)

    units: list[Combination | PeerSpec] = [*combos, *peers]
    mine = shard.rows(len(units)) if shard else list(range(len(units)))
    rows: list[dict[str, Any]] = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("capturing exact attention", total=len(mine))
        diagnosed = [] if "distortion" in options.skip else windows[: options.diag_windows]
        captured = capture_all(loaded.model, diagnosed) if any(i < len(combos) for i in mine) else []
        for unit in (units[i] for i in mine):
            say = _stage_reporter(progress, task, console, unit.label)
            if isinstance(unit, PeerSpec):
                rows.append(measure_peer(loaded.model, windows, unit, w, skip=options.skip, progress=say))
            else:
                row = measure(
                    loaded.model,
                    windows,
                    unit,
                    w,
                    window=options.window,
                    sinks=options.sinks,
                    calibration=calibration,
                    diag_windows=options.diag_windows,
                    captured=captured,
                    skip=options.skip,
                    progress=say,
                )
                rows.append(row)
            progress.advance(task)
    result = {
        "format": "headq-bench/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": time.time() - started,
        "model": {
            "name": loaded.name,
            "fingerprint": loaded.fingerprint,
            "layers": loaded.model.config.num_hidden_layers,
        },
        "text": {"name": text.name, "sha256": text.sha256, "tokens": int(ids.shape[-1])},
        "windowing": attrs.asdict(w),
        "cache": {"window": options.window, "sinks": options.sinks},
        "baseline": attrs.asdict(baseline) if baseline else None,
        "calibration": calibration.metadata if calibration is not None else None,
        "diagnostics": {"windows": options.diag_windows, "positions_per_window": 16},
        "skipped": sorted(options.skip),
        "peers_skipped": skipped,
        "environment": environment(),
        "rows": rows,
    }
    if shard is not None:
        path = write_part(result, shard, mine, len(units), shard.part_path(out_dir, stem))
        console.print(
            f"wrote {path}: rows {mine} of {len(units)}, part {shard.rank} of {shard.world}; when every "
            f"process is done: headq merge {Path(out_dir) / stem}.rank*.json",
            highlight=False,
        )
        return result
    result = finished(result)
    print_table(result, console)
    paths = write_outputs(result, out_dir, stem)
    console.print("wrote " + ", ".join(str(p) for p in paths.values()), highlight=False)
    return result
