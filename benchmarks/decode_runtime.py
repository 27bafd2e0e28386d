"""GPU benchmark: whole decode steps of a model, quantized caches against transformers' own.

A random-weight Llama-3-8B-shaped model (32 query heads, 8 KV heads, head_dim 128, hidden 4096,
MLP 14336, vocabulary 128256) in float16 with ``--layers`` layers. For each batch x context and
each cache, the cache is filled with ``context`` random tokens per layer (the prefill is not what
is measured), then the model decodes greedily, one token per step, synchronizing after every step
as ``generate`` does. Caches:

- ``dynamic``: transformers' ``DynamicCache`` with PyTorch SDPA (the baseline);
- ``quanto2`` / ``quanto4``: transformers' ``QuantizedCache`` on optimum-quanto, 2 and 4 bits,
  groups of 64, a 128-token residual (when optimum-quanto is installed);
- ``headq-fp16``: :class:`~headq_core.QuantizedKVCache` with ``fp16`` keys and values (no
  quantization: the cost of the runtime itself);
- ``headq-kivi2`` / ``headq-kivi4``: KIVI keys and values, a 128-token window;
- ``headq-headq``: HeadQ rank 8 on KIVI-2 keys, KIVI-2 values;
- ``headq-a2``: KIVI-2 keys, A² values (2 and 4 bits);
- ``headq-fp8``, ``headq-int4``, ``headq-rotation``: what engines ship (headq-baselines), keys
  and values alike: fp8 e4m3 and int4 with a scale per token and head, the rotation method at
  3.5 bits;
- ``headq-gsrq``: GSRQ keys and values at 1 bit (codebooks fitted on synthetic statistics);
- ``...-graph`` (by default ``headq-fp16-graph``, ``headq-kivi2-graph``, ``headq-headq-graph``;
  any ``headq-`` cache above on request): the same caches in static mode (:class:`~headq_core.graphs.StaticDecode`), each decode step a CUDA graph
  replay; their warm-up is at least 72 steps, so that both flush patterns are captured.

Per cache and shape it reports wall time per step (host clock around the synchronized loop), GPU
time per step (the sum of the kernels' device times under ``torch.profiler``; their ratio is the
host's share), tokens per second and the speed against ``dynamic``; every cache is run in three
interleaved rounds, and the median wall time is kept. It also reports the host time of one layer's decode step
in the ``headq`` attention (``update`` + attention, nothing waited for) at two contexts, and how
many Triton kernels were compiled during the timed steps (zero: nothing is specialized on a value
that changes from step to step). Run one shape per process (a process that ran the profiler keeps memory and launch costs it
should not), e.g.::

    python benchmarks/decode_runtime.py --shapes 8x16384 --out runtime-8x16k.json
    python benchmarks/decode_runtime.py --shapes --host 4096 131072 --out host.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from typing import Any

import torch

import headq_kernels

HQ, HKV, D = 32, 8, 128
WINDOW = 128
GRAPH_WARMUP = 72  # a static decode runs a flush pattern once eagerly and captures it the second time
HEADQ_SPECS = {
    "headq-fp16": ("fp16", "fp16"),
    "headq-kivi2": ("kivi:bits=2", "kivi:bits=2"),
    "headq-kivi4": ("kivi:bits=4", "kivi:bits=4"),
    "headq-headq": ("headq:rank=8,zbits=4", "kivi:bits=2"),
    "headq-a2": ("kivi:bits=2", "a2"),
    "headq-fp8": ("fp8", "fp8"),
    "headq-int4": ("int:bits=4", "int:bits=4"),
    "headq-rotation": ("rotation:bits=3.5", "rotation:bits=3.5"),
    "headq-gsrq": ("gsrq", "gsrq"),
}
CACHES = [
    "dynamic",
    "quanto2",
    "quanto4",
    *HEADQ_SPECS,
    "headq-fp16-graph",
    "headq-kivi2-graph",
    "headq-headq-graph",
]
CHOICES = CACHES + [f"{name}-graph" for name in HEADQ_SPECS if f"{name}-graph" not in CACHES]


def model_config(layers: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=HQ * D, intermediate_size=14336, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
        num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=1 << 20, dtype="float16",
    )  # fmt: skip


def build_model(layers: int) -> Any:
    from transformers import LlamaForCausalLM

    import headq_core  # noqa: F401  (registers the headq attention function)

    torch.manual_seed(0)
    torch.set_default_dtype(torch.float16)  # built in half precision: no float32 copy of the weights
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(model_config(layers)).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    return model


def calibration(keys: str, values: str, config: Any) -> Any:
    """The synthetic calibration of a key and value spec (None where neither method learns), fitted
    once per process: every round of every shape builds its caches from the same one."""
    from headq_core.testing.calibration import calibration_for

    key = (keys, values, config.num_hidden_layers)
    if key not in CALIBRATIONS:
        CALIBRATIONS[key] = calibration_for(keys, values, config)
    return CALIBRATIONS[key]


CALIBRATIONS: dict[tuple[str, str, int], Any] = {}


def make_cache(name: str, model: Any, batch: int, context: int) -> Any:
    """A cache of ``name`` holding ``context`` random tokens in every layer."""
    from transformers import DynamicCache, QuantizedCache

    from headq_core import QuantizedKVCache

    config = model.config
    if name == "dynamic":
        cache: Any = DynamicCache(config=config)
    elif name.startswith("quanto"):
        cache = QuantizedCache("quanto", config, nbits=int(name[-1]), q_group_size=64, residual_length=128)
    else:
        keys, values = HEADQ_SPECS[name.removesuffix("-graph")]
        cache = QuantizedKVCache(
            keys,
            values,
            window=WINDOW,
            config=config,
            calibration=calibration(keys, values, config),
            capacity=context + 4096,
        )
    gen = torch.Generator(device="cuda").manual_seed(1)
    slices = 8192 if isinstance(cache, QuantizedKVCache) else context  # the others: one prefill pass
    for layer in range(config.num_hidden_layers):
        # in slices, so that a quantizing cache never holds a second full-precision copy
        for start in range(0, context, slices):
            n = min(slices, context - start)
            k = torch.randn((batch, HKV, n, D), generator=gen, device="cuda", dtype=torch.float16)
            v = torch.randn_like(k)
            if isinstance(cache, QuantizedKVCache):
                cache.store(layer, k, v)
            else:
                cache.update(k, v, layer)
    torch.cuda.synchronize()
    return cache


def stepper(name: str, model: Any, cache: Any, capacity: int) -> Any:
    """token (b, 1) -> the greedy next token (b, 1), through ``cache`` (static mode for ``-graph``)."""
    if name.endswith("-graph"):
        from headq_core.graphs import StaticDecode

        run = StaticDecode(model, cache, capacity=capacity)
        return lambda token: run.step(token).argmax(-1, keepdim=True)
    from headq_core import cache_kwargs

    kwargs = cache_kwargs(model, cache)
    return lambda token: model(token, **kwargs, use_cache=True).logits[:, -1:].argmax(-1)


def decode(step: Any, batch: int, steps: int) -> float:
    """Seconds per greedy decode step, synchronizing after each as ``generate`` does."""
    token = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = step(token)
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def gpu_time(step: Any, batch: int, steps: int) -> float:
    """Seconds of kernel time per decode step (the device's own clock, via the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decode(step, batch, steps)
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us * 1e-6 / steps


def run_shape(model: Any, batch: int, context: int, caches: list[str], warmup: int, steps: int) -> list[dict]:
    """Wall time of every cache over three interleaved rounds (the median kept), then GPU time."""
    attn = {"dynamic": "sdpa", "quanto2": "sdpa", "quanto4": "sdpa"}
    walls: dict[str, list[float]] = {name: [] for name in caches}
    rows: dict[str, dict[str, Any]] = {}
    for measure_gpu in (False, False, False, True):
        for name in caches:
            if name in rows and "error" in rows[name]:
                continue
            model.set_attn_implementation(attn.get(name, "headq"))
            cache = None
            try:
                cache = make_cache(name, model, batch, context)
                warm = max(warmup, GRAPH_WARMUP) if name.endswith("-graph") else warmup
                step = stepper(name, model, cache, context + warm + steps + 64)
                decode(step, batch, warm)
                if measure_gpu:
                    gpu = gpu_time(step, batch, max(4, steps // 4))
                    rows[name]["gpu_ms"] = 1e3 * gpu
                    continue
                before = headq_kernels.compiled_kernels()
                wall = decode(step, batch, steps)
                walls[name].append(1e3 * wall)
                rows.setdefault(
                    name, {"cache": name, "batch": batch, "context": context, "compiled_during_steps": 0}
                )
                rows[name]["compiled_during_steps"] += headq_kernels.compiled_kernels() - before
            except Exception as err:  # a row that cannot run (no quanto, no memory, a bug) is reported
                if not isinstance(err, ImportError | torch.OutOfMemoryError):
                    traceback.print_exc()
                rows[name] = {"cache": name, "error": f"{type(err).__name__}: {str(err)[:120]}"}
                print(f"  {batch}x{context} {name}: {rows[name]['error']}", flush=True)
                continue
            finally:
                cache = step = None
                gc.collect()
                torch.cuda.empty_cache()
            if not measure_gpu:
                held = torch.cuda.memory_reserved() / 2**30
                print(
                    f"  {batch}x{context} {name}: wall {walls[name][-1]:.2f} ms ({held:.1f} GiB reserved)",
                    flush=True,
                )
    base = None
    for name, row in rows.items():
        if "error" in row:
            continue
        row["wall_ms"] = sorted(walls[name])[len(walls[name]) // 2]
        row["wall_runs_ms"] = walls[name]
        row["tokens_per_s"] = batch / (row["wall_ms"] * 1e-3)
        row["wall_over_gpu"] = row["wall_ms"] / row["gpu_ms"]
        if name == "dynamic":
            base = row["wall_ms"]
    for row in rows.values():
        if "wall_ms" in row:
            row["vs_dynamic"] = base / row["wall_ms"] if base else None
    return list(rows.values())


def launch_overhead(n: int = 300) -> dict[str, float]:
    """Host microseconds per launch: a Triton kernel of the decode path, and a torch op, on tiny data."""
    from headq_kernels import triton_decode

    parts = torch.zeros((1, 1, 1, 128), device="cuda")
    ml = torch.zeros((1, 1, 1, 2), device="cuda")
    out = torch.empty((1, 1, 1, 128), device="cuda", dtype=torch.float16)

    def merge() -> None:
        triton_decode._merge_kernel[(1,)](
            parts, ml, out, ml, 1, G=1, D=128, BLOCK_S=32, LSE=False, num_warps=4
        )

    def add() -> None:
        torch.add(parts, 1.0, out=parts)

    result = {}
    for name, fn in (("triton", merge), ("torch", add)):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(n):
            fn()
        result[name] = 1e6 * (time.perf_counter() - start) / n
        torch.cuda.synchronize()
    return result


def host_per_layer_step(spec: tuple[str, str], context: int, steps: int = 30, profile: bool = False) -> float:
    """Microseconds of host work in one layer's decode step (update + headq attention), batch 1."""
    from transformers import LlamaConfig

    from headq_core import QuantizedKVCache
    from headq_core.attention import headq_attention

    config = LlamaConfig(hidden_size=HQ * D, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
                         num_hidden_layers=1, intermediate_size=64, vocab_size=64)  # fmt: skip
    cache = QuantizedKVCache(*spec, window=WINDOW, config=config, capacity=context + 4096)
    gen = torch.Generator(device="cuda").manual_seed(2)
    for start in range(0, context, 8192):
        k = torch.randn(
            (1, HKV, min(8192, context - start), D), generator=gen, device="cuda", dtype=torch.float16
        )
        cache.store(0, k, torch.randn_like(k))
    module = torch.nn.Module().eval()
    q = torch.randn((1, HQ, 1, D), device="cuda", dtype=torch.float16)
    kv = torch.randn((1, HKV, 1, D), device="cuda", dtype=torch.float16)

    def step() -> None:
        key, value = cache.update(kv, kv, 0)
        headq_attention(module, q, key, value, None, D**-0.5)

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    if profile:  # where the host time goes
        import cProfile
        import pstats

        with cProfile.Profile() as prof:
            for _ in range(steps):
                step()
        torch.cuda.synchronize()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return 1e6 * host / steps


def table(rows: list[dict]) -> str:
    lines = [
        "| batch x context | cache | wall ms/step | GPU ms/step | wall / GPU | tokens/s | vs dynamic | compiled |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| | {r['cache']} | {r['error']} | | | | | |")
            continue
        vs = f"{r['vs_dynamic']:.2f}x" if r.get("vs_dynamic") else "-"
        lines.append(
            f"| {r['batch']}x{r['context']} | {r['cache']} | {r['wall_ms']:.2f} | {r['gpu_ms']:.2f} | "
            f"{r['wall_over_gpu']:.2f} | {r['tokens_per_s']:.0f} | {vs} | {r['compiled_during_steps']} |"
        )
    return "\n".join(lines)


@torch.no_grad()  # as generate runs: no autograd graph keeping every step's tensors alive
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="*", default=["1x4096", "8x16384", "1x32768"], help="BATCHxCONTEXT")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--caches", nargs="+", choices=CHOICES, default=CACHES)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument(
        "--host", nargs="*", type=int, default=[], help="contexts at which to time one layer's host work"
    )
    parser.add_argument("--profile-host", action="store_true", help="cProfile one layer's decode step")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "layers": args.layers, "rows": []}
    result["versions"] = {"torch": torch.__version__}
    import transformers
    import triton

    result["versions"].update(transformers=transformers.__version__, triton=triton.__version__)
    model = build_model(args.layers) if args.shapes else None
    for shape in args.shapes:
        batch, context = map(int, shape.split("x"))
        print(f"{batch}x{context}, {args.layers} layers", flush=True)
        result["rows"] += run_shape(model, batch, context, args.caches, args.warmup, args.steps)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if args.host:
        result["launch_us"] = launch_overhead()
        print(f"host per launch: {result['launch_us']}", flush=True)
    host = {}
    for name in ("headq-fp16", "headq-kivi2"):
        for context in args.host:
            profile = args.profile_host and context == args.host[0]
            host[f"{name} {context}"] = host_per_layer_step(HEADQ_SPECS[name], context, profile=profile)
            print(f"host per layer-step, {name}, 1x{context}: {host[f'{name} {context}']:.0f} us", flush=True)
    result["host_us_per_layer_step"] = host
    print(f"{result['device']}, {args.layers} layers, versions {result['versions']}")
    print(table(result["rows"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
