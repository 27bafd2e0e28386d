"""How well the A² weight seen in the window predicts the weight a token carries later.

A² chooses a token's width when it leaves the window, from ``w_j = sum p_{t,j}^2`` over the queries
that saw it so far (the cache's statistic). What the output error of the *scored* queries actually
weighs a token by is ``F_j = sum_{t scored} p_{t,j}^2`` (summed over the query heads of its KV
group). This script captures exact attention of the default model on evaluation windows (512
prefill + 256 scored tokens, as ``headq bench``), builds both per layer and KV head, and reports

- the Spearman correlation of ``w`` (and of accumulated attention ``sum p``) with ``F``;
- how concentrated ``F`` is (share held by the top 1% of tokens);
- the A² surrogate ``sum_j F_j |v_j - v_hat_j|^2 / d`` of several value encodings relative to
  KIVI-2, where each A² variant is given the statistic the cache would give it, and the oracle is
  given ``F`` itself (the best any window statistic could do with the same allocator).

The window is not modelled: every value is encoded, so the numbers isolate the allocation.

Usage: ``.venv/bin/python benchmarks/a2_weight_study.py [--windows 2] [--out study.json]``
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from headq_core import get_registry
from headq_core.harness.diagnostics import capture_window, spearman
from headq_core.harness.loading import load_model
from headq_core.harness.texts import load_text, token_windows, tokenize

PREFIX, SCORED, CHUNK = 512, 256, 32
A2 = "a2:mode=greedy,avg=2.5,hi=8,group=64"
ENCODINGS = {
    "kivi-2 (3.0 bits)": ("kivi:bits=2", None),
    "uniform 2-bit, group 64 (2.5 bits)": ("a2:frac=0,group=64", None),
    "A² greedy, w = sum p^2 (3.0 bits)": (A2, "sq"),
    "A² greedy, w = sum p (3.0 bits)": (A2 + ",weight=abs", "abs"),
    "A² greedy down to 1 bit, w = sum p^2 (3.0 bits)": (A2 + ",bits=1", "sq"),
    "range only (3.0 bits)": (A2 + ",weight=none", None),
    "oracle: w = F (3.0 bits)": (A2, "future"),
}


def attention_weights(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> dict[str, torch.Tensor]:
    """Per (batch, kv head, token): the window statistics and the future weight F.

    query: (b, hq, T, d), keys: (b, hkv, T, d). Prefill tokens were seen by every later prefill
    query; a scored token by the queries up to the end of its 32-token chunk (the encode unit).
    """
    b, hq, t, _ = query.shape
    hkv = keys.shape[1]
    logits = query @ keys.repeat_interleave(hq // hkv, dim=1).transpose(-1, -2) * scaling
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    p = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    p = p.reshape(b, hkv, hq // hkv, t, t)
    pos = torch.arange(t)
    last_seen = torch.where(pos < PREFIX, PREFIX - 1, (pos // CHUNK) * CHUNK + CHUNK - 1)
    seen = (pos[:, None] >= pos[None, :]) & (pos[:, None] <= last_seen[None, :])  # (query, token)
    return {
        "sq": (p.square() * seen).sum(dim=(2, 3)),
        "abs": (p * seen).sum(dim=(2, 3)),
        "future": p[:, :, :, PREFIX:, :].square().sum(dim=(2, 3)),
    }


def study(model: Any, windows: list[torch.Tensor]) -> dict[str, Any]:
    registry = get_registry()
    policies = {name: registry.value_policy(spec) for name, (spec, _) in ENCODINGS.items()}
    surrogate = dict.fromkeys(ENCODINGS, 0.0)
    corr: dict[str, list[float]] = {"sq": [], "abs": []}
    top_share: list[float] = []
    for ids in windows:
        for layer in capture_window(model, ids[None]).values():
            weights = attention_weights(layer.query, layer.keys, layer.scaling)
            future = weights["future"]
            for name in corr:
                corr[name].append(float(spearman(weights[name].flatten(), future.flatten())))
            flat = future.flatten().sort(descending=True).values
            top_share.append(float(flat[: max(1, flat.numel() // 100)].sum() / flat.sum()))
            for name, (_, stat) in ENCODINGS.items():
                block = policies[name].encode(layer.values, 0, None if stat is None else weights[stat])
                error = (block.dequantize() - layer.values).square().mean(dim=-1)
                surrogate[name] += float((future * error).sum())
    base = surrogate["kivi-2 (3.0 bits)"]
    return {
        "windows": len(windows),
        "spearman_w_sq_vs_F": sum(corr["sq"]) / len(corr["sq"]),
        "spearman_w_abs_vs_F": sum(corr["abs"]) / len(corr["abs"]),
        "top1pct_share_of_F": sum(top_share) / len(top_share),
        "surrogate_vs_kivi2": {name: value / base for name, value in surrogate.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model()
    ids = tokenize(loaded.tokenizer, load_text(None).text)
    windows = [row[0] for row in token_windows(ids, PREFIX, SCORED, args.windows)]
    with torch.no_grad():
        result = study(loaded.model, windows)
    print(f"windows: {result['windows']} of {PREFIX} + {SCORED} tokens, {CHUNK}-token chunks")
    print(f"Spearman(w = sum p^2, F) per layer, mean: {result['spearman_w_sq_vs_F']:.3f}")
    print(f"Spearman(w = sum p,   F) per layer, mean: {result['spearman_w_abs_vs_F']:.3f}")
    print(f"share of F held by the top 1% of tokens: {result['top1pct_share_of_F']:.3f}")
    print("| values | A² surrogate vs KIVI-2 |\n| --- | --- |")
    for name, ratio in result["surrogate_vs_kivi2"].items():
        print(f"| {name} | {ratio:.3f} |")
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
