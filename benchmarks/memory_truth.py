"""Memory truth: does a KIVI-2 cache make a 4k-token decode of the default model use less memory
than the exact cache? Measured, not computed: the cache's resident tensor bytes (``cache.nbytes()``)
and the process's peak RSS, each case in a fresh subprocess.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_truth.py --tokens 4096 --chunk 32

Each case loads the default model (SmolLM2-135M-Instruct, float32), then feeds the first
``--tokens`` WikiText-2 test tokens through one cache in passes of ``--chunk`` tokens (teacher
forcing: every pass appends to the cache and attends over everything stored, as decoding does).
Loading the model has its own peak, and its memory-mapped weights page in on the first forward
pass; so each case first runs one warm-up pass on a throwaway cache, then resets its peak-RSS mark
(``/proc/self/clear_refs``, Linux); ``ru_maxrss`` at the end is then the peak of the decode alone.
The reference attention path materializes float32 logits of (rows x tokens) per layer and pass,
so large chunks add a transient that can hide the cache; ``--chunk`` sets it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from headq_core.compat import cache_kwargs

CASES: dict[str, tuple[str, str]] = {
    "exact": ("fp16", "fp16"),  # the model's own dtype: float32 here
    "exact-fp16": ("fp16:dtype=float16", "fp16:dtype=float16"),
    "kivi-2": ("kivi:bits=2,group=32", "kivi:bits=2,group=32"),
    "kivi-4": ("kivi:bits=4,group=32", "kivi:bits=4,group=32"),
}
MIB = 1024 * 1024


def _status_kib(field: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in KiB, or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process to its current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def run_case(case: str, tokens: int, chunk: int, window: int) -> dict[str, Any]:
    """Decode ``tokens`` tokens with one cache case in this process; every figure in bytes."""
    import torch

    from headq_core import QuantizedKVCache
    from headq_core.harness.loading import load_model
    from headq_core.harness.texts import load_text, tokenize

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    loaded = load_model()
    ids = tokenize(loaded.tokenizer, load_text("wikitext-2-test").text)[:, :tokens]
    if ids.shape[1] < tokens:
        raise SystemExit(f"the text has only {ids.shape[1]} tokens, asked for {tokens}")
    keys, values = CASES[case]
    with torch.inference_mode():  # warm-up: page in every weight (safetensors are memory-mapped)
        warm = QuantizedKVCache(keys, values, window=window, config=loaded.model.config)
        loaded.model(ids[:, :chunk], **cache_kwargs(loaded.model, warm), use_cache=True, logits_to_keep=1)
    del warm
    cache = QuantizedKVCache(keys, values, window=window, config=loaded.model.config)
    gc.collect()
    load_peak = _status_kib("VmHWM")
    reset = _reset_peak()
    start_rss = _status_kib("VmRSS")
    started = time.perf_counter()
    with torch.inference_mode():
        for pos in range(0, tokens, chunk):
            loaded.model(
                ids[:, pos : pos + chunk],
                **cache_kwargs(loaded.model, cache),
                use_cache=True,
                logits_to_keep=1,
            )
    seconds = time.perf_counter() - started
    maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    parts = cache.nbytes_by_part()
    return {
        "case": case,
        "keys": keys,
        "values": values,
        "tokens": cache.get_seq_length(),
        "chunk": chunk,
        "window": window,
        "cache_nbytes": cache.nbytes(),
        "cache_parts": parts,
        "bits_per_element": cache.bits_per_element()["all"]["total"],
        "ru_maxrss": maxrss_kib * 1024,
        "peak_reset_before_decode": reset,
        "rss_at_decode_start": None if start_rss is None else start_rss * 1024,
        "load_peak_rss": None if load_peak is None else load_peak * 1024,
        "decode_seconds": round(seconds, 1),
    }


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / MIB:.1f}"


def table(results: list[dict[str, Any]]) -> str:
    """The results as a Markdown table, sizes in MiB."""
    lines = [
        "| case | chunk | cache.nbytes() | bits/elem | RSS at decode start | peak RSS in decode (ru_maxrss) "
        "| peak − start | peak before decode (load, warm-up) | decode s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        start = r["rss_at_decode_start"]
        growth = None if start is None else r["ru_maxrss"] - start
        lines.append(
            f"| {r['case']} | {r['chunk']} | {_mib(r['cache_nbytes'])} | {r['bits_per_element']:.2f} | "
            f"{_mib(start)} | {_mib(r['ru_maxrss'])} | {_mib(growth)} | {_mib(r['load_peak_rss'])} | "
            f"{r['decode_seconds']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunk", type=int, nargs="+", default=[32], help="tokens per forward pass")
    parser.add_argument("--window", type=int, default=32, help="full-precision recent tokens (R)")
    parser.add_argument("--cases", nargs="+", default=["exact", "kivi-2"], choices=list(CASES))
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--run", choices=list(CASES), help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_case(args.run, args.tokens, args.chunk[0], args.window)))
        return

    results = []
    for chunk in args.chunk:
        for case in args.cases:
            command = [sys.executable, __file__, "--run", case, "--tokens", str(args.tokens)]
            command += ["--chunk", str(chunk), "--window", str(args.window)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"case {case} failed:\n{done.stderr}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"{case}, chunk {chunk}: done in {results[-1]['decode_seconds']} s", file=sys.stderr)
    print(table(results))
    if args.json:
        environment = {"python": sys.version.split()[0], "machine": platform.platform()}
        args.json.write_text(json.dumps({"environment": environment, "results": results}, indent=2))


if __name__ == "__main__":
    main()
