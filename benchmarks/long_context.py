"""GPU benchmark: long prompts and long caches, quantized caches against transformers' own.

The random-weight Llama-3-8B-shaped model of ``decode_runtime.py`` (float16, all 32 layers by
default). Two measurements:

``--prefill BATCHxPROMPT ...``: per cache, a prompt of random tokens goes through the model into
an empty cache (in one pass, or in chunks of ``--chunk`` tokens through
:func:`headq_core.prefill`; only the last position's logits, as ``generate`` asks), then the model
decodes greedily. Reported: prefill seconds and peak memory above the weights, the bytes the
cache holds after it (memory allocated above the weights), decode wall and GPU time per step,
tokens per second, and every ratio against ``dynamic``. Caches are interleaved over ``--rounds``
rounds and the best prefill and decode are kept.

``--fits CONTEXT ...``: per cache, at ``--fits-batch`` sequences, the longest of the contexts at
which the cache holds that many tokens in every layer (filled as ``decode_runtime.py`` fills it)
and the model still decodes two steps; contexts are tried in increasing order until one runs out
of memory.

Caches as in ``decode_runtime.py``: ``dynamic`` (``DynamicCache`` + SDPA), ``quanto2``/``quanto4``
(transformers' ``QuantizedCache`` on optimum-quanto), ``headq-fp16``, ``headq-kivi2``,
``headq-kivi4`` and ``headq-headq`` (HeadQ r8 on KIVI-2 keys, KIVI-2 values), a 128-token window.
``--smoke`` runs everything on a tiny model on the CPU (figures meaningless), to check the script.

    python benchmarks/long_context.py --prefill 1x4096 1x32768 8x16384 --out prefill.json
    python benchmarks/long_context.py --prefill --fits 49152 57344 65536 98304 131072 196608 --out fits.json
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from typing import Any

import torch
from decode_runtime import CACHES, HEADQ_SPECS, WINDOW, build_model, decode, gpu_time, make_cache


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def empty_cache(name: str, model: Any, prompt: int) -> Any:
    from transformers import DynamicCache, QuantizedCache

    from headq_core import QuantizedKVCache
    from headq_core.testing.calibration import calibration_for

    config = model.config
    if name == "dynamic":
        return DynamicCache(config=config)
    if name.startswith("quanto"):
        return QuantizedCache("quanto", config, nbits=int(name[-1]), q_group_size=64, residual_length=128)
    keys, values = HEADQ_SPECS[name]
    calibration = calibration_for(keys, values, config) if "headq:" in keys else None
    return QuantizedKVCache(keys, values, window=WINDOW, config=config, calibration=calibration)


def run_prefill(model: Any, name: str, ids: torch.Tensor, chunk: int | None, steps: int) -> dict[str, Any]:
    from headq_core import cache_kwargs, prefill

    batch, prompt = ids.shape
    model.set_attn_implementation("sdpa" if name == "dynamic" or name.startswith("quanto") else "headq")
    weights = _allocated()
    cache = empty_cache(name, model, prompt)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    _sync()
    start = time.perf_counter()
    if chunk:
        prefill(model, ids, cache, chunk=chunk)
    else:
        model(ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    _sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - weights if torch.cuda.is_available() else 0
    held = _allocated() - weights
    decode(model, cache, batch, 4) if ids.is_cuda else None  # warm-up
    wall = decode(model, cache, batch, steps)[0] if ids.is_cuda else 0.0
    gpu = gpu_time(model, cache, batch, 4) if ids.is_cuda else 0.0
    return {
        "cache": name, "batch": batch, "prompt": prompt, "chunk": chunk, "prefill_s": seconds,
        "peak_gib": peak / 2**30, "cache_gib": held / 2**30, "decode_wall_ms": 1e3 * wall,
        "decode_gpu_ms": 1e3 * gpu, "tokens_per_s": batch / wall if wall else 0.0,
    }  # fmt: skip


def prefill_shape(
    model: Any, batch: int, prompt: int, caches: list[str], chunk: int | None, rounds: int, steps: int
) -> list[dict]:
    gen = torch.Generator().manual_seed(prompt)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), generator=gen).to(_device())
    best: dict[str, dict[str, Any]] = {}
    for _ in range(rounds):
        for name in caches:
            if "error" in best.get(name, {}):
                continue
            try:
                row = run_prefill(model, name, ids, chunk, steps)
            except (ImportError, torch.OutOfMemoryError) as err:
                best[name] = {
                    "cache": name,
                    "batch": batch,
                    "prompt": prompt,
                    "error": f"{type(err).__name__}",
                }
                print(f"  {batch}x{prompt} {name}: {err!s:.200}", flush=True)
                continue
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            print(
                f"  {batch}x{prompt} {name}: prefill {row['prefill_s']:.2f} s, peak {row['peak_gib']:.1f} GiB, "
                f"cache {row['cache_gib']:.2f} GiB, decode {row['decode_wall_ms']:.2f} ms",
                flush=True,
            )
            old = best.get(name)
            if old is None:
                best[name] = row
            else:
                old["prefill_s"] = min(old["prefill_s"], row["prefill_s"])
                if row["decode_wall_ms"] < old["decode_wall_ms"]:
                    for key in ("decode_wall_ms", "decode_gpu_ms", "tokens_per_s"):
                        old[key] = row[key]
    base = best.get("dynamic")
    for row in best.values():
        if base is not None and "error" not in base and "error" not in row:
            row["prefill_vs_dynamic"] = row["prefill_s"] / base["prefill_s"]
            row["peak_vs_dynamic"] = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] else None
            row["tokens_per_s_vs_dynamic"] = (
                row["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else None
            )
    return list(best.values())


def longest_fit(model: Any, name: str, batch: int, contexts: list[int]) -> dict[str, Any]:
    """The longest of ``contexts`` at which the cache holds that many tokens and decodes."""
    model.set_attn_implementation("sdpa" if name == "dynamic" or name.startswith("quanto") else "headq")
    fits, failed = 0, None
    for context in sorted(contexts):
        cache = None
        try:
            cache = make_cache(name, model, batch, context)
            decode(model, cache, batch, 2)
            fits = context
            print(f"  {name} {batch}x{context}: fits ({_allocated() / 2**30:.1f} GiB allocated)", flush=True)
        except torch.OutOfMemoryError:
            failed = context
            print(f"  {name} {batch}x{context}: out of memory", flush=True)
            break
        except ImportError as err:
            return {"cache": name, "batch": batch, "error": f"ImportError: {err!s:.100}"}
        finally:
            cache = None
            gc.collect()
            torch.cuda.empty_cache()
    return {"cache": name, "batch": batch, "longest_context": fits, "first_failed": failed}


def table(rows: list[dict]) -> str:
    lines = [
        "| batch x prompt | cache | prefill s | vs dynamic | peak GiB | vs dynamic | cache GiB | decode wall ms | GPU ms | tokens/s | vs dynamic |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip

    def ratio(r: dict, key: str) -> str:
        return f"{r[key]:.2f}x" if r.get(key) else "-"

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['batch']}x{r['prompt']} | {r['cache']} | {r['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['batch']}x{r['prompt']} | {r['cache']} | {r['prefill_s']:.2f} | {ratio(r, 'prefill_vs_dynamic')} | "
            f"{r['peak_gib']:.1f} | {ratio(r, 'peak_vs_dynamic')} | {r['cache_gib']:.2f} | {r['decode_wall_ms']:.2f} | "
            f"{r['decode_gpu_ms']:.2f} | {r['tokens_per_s']:.0f} | {ratio(r, 'tokens_per_s_vs_dynamic')} |"
        )
    return "\n".join(lines)


def smoke_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    import headq_core  # noqa: F401

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, num_hidden_layers=2, vocab_size=256)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", nargs="*", default=[], help="BATCHxPROMPT shapes")
    parser.add_argument("--chunk", type=int, default=None, help="feed prompts in chunks of this many tokens")
    parser.add_argument("--fits", nargs="*", type=int, default=[], help="contexts to try at --fits-batch")
    parser.add_argument("--fits-batch", type=int, default=8)
    parser.add_argument(
        "--fits-caches",
        nargs="+",
        choices=CACHES,
        default=["dynamic", "headq-kivi2", "headq-kivi4", "headq-headq"],
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=CACHES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument(
        "--smoke", action="store_true", help="a tiny model on the CPU: checks the script only"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model = smoke_model() if args.smoke else build_model(args.layers)
    import transformers

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "layers": model.config.num_hidden_layers,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "prefill": [],
        "fits": [],
    }
    for shape in args.prefill:
        batch, prompt = map(int, shape.split("x"))
        print(f"prefill {batch}x{prompt}, {result['layers']} layers, chunk {args.chunk}", flush=True)
        result["prefill"] += prefill_shape(
            model, batch, prompt, args.caches, args.chunk, args.rounds, args.steps
        )
    for name in args.fits_caches if args.fits else []:
        result["fits"].append(longest_fit(model, name, args.fits_batch, args.fits))
    print(f"{result['device']}, {result['layers']} layers, versions {result['versions']}")
    print(table(result["prefill"]))
    for row in result["fits"]:
        print(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
