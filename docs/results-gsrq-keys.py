"""Why GSRQ keys fail below two bits: codebooks on differently prepared keys, scored offline.

Captures the exact keys and queries of the default model on WikiText-2 validation (codebooks) and
on held-out WikiText-2 test windows (scores), learns one stage of codebooks per (layer, sub-vector
position) on keys prepared in several ways, and prints, per preparation and learner, the key MSE
and the attention KL of held-out queries at decode positions (keys 0..t quantized, query t), means
over layers and KV heads. Preparations:

- ``post``: keys as the cache sees them, after the rotary embedding;
- ``post+fisher``: the shipped ``scale=fisher`` spec (Fisher channel scale and Fisher weights);
- ``post+chan``: per (KV head, channel) mean removed and divided by the standard deviation;
- ``post+pair``: channels reordered so that each sub-vector holds whole rotary pairs (i, i + d/2);
- ``pre``: keys before the rotary embedding (rotated back by their position), rotated again at read;
- ``pre+chan``: pre-RoPE keys, normalized per channel;
- ``post+qscale``, ``pre+qscale``: channels scaled by the query RMS of their rotary pair;
- ``+fisher``: with the Fisher channel scale and weights; ``+fw``: with the Fisher weights only.

Run: ``OMP_NUM_THREADS=2 nice python docs/results-gsrq-keys.py [--tokens 4096] [--seeds 1] [--only pre,post]``
(the table of docs/results-gsrq.md, issue 17 item 1: all preparations, defaults otherwise).
"""

from __future__ import annotations

import argparse
import time

import torch
from headq_gsrq.block import decode
from headq_gsrq.config import GsrqConfig
from headq_gsrq.fitting import channel_scale, encode_residual, fisher_weights, fit_layer
from headq_gsrq.rotary import inverse_frequencies, rotate

from headq_core.harness.diagnostics import capture_window
from headq_core.harness.loading import load_model
from headq_core.harness.texts import load_text, token_windows, tokenize
from headq_core.interfaces import AttentionSample
from headq_core.metrics import attention_kl
from headq_core.reference import masked_softmax
from headq_core.registry import get_registry

LENGTH = 512  # tokens per window, calibration and held-out alike
PREFIX = 256  # held-out queries are scored at decode positions after this many tokens
QUERIES = 32  # decode positions per held-out window
SINKS = 4  # first tokens kept exact in the second KL column
RECENT = 32  # newest tokens kept exact in the third KL column


def capture(
    model: torch.nn.Module, windows: list[torch.Tensor], grads: bool
) -> dict[str, list[torch.Tensor]]:
    """Per layer: post-RoPE keys (windows, kv_heads, T, d), queries (windows, q_heads, T, d), key Fisher."""
    out: dict[str, list[list[torch.Tensor]]] = {"keys": [], "query": [], "fisher": []}
    for ids in windows:
        captured = capture_window(model, ids, grads=grads)
        for layer, cap in sorted(captured.items()):
            for name, tensor in (("keys", cap.keys), ("query", cap.query), ("fisher", cap.key_grad)):
                if len(out[name]) <= layer:
                    out[name].append([])
                if tensor is not None:
                    out[name][layer].append(tensor[0] if name != "fisher" else tensor[0].square())
    return {name: [torch.stack(chunks) for chunks in per_layer if chunks] for name, per_layer in out.items()}


def pooled(x: torch.Tensor) -> torch.Tensor:
    """(windows, heads, T, d) -> (heads, windows * T, d)."""
    return x.transpose(0, 1).flatten(1, 2)


class Preparation:
    """A map of keys into the space the codebooks live in, fitted on calibration keys, and back."""

    def __init__(self, name: str, inv_freq: torch.Tensor) -> None:
        self.name, self.inv_freq = name, inv_freq
        self.pre, self.chan, self.pair = "pre" in name, "chan" in name, "pair" in name
        self.qscale = "qscale" in name
        self.mean = self.std = self.order = None

    def fit(self, keys: torch.Tensor, query: torch.Tensor) -> None:
        x = self.to_pre(keys) if self.pre else keys
        flat = pooled(x)  # (heads, n, d)
        if self.chan:
            self.mean, self.std = flat.mean(1)[:, None, None], flat.std(1).clamp_min(1e-6)[:, None, None]
        if (
            self.qscale
        ):  # query RMS per channel, averaged over each rotary pair: the same before and after RoPE
            heads, d = keys.shape[1], keys.shape[-1]
            energy = query.transpose(0, 1).reshape(heads, -1, d).square().mean(1)  # (kv_heads, d)
            energy = (energy + energy.roll(d // 2, dims=-1)) / 2
            rms = energy.sqrt()
            self.mean = torch.zeros(heads, 1, 1, d)
            self.std = (rms.mean(-1, keepdim=True) / rms)[:, None, None]
            self.chan = True
        if self.pair:  # channel i and i + d/2 rotate together: keep them in one sub-vector
            half = keys.shape[-1] // 2
            self.order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()

    def to_pre(self, keys: torch.Tensor) -> torch.Tensor:
        return rotate(keys, torch.arange(keys.shape[-2]), self.inv_freq, back=True)

    def forward(self, keys: torch.Tensor) -> torch.Tensor:
        """(windows, heads, T, d) post-RoPE keys -> the coded space."""
        x = self.to_pre(keys) if self.pre else keys
        if self.chan:
            x = (x - self.mean.transpose(0, 1)) / self.std.transpose(0, 1)
        return x[..., self.order] if self.order is not None else x

    def back(self, x: torch.Tensor) -> torch.Tensor:
        if self.order is not None:
            x = x[..., torch.argsort(self.order)]
        if self.chan:
            x = x * self.std.transpose(0, 1) + self.mean.transpose(0, 1)
        if self.pre:
            x = rotate(x, torch.arange(x.shape[-2]), self.inv_freq)
        return x


def score(
    keys: torch.Tensor, keys_hat: torch.Tensor, query: torch.Tensor, scaling: float
) -> tuple[float, ...]:
    """Key MSE over all tokens; attention KL over QUERIES decode positions per window (means) with
    every key quantized, with the first SINKS kept exact, and with the newest RECENT kept exact."""
    w, hkv, t, d = keys.shape
    g = query.shape[1] // hkv
    mse = float((keys_hat - keys).square().mean())
    positions = torch.linspace(PREFIX, t - 1, QUERIES).round().long()
    kls: list[list[torch.Tensor]] = [[], [], []]
    for j in positions.tolist():
        q = query[:, :, j].reshape(w, hkv, g, d)
        mask = (torch.arange(t) <= j)[None, None, None]
        logits = q @ keys.transpose(-1, -2) * scaling
        exact_from = [t, SINKS, j + 1 - RECENT]
        for case, cut in enumerate(exact_from):
            kept = torch.arange(t) < SINKS if case == 1 else torch.arange(t) >= cut
            k_hat = torch.where(kept[:, None], keys, keys_hat)
            logits_hat = q @ k_hat.transpose(-1, -2) * scaling
            sample = AttentionSample(
                query=q,
                keys=keys,
                keys_hat=k_hat,
                values=keys,
                values_hat=keys,
                logits=logits,
                logits_hat=logits_hat,
                probs=masked_softmax(logits, mask),
                probs_hat=masked_softmax(logits_hat, mask),
                mask=mask,
            )
            kls[case].append(attention_kl(sample).mean())
    return (mse, *(float(torch.stack(k).mean()) for k in kls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--heldout", type=int, default=4, help="held-out windows of 512 tokens")
    parser.add_argument("--seeds", type=int, default=1, help="learner seeds per row")
    parser.add_argument("--only", default="", help="comma-separated preparations (default: all)")
    parser.add_argument("--specs", default="gsrq:bits=1;gsrq:bits=0.75", help="';'-separated GSRQ specs")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    loaded = load_model()
    model = loaded.model
    cal = tokenize(loaded.tokenizer, load_text(role="calibration").text)
    test = tokenize(loaded.tokenizer, load_text(role="eval").text)
    cal_windows = token_windows(cal, LENGTH - 1, 1, args.tokens // LENGTH)
    test_windows = token_windows(test, PREFIX, LENGTH - PREFIX, args.heldout)
    fisher_windows = cal_windows[: 4096 // LENGTH]
    calib = capture(model, cal_windows, grads=False)
    fisher = capture(model, fisher_windows, grads=True)["fisher"]
    held = capture(model, test_windows, grads=False)
    scaling = model.config.head_dim**-0.5 if hasattr(model.config, "head_dim") else None
    inv_freq = inverse_frequencies(model.config)
    check_rotation(model, test_windows[0], held["keys"][0][0], inv_freq)
    print(
        f"captured in {time.time() - started:.0f} s: {args.tokens} calibration tokens, {args.heldout} held-out windows"
    )

    kivi = get_registry().key_quantizer("kivi:bits=2")
    layers = len(calib["keys"])
    kivi_scores = torch.zeros(4)
    for layer in range(layers):
        k = held["keys"][layer]
        k_hat = torch.stack([kivi.encode(k[i : i + 1], layer).dequantize()[0] for i in range(k.shape[0])])
        kivi_scores += torch.tensor(score(k, k_hat, held["query"][layer], scaling)) / layers
    kivi_kl = float(kivi_scores[1])
    print(f"{'kivi:bits=2':28} {'-':8} {'-':14} {'':6} {line(kivi_scores.tolist())}")

    names = (
        args.only.split(",")
        if args.only
        else [
            "post",
            "post+fisher",
            "post+chan",
            "post+pair",
            "post+qscale",
            "pre",
            "pre+chan",
            "pre+fisher",
            "pre+qscale",
        ]
    )
    for spec_text in args.specs.split(";"):
        for learner in ("gskm", "kmeans"):
            for name in names:
                for seed in range(args.seeds):
                    config = GsrqConfig.from_params(
                        dict(p.split("=") for p in spec_text.split(":")[1].split(","))
                        | {"learner": learner, "seed": str(seed)},
                        method="gsrq",
                    )
                    assert isinstance(config, GsrqConfig)
                    tic = time.time()
                    scores = evaluate(name, config, calib, fisher, held, inv_freq, scaling)
                    print(
                        f"{spec_text:28} {learner:8} {name:14} seed {seed} {line(scores)} "
                        f"(KL x KIVI-2 {scores[1] / kivi_kl:.2f}, {time.time() - tic:.0f} s)",
                        flush=True,
                    )
    print(f"total {time.time() - started:.0f} s")


def line(scores: list[float]) -> str:
    mse, kl, sinks, recent = scores
    return f"key MSE {mse:.4f}  KL {kl:.4f}  sinks {SINKS} {sinks:.4f}  newest {RECENT} {recent:.4f}"


def evaluate(
    name: str,
    config: GsrqConfig,
    calib: dict[str, list[torch.Tensor]],
    fisher: list[torch.Tensor],
    held: dict[str, list[torch.Tensor]],
    inv_freq: torch.Tensor,
    scaling: float,
) -> list[float]:
    """Mean key MSE and attention KLs over layers of one preparation and spec."""
    layers = len(calib["keys"])
    total = torch.zeros(4)
    for layer in range(layers):
        prep = Preparation(name.replace("+fisher", "").replace("+fw", ""), inv_freq)
        keys = calib["keys"][layer]
        prep.fit(keys, calib["query"][layer])
        x = pooled(prep.forward(keys))
        weights, scale = None, None
        if "fisher" in name or "+fw" in name:  # Fisher weights (on the first 4,096 tokens)
            f = pooled(fisher[layer])
            x = x[:, : f.shape[1]]
            weights = fisher_weights(f, config.dim)
        if "fisher" in name:  # and the Fisher channel scale
            scale = channel_scale(f).half().float()
            x = x * scale[:, None]
        books = fit_layer(x, weights, config, seed=config.seed + 1009 * layer)
        k = held["keys"][layer]
        coded = prep.forward(k)
        if scale is not None:
            coded = coded * scale[None, :, None]
        sub = coded.unflatten(-1, (-1, config.dim))
        codes = encode_residual(sub, [b.half().float() for b in books])
        out = decode(codes, [b.half().float() for b in books]).flatten(-2)
        if scale is not None:
            out = out / scale[None, :, None]
        total += torch.tensor(score(k, prep.back(out), held["query"][layer], scaling)) / layers
    return total.tolist()


def check_rotation(
    model: torch.nn.Module, ids: torch.Tensor, keys: torch.Tensor, inv_freq: torch.Tensor
) -> None:
    """The keys rotated back by their positions are the k projection's output (layer 0)."""
    seen: list[torch.Tensor] = []
    attn = model.model.layers[0].self_attn

    def hook(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> None:
        seen.append(output.detach())

    handle = attn.k_proj.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        handle.remove()
    pre = seen[0][0].view(ids.shape[-1], keys.shape[0], -1).transpose(0, 1)
    back = rotate(keys, torch.arange(keys.shape[1]), inv_freq, back=True)
    err = float((back - pre).abs().max())
    if err > 1e-3 * float(pre.abs().max()):
        raise SystemExit(f"rotation check failed: max error {err}")


if __name__ == "__main__":
    main()
