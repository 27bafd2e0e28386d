"""GPU benchmark: fused decode attention over the quantized cache against fp16 SDPA and dequantize+SDPA.

One layer at Llama-3-8B shapes (32 query heads, 8 KV heads, head_dim 128), one query token per
sequence, for each batch and context. Providers:

- ``fp16-sdpa``: PyTorch SDPA over an fp16 cache (GQA folded into the query rows, so the flash
  kernel reads each KV head once);
- ``dequant-sdpa``: dequantize the whole KIVI-2 cache to fp16 with the torch reference, then SDPA
  (what a cache that stores quantized tensors but attends in fp16 does each step);
- ours: the fused Triton kernel over KIVI-2 (G=32), KIVI-4, HeadQ rank 8 on KIVI-2, KIVI-2 keys
  with A² values (2 and 4 bits, 10% at 4; mixed widths), GSRQ at 1 bit on keys and values
  (one stage of 256 codewords per 8 channels), and what engines ship (headq-baselines, keys and
  values alike): fp8 e4m3 and int8 / int4 with a scale per token and head, and the rotation
  method at 2.5 and 3.5 bits; each with a full-precision window of 128 tokens, cache held as
  8,192-token blocks.

Every row reports the GPU time of one call (median, its launches replayed from a CUDA graph with
L2 flushed before each call: :func:`bench_graph`), the speed-up over both baselines, the bytes the
path must read (the cache as stored, plus the query) and those bytes per second against the
device-to-device copy bandwidth measured in the same run. Beside it, the time of the same call
launched from Python (``triton.testing.do_bench``) and the host's time to launch it: where the
host is the slower, the launched time is the host's, not the kernel's. Dequantize + SDPA and
quantize-and-pack are timed as launched. Run::

    python benchmarks/decode_kernels.py --out kernels.json

CUDA and Triton only; ``test_decode_kernels.py`` runs a few rows under pytest-benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

HQ, HKV, D = 32, 8, 128
WINDOW = 128
CHUNK = 8192
DEVICE = "cuda"  # the CPU works too, under TRITON_INTERPRET=1, for a check of the code at small sizes
LAUNCH = {
    "half": True,
    "block_n": 64,
    "num_warps": 4,
    "num_stages": 2,
    "fold": True,
    "hilo": False,
}  # --tune sets some


def bench(fn: Any) -> float:
    """Median milliseconds of ``fn``, launched from Python each call: where the host takes longer
    to launch a call than the GPU to run it, this is the host's time."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def bench_graph(fn: Any, calls: int = 20, rounds: int = 7) -> float:
    """Median milliseconds of ``fn`` on the GPU alone: ``calls`` calls replayed from one CUDA graph,
    each after the L2 flush ``bench`` does too, less a graph of the flushes alone (the two
    interleaved, ``rounds`` times)."""
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for body in (lambda: (flush.zero_(), fn()), flush.zero_):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                body()
        graph.replay()
        graphs.append(graph)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for graph, ms in zip(graphs, times, strict=True):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            ms.append(start.elapsed_time(end) / calls)
    return statistics.median(times[0]) - statistics.median(times[1])


def host_time(fn: Any, calls: int = 50) -> float:
    """Milliseconds the host takes to launch one call of ``fn`` (the GPU left to catch up after)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    return 1e3 * host


def timings(fn: Any) -> dict[str, float]:
    """A row's three times of ``fn`` in milliseconds: on the GPU (``ms``), launched from Python
    (``eager_ms``) and the host's to launch it (``host_ms``)."""
    return {"ms": bench_graph(fn), "eager_ms": bench(fn), "host_ms": host_time(fn)}


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus written per second."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def _methods(keys: str, values: str) -> tuple[Any, Any]:
    from transformers import LlamaConfig

    from headq_core import get_registry
    from headq_core.testing.calibration import calibration_for

    registry = get_registry()
    km, vm = registry.key_quantizer(keys), registry.value_policy(values)
    config = LlamaConfig(
        hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, num_hidden_layers=1
    )
    calibration = calibration_for(keys, values, config)
    km.bind(config, calibration)
    vm.bind(config, calibration)
    return km, vm


class Cache:
    """One layer's stored state: blocks of CHUNK tokens and an fp16 window, built once."""

    def __init__(self, keys: str, values: str, batch: int, context: int) -> None:
        from headq_core import fused
        from headq_core.layouts import block_nbytes

        self.km, self.vm = _methods(keys, values)
        self.context = context
        encoded = (context - WINDOW) // 32 * 32
        self.k_blocks, self.v_blocks = [], []
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        for start in range(0, encoded, CHUNK):
            n = min(CHUNK, encoded - start)
            k = torch.randn((batch, HKV, n, D), generator=gen, device=DEVICE, dtype=torch.float16)
            v = torch.randn((batch, HKV, n, D), generator=gen, device=DEVICE, dtype=torch.float16)
            self.k_blocks.append(self.km.encode(k, 0))
            self.v_blocks.append(self.vm.encode(v, 0))
        tail = context - encoded
        self.k_window = torch.randn((batch, HKV, tail, D), generator=gen, device=DEVICE, dtype=torch.float16)
        self.v_window = torch.randn_like(self.k_window)
        self.nbytes = sum(sum(block_nbytes(b).values()) for b in self.k_blocks + self.v_blocks)
        self.nbytes += 2 * self.k_window.numel() * 2
        kernels = fused._triton()
        self.segments = (
            [*(b.kernel_segment(b.tokens) for b in self.k_blocks), kernels.Dense(self.k_window)],
            [*(b.kernel_segment(b.tokens) for b in self.v_blocks), kernels.Dense(self.v_window)],
        )
        key_group = max((getattr(s, "group", 0) for s in self.segments[0]), default=0)
        chunk = max((getattr(s, "chunk", 0) for s in self.segments[1]), default=0)
        self.settings = {"batch_heads": batch * HKV, "block_n": max(LAUNCH["block_n"], 128, key_group, chunk)}
        self.plan = self.make_plan()

    @property
    def block_n(self) -> int:
        return int(self.settings["block_n"])

    @block_n.setter
    def block_n(self, value: int) -> None:
        self.settings["block_n"] = value

    def make_plan(self) -> Any:
        from headq_core import fused

        return fused._triton().plan(*self.segments, **self.settings)

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        from headq_core import fused

        side = None
        first = self.segments[0][0]
        if getattr(first, "side_rank", 0):
            side = first.side_sign * torch.einsum("bhgd,hdr->bhgr", q.float(), first.side_basis.float())
        return fused._triton().attend(
            q, self.plan, scale=D**-0.5, side_query=side, half=LAUNCH["half"],
            num_warps=LAUNCH["num_warps"], num_stages=LAUNCH["num_stages"], fold=LAUNCH["fold"], hilo=LAUNCH["hilo"],
        )  # fmt: skip

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([b.dequantize(torch.float16) for b in self.k_blocks] + [self.k_window], dim=2)
        v = torch.cat([b.dequantize(torch.float16) for b in self.v_blocks] + [self.v_window], dim=2)
        return k, v


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)  # q: (b, hkv, g, d), GQA folded into rows


FOLDS = ("kivi2", "kivi4", "headq-r8", "a2-mixed")  # the providers the folded kernel runs
OURS = {
    "kivi2": ("kivi:bits=2", "kivi:bits=2"),
    "kivi4": ("kivi:bits=4", "kivi:bits=4"),
    "headq-r8": ("headq:rank=8,zbits=4", "kivi:bits=2"),
    "a2-mixed": ("kivi:bits=2", "a2"),
    "gsrq-1": ("gsrq", "gsrq"),
    # what engines ship (headq-baselines), keys and values alike
    "fp8": ("fp8", "fp8"),
    "int8": ("int", "int"),
    "int4": ("int:bits=4", "int:bits=4"),
    "rot-2.5": ("rotation:bits=2.5", "rotation:bits=2.5"),
    "rot-3.5": ("rotation:bits=3.5", "rotation:bits=3.5"),
}


def check(cache: Cache, q: torch.Tensor) -> float:
    """Relative error of the kernel against dequantize + SDPA in float32 (HeadQ: base keys + correction)."""
    k, v = cache.dequantized()
    ref = sdpa(q.float(), k.float(), v.float())
    got = cache.attend(q).float()
    return float((got - ref).norm() / ref.norm())


FOLD_VARIANTS = {
    "unfolded": {"fold": False},
    "hilo": {"hilo": True},
}  # --fold-variants: beside the default


def fold_variants(cache: Cache, q: torch.Tensor) -> dict[str, Any]:
    """Times (and errors up to 32k) of the same cache with the folded kernel off, and with two float16 parts."""
    out: dict[str, Any] = {}
    for name, change in FOLD_VARIANTS.items():
        saved = dict(LAUNCH)
        LAUNCH.update(change)
        try:
            out[f"ms_{name}"] = bench_graph(lambda: cache.attend(q))
            out[f"err_{name}"] = check(cache, q) if cache.context <= 32768 else None
        finally:
            LAUNCH.clear()
            LAUNCH.update(saved)
    return out


def run(
    batches: list[int],
    contexts: list[int],
    budget_gib: float,
    providers: list[str] | None = None,
    compare_fold: bool = False,
    splits: list[int] | None = None,
) -> dict[str, Any]:
    """The table's rows; ``splits``: also time each provider with these split lengths (tokens per
    program) instead of ``decode_plan.split_length``'s, as rows ``provider@split``."""
    from headq_core import fused

    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    rows: list[dict[str, Any]] = []
    for batch in batches:
        for context in contexts:
            fp16_bytes = 2 * batch * HKV * context * D * 2
            if 3 * fp16_bytes > budget_gib * 2**30:
                print(f"skip batch {batch} context {context}: over the memory budget", file=sys.stderr)
                continue
            q = torch.randn((batch, HKV, HQ // HKV, D), device=DEVICE, dtype=torch.float16)
            k = torch.randn((batch, HKV, context, D), device=DEVICE, dtype=torch.float16)
            v = torch.randn_like(k)
            fp16 = timings(lambda q=q, k=k, v=v: sdpa(q, k, v))
            t_fp16 = fp16["ms"]
            del k, v
            base = {"batch": batch, "context": context}
            rows.append({**base, "provider": "fp16-sdpa", **fp16, "bytes": fp16_bytes})
            t_deq = None
            for name, (keys, values) in OURS.items():
                if providers and name not in providers:
                    continue
                cache = Cache(keys, values, batch, context)
                if name == "kivi2":
                    try:
                        t_deq = bench(lambda cache=cache, q=q: sdpa(q, *cache.dequantized()))
                        rows.append({**base, "provider": "dequant-sdpa", "ms": t_deq, "bytes": cache.nbytes})
                    except torch.OutOfMemoryError:
                        print(f"dequant-sdpa batch {batch} context {context}: out of memory", file=sys.stderr)
                    torch.cuda.empty_cache()
                times = timings(lambda cache=cache, q=q: cache.attend(q))
                t_plan = bench(cache.make_plan)
                err = check(cache, q) if context <= 32768 else None
                rows.append(
                    {
                        **base,
                        "provider": name,
                        **times,
                        "split": cache.plan.split,
                        "plan_ms": t_plan,
                        "bytes": cache.nbytes,
                        "rel_err": err,
                        "compiler": compiler_report(fused._triton().last_compiled),
                        **(fold_variants(cache, q) if compare_fold and name in FOLDS else {}),
                    }
                )
                print(f"batch {batch} context {context} {name}: {1e3 * times['ms']:.0f} us "
                      f"({1e3 * times['eager_ms']:.0f} eager, host {1e3 * times['host_ms']:.0f}), fp16-sdpa {1e3 * t_fp16:.0f} us",
                      file=sys.stderr, flush=True)  # fmt: skip
                for split in splits or []:
                    cache.settings["split"] = split
                    cache.plan = cache.make_plan()
                    times = timings(lambda cache=cache, q=q: cache.attend(q))
                    rows.append({**base, "provider": f"{name}@{split}", **times, "split": cache.plan.split,
                                 "bytes": cache.nbytes})  # fmt: skip
                    print(f"batch {batch} context {context} {name} split {cache.plan.split}: "
                          f"{1e3 * times['ms']:.0f} us", file=sys.stderr, flush=True)  # fmt: skip
                del cache
                torch.cuda.empty_cache()
            for row in rows:
                if row["batch"] == batch and row["context"] == context:
                    row["vs_fp16"] = t_fp16 / row["ms"]
                    row["vs_dequant"] = (t_deq / row["ms"]) if t_deq else None
                    row["bandwidth_frac"] = row["bytes"] / (row["ms"] * 1e-3) / bandwidth
    quant = []
    for bits in (2, 4):
        from headq_kernels import triton_affine

        x = torch.randn((8, HKV, 32768, D), device=DEVICE, dtype=torch.float16)
        for axis in ("tokens", "channels"):
            src = x.transpose(-1, -2) if axis == "tokens" else x
            ms = bench(lambda src=src, bits=bits: triton_affine.quantize_affine(src, bits, 32))
            moved = x.numel() * 2 + x.numel() * bits // 8 + x.numel() // 32 * 4
            quant.append({"bits": bits, "axis": axis, "ms": ms, "tokens_per_s": 8 * 32768 / (ms * 1e-3),
                          "bandwidth_frac": moved / (ms * 1e-3) / bandwidth})  # fmt: skip
    return {
        "device": props.name,
        "torch": torch.__version__,
        "copy_bandwidth": bandwidth,
        "shape": {"q_heads": HQ, "kv_heads": HKV, "head_dim": D, "window": WINDOW, "block_tokens": CHUNK},
        "rows": rows,
        "quantize": quant,
    }


VARIANTS = [  # (half-precision dequant, block_n, warps, stages)
    (True, 64, 4, 2),
    (True, 128, 4, 2),
    (True, 128, 8, 2),
    (True, 32, 4, 2),
    (False, 64, 4, 2),
    (False, 128, 4, 2),
]


def compiler_report(launches: list[Any]) -> dict[str, Any]:
    """Registers, spills and the instructions that move data between threads, of the first launch
    of the last attend (the one over the encoded blocks; the window has its own, dense launch)."""
    compiled = launches[0]
    ptx, ttgir = compiled.asm.get("ptx", ""), compiled.asm.get("ttgir", "")
    return {
        "registers": compiled.n_regs,
        "spills": compiled.n_spills,
        "shared_bytes": compiled.metadata.shared,
        "convert_layout": ttgir.count("convert_layout"),
        "ld_shared": ptx.count("ld.shared"),
        "st_shared": ptx.count("st.shared"),
        "local_memory": ptx.count("ld.local") + ptx.count("st.local"),
        "mma": ptx.count("mma.sync"),
    }


def variants(batch: int, context: int, out_dir: str | None = None) -> tuple[bool, int, int, int]:
    """Time KIVI-2 under each dequant precision and launch shape; return the fastest."""
    from headq_core import fused

    kernels = fused._triton()
    bandwidth = copy_bandwidth()
    cache = Cache("kivi:bits=2", "kivi:bits=2", batch, context)
    q = torch.randn((batch, HKV, HQ // HKV, D), device=DEVICE, dtype=torch.float16)
    print(f"KIVI-2 batch {batch} context {context}")
    print("| half | block_n | warps | stages | time (us) | of copy BW | compiler |")
    best: tuple[float, tuple[bool, int, int, int]] = (float("inf"), VARIANTS[0])
    for half, block_n, warps, stages in VARIANTS:
        cache.block_n = block_n
        plan = cache.make_plan()

        def fn(plan=plan, h=half, w=warps, st=stages):
            return kernels.attend(q, plan, scale=D**-0.5, num_warps=w, num_stages=st, half=h)

        try:
            ms = bench(fn)
        except Exception as err:  # a launch shape the compiler refuses
            print(f"| {half} | {block_n} | {warps} | {stages} | failed: {type(err).__name__}: {err} |")
            continue
        report = compiler_report(kernels.last_compiled)
        if out_dir:
            with open(f"{out_dir}/kernel-{int(half)}-{block_n}-{warps}.ttgir", "w") as f:
                f.write(kernels.last_compiled[0].asm["ttgir"])
        frac = cache.nbytes / (ms * 1e-3) / bandwidth
        print(f"| {half} | {block_n} | {warps} | {stages} | {1e3 * ms:.0f} | {100 * frac:.0f}% | {report} |")
        best = min(best, (ms, (half, block_n, warps, stages)))
    return best[1]


def table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['device']}, copy bandwidth {result['copy_bandwidth'] / 1e12:.2f} TB/s (read + write)",
        "| batch | context | provider | GPU (us) | vs fp16-sdpa | vs dequant-sdpa | GB read | of copy BW | rel err "
        "| launched (us) | host (us) |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        dq = f"{r['vs_dequant']:.1f}x" if r.get("vs_dequant") else "-"
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "-"
        launched, host = (f"{1e3 * r[key]:.0f}" if key in r else "-" for key in ("eager_ms", "host_ms"))
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['provider']} | {1e3 * r['ms']:.0f} | {r['vs_fp16']:.2f}x | {dq} | "
            f"{r['bytes'] / 1e9:.3f} | {100 * r['bandwidth_frac']:.0f}% | {err} | {launched} | {host} |"
        )
    folds = [r for r in result["rows"] if "ms_unfolded" in r]
    if folds:
        lines += [
            "",
            "| batch | context | provider | folded (us) | unfolded (us) "
            "| folded, two fp16 parts (us) | rel err: folded / unfolded / two parts |",
            "| ---: | ---: | --- | ---: | ---: | ---: | --- |",
        ]
        for r in folds:
            errs = " / ".join(
                "-" if e is None else f"{e:.1e}" for e in (r["rel_err"], r["err_unfolded"], r["err_hilo"])
            )
            lines.append(
                f"| {r['batch']} | {r['context']} | {r['provider']} | {1e3 * r['ms']:.0f} | "
                f"{1e3 * r['ms_unfolded']:.0f} | {1e3 * r['ms_hilo']:.0f} | {errs} |"
            )
    lines += [
        "",
        "| quantize-and-pack | bits | time (us) | tokens/s | of copy BW |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in result["quantize"]:
        lines.append(
            f"| {r['axis']} | {r['bits']} | {1e3 * r['ms']:.0f} | {r['tokens_per_s']:.3g} | {100 * r['bandwidth_frac']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 32768, 65536, 131072])
    parser.add_argument("--budget-gib", type=float, default=60.0)
    parser.add_argument("--out", default=None)
    parser.add_argument("--providers", nargs="+", choices=list(OURS), default=None, help="ours to run (all)")
    parser.add_argument(
        "--tune", action="store_true", help="time launch variants at batch 8, 32k first; use the best"
    )
    parser.add_argument("--asm-dir", default=None, help="where --tune writes each variant's TTGIR")
    parser.add_argument(
        "--fold-variants",
        action="store_true",
        help="also time KIVI and HeadQ unfolded and with two float16 parts",
    )
    parser.add_argument(
        "--profile",
        choices=list(OURS),
        default=None,
        help="only run this provider's attend 5 times (for a profiler)",
    )
    parser.add_argument(
        "--splits",
        type=int,
        nargs="+",
        default=None,
        help="also time each provider with these split lengths (tokens per program)",
    )
    args = parser.parse_args()
    if args.profile:
        cache = Cache(*OURS[args.profile], args.batches[0], args.contexts[0])
        q = torch.randn((args.batches[0], HKV, HQ // HKV, D), device=DEVICE, dtype=torch.float16)
        for _ in range(5):
            cache.attend(q)
        torch.cuda.synchronize()
        return
    if args.tune:
        half, block_n, warps, stages = variants(8, 32768, args.asm_dir)
        LAUNCH.update(half=half, block_n=block_n, num_warps=warps, num_stages=stages)
        print(f"chosen: {LAUNCH}")
    result = run(
        args.batches, args.contexts, args.budget_gib, args.providers, args.fold_variants, args.splits
    )
    result["launch"] = dict(LAUNCH)
    text = table(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
