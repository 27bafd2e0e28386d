"""Calibration: statistics from a model run on calibration text, fitted by methods, saved as an artifact.

A method that learns from data sets ``calibration_needs`` (names from :data:`STATISTICS`) and
implements ``fit(stats)``, returning the tensors it wants to keep; ``bind(config, calibration)``
then reads them back with :meth:`Calibration.tensors_for`. The artifact is one ``safetensors``
file whose metadata holds a JSON record: model name, fingerprint and shapes, the method specs,
the calibration text and its hash, the token count and the library version. Loading it into a
model of other shapes is a :class:`~headq_core.errors.CalibrationError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from headq_core.errors import CalibrationError
from headq_core.interfaces import Method

FORMAT = "headq-calibration/1"

STATISTICS = {
    "query_moments": "uncentred second moment E[q q^T] of post-RoPE queries, pooled over each KV head's query heads",
    "key_moments": "uncentred second moment E[k k^T] of post-RoPE keys per KV head",
    "key_samples": "a uniform subsample of post-RoPE keys per (layer, KV head)",
    "value_samples": "a uniform subsample of values per (layer, KV head)",
    "key_fisher": "squared gradient of the calibration LM loss per key channel, aligned with key_samples",
    "value_fisher": "squared gradient of the calibration LM loss per value channel, aligned with value_samples",
    "key_positions": "position of each key sample in its calibration window, aligned with key_samples",
}
_SAMPLES_OF = {  # subsampled alike
    "key_fisher": "key_samples",
    "value_fisher": "value_samples",
    "key_positions": "key_samples",
}
_SQUARED = {"key_fisher", "value_fisher"}  # gradients, kept squared


def model_shape(config: Any) -> dict[str, int]:
    """The shapes a calibration depends on."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    return {
        "layers": int(config.num_hidden_layers),
        "query_heads": int(heads),
        "kv_heads": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(getattr(config, "head_dim", None) or config.hidden_size // heads),
    }


@attrs.define
class CalibrationStats:
    """Statistics per layer, each a tensor with the KV head first."""

    shape: dict[str, int]
    tokens: int = 0
    # on the CPU, whatever device each layer runs on: (kv_heads, d, d) float64, averaged
    query_moments: list[torch.Tensor] = attrs.Factory(list)
    key_moments: list[torch.Tensor] = attrs.Factory(list)
    key_samples: list[torch.Tensor] = attrs.Factory(list)  # (kv_heads, n, d) float32
    value_samples: list[torch.Tensor] = attrs.Factory(list)
    key_fisher: list[torch.Tensor] = attrs.Factory(list)  # (kv_heads, n, d) float32, d loss/d k squared
    value_fisher: list[torch.Tensor] = attrs.Factory(list)
    key_positions: list[torch.Tensor] = attrs.Factory(list)  # (kv_heads, n, 1) int64
    config: Any = None  # the model's config (rotary settings), where the statistics came from a model


@attrs.define
class Calibration:
    """Fitted tensors of one or more methods, with what they were fitted on."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]

    @staticmethod
    def key(kind: str, spec: str, name: str) -> str:
        return f"{kind}:{spec}/{name}"

    def tensors_for(self, kind: str, method: Method) -> dict[str, torch.Tensor]:
        """The tensors fitted for ``method`` (by its canonical spec); raises if there are none."""
        prefix = f"{kind}:{method.spec}/"
        found = {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}
        if not found:
            have = sorted({k.split("/", 1)[0] for k in self.tensors})
            raise CalibrationError(
                f"this calibration holds nothing for {kind} method {method.spec}; it was made for: "
                f"{', '.join(have) or 'nothing'}. Run `headq calibrate --{kind}s '{method.spec}' --out FILE`."
            )
        return found

    def check_model(self, config: Any) -> None:
        expected = self.metadata.get("model_shape")
        actual = model_shape(config)
        if not isinstance(expected, dict):
            raise CalibrationError(
                f"calibration for model {self.metadata.get('model')!r} records no model shape "
                f"(got {expected!r}); it cannot be checked against this model"
            )
        if expected != actual:
            diff = ", ".join(
                f"{k}: artifact {expected.get(k)} vs model {v}"
                for k, v in actual.items()
                if expected.get(k) != v
            )
            raise CalibrationError(
                f"calibration for model {self.metadata.get('model')!r} does not fit this model ({diff})"
            )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")  # processes of a sharded bench may race
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}
        metadata = {**self.metadata, "tensors_sha256": tensors_sha256(tensors)}
        save_file(tensors, str(tmp), metadata={"headq": json.dumps(metadata)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, config: Any = None) -> Calibration:
        """Read an artifact; with ``config``, check that it fits that model."""
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"no calibration file at {path}")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = (handle.metadata() or {}).get("headq")
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise CalibrationError(f"{path} is not a readable calibration artifact: {err}") from err
        if raw is None:
            raise CalibrationError(f"{path} is a safetensors file without headq calibration metadata")
        try:
            metadata = json.loads(raw)
        except json.JSONDecodeError as err:
            raise CalibrationError(f"{path}: corrupted calibration metadata: {err}") from err
        if not isinstance(metadata, dict):
            raise CalibrationError(f"{path}: corrupted calibration metadata: not a JSON object")
        if metadata.get("format") != FORMAT:
            raise CalibrationError(f"{path}: unknown calibration format {metadata.get('format')!r}")
        recorded = metadata.get("tensors_sha256")  # absent from artifacts older than the checksum
        if recorded is not None and recorded != tensors_sha256(tensors):
            raise CalibrationError(f"{path}: corrupted calibration: the tensors do not match their checksum")
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CalibrationError(f"{path}: corrupted calibration: tensor {name!r} holds NaN or Inf")
        calibration = cls(tensors, metadata)
        if config is not None:
            calibration.check_model(config)
        return calibration


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _positions(keys: torch.Tensor) -> torch.Tensor:
    """Each key's position in its window: (1, kv_heads, tokens, 1) int64, as the samples are laid out."""
    return torch.arange(keys.shape[-2]).expand(1, keys.shape[1], -1)[..., None]


@torch.no_grad()
def collect_statistics(
    model: Any,
    windows: Iterable[torch.Tensor],
    needs: set[str],
    *,
    max_samples: int = 65536,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> CalibrationStats:
    """Run the exact model over ``windows`` ((1, n) ids each) and gather the statistics in ``needs``."""
    from headq_core.harness.diagnostics import capture_window

    unknown = needs - set(STATISTICS)
    if unknown:
        raise CalibrationError(
            f"unknown calibration statistics {sorted(unknown)}; known: {sorted(STATISTICS)}"
        )
    stats = CalibrationStats(model_shape(model.config), config=model.config)
    generator = torch.Generator().manual_seed(seed)
    wanted = needs | {_SAMPLES_OF[name] for name in needs & _SAMPLES_OF.keys()}
    samples: dict[str, list[list[torch.Tensor]]] = {
        name: [] for name in ("key_samples", "value_samples", *_SAMPLES_OF)
    }
    seen = 0
    for ids in windows:
        captured = capture_window(model, ids, grads=bool(needs & _SQUARED))
        for layer_idx, cap in sorted(captured.items()):
            hkv, d = cap.keys.shape[1], cap.keys.shape[-1]
            if "query_moments" in needs:
                q = cap.query[0].reshape(hkv, -1, d).double()  # query heads of a KV head pooled
                _accumulate(stats.query_moments, layer_idx, (q.transpose(-1, -2) @ q / q.shape[1]).cpu())
            if "key_moments" in needs:
                k = cap.keys[0].double()
                _accumulate(stats.key_moments, layer_idx, (k.transpose(-1, -2) @ k / k.shape[1]).cpu())
            for name, tensor in (
                ("key_samples", cap.keys),
                ("value_samples", cap.values),
                ("key_fisher", cap.key_grad),
                ("value_fisher", cap.value_grad),
                ("key_positions", _positions(cap.keys) if "key_positions" in wanted else None),
            ):
                if name in wanted and tensor is not None:
                    while len(samples[name]) <= layer_idx:
                        samples[name].append([])
                    samples[name][layer_idx].append(
                        tensor[0].cpu().square() if name in _SQUARED else tensor[0].cpu()
                    )
        stats.tokens += ids.shape[-1]
        seen += 1
        if progress is not None:
            progress(ids.shape[-1])
    for moments in (stats.query_moments, stats.key_moments):
        for i, m in enumerate(moments):
            moments[i] = m / max(seen, 1)  # each window added its own mean
    keeps: dict[tuple[str, int], torch.Tensor] = {}
    for name, per_layer in samples.items():  # samples before their Fisher, which keeps the same tokens
        out = getattr(stats, name)
        for layer_idx, chunks in enumerate(per_layer):
            full = torch.cat(chunks, dim=1)
            if full.shape[1] > max_samples:
                key = (_SAMPLES_OF.get(name, name), layer_idx)
                if key not in keeps:
                    keeps[key] = (
                        torch.randperm(full.shape[1], generator=generator)[:max_samples].sort().values
                    )
                full = full[:, keeps[key]]
            out.append(full)
    return stats


def _accumulate(store: list[torch.Tensor], layer_idx: int, value: torch.Tensor) -> None:
    while len(store) <= layer_idx:
        store.append(torch.zeros_like(value))
    store[layer_idx] = store[layer_idx] + value


def calibrate(
    model: Any,
    windows: list[torch.Tensor],
    methods: list[tuple[str, Method]],
    *,
    model_name: str,
    fingerprint: str,
    text_name: str,
    text_sha256: str,
    progress: Callable[[int], None] | None = None,
    stage: Callable[[str], None] | None = None,
) -> Calibration:
    """Collect what ``methods`` ((kind, method) pairs) need, let each fit, and bundle the result.

    progress(n): called as each window's n tokens are through the model. stage(line): one line
    as each stage starts and ends (statistics with their rate, each method's fit with its time).
    """
    from headq_core import __version__

    say = stage or (lambda line: None)
    needs: set[str] = set()
    for _, method in methods:
        needs |= set(method.calibration_needs)
    started = time.time()
    total = sum(w.shape[-1] for w in windows)
    say(f"collecting {', '.join(sorted(needs))} over {total} tokens in {len(windows)} passes")
    stats = collect_statistics(model, windows, needs, progress=progress)
    took = time.time() - started
    say(f"statistics collected in {took:.1f} s ({total / max(took, 1e-9):.0f} tokens/s)")
    tensors: dict[str, torch.Tensor] = {}
    for kind, method in methods:
        fit_started = time.time()
        say(f"fitting {kind} method {method.spec}")
        fitted = method.fit(stats)
        say(f"fitted {kind} method {method.spec} in {time.time() - fit_started:.1f} s")
        if not fitted:
            raise CalibrationError(f"{kind} method {method.spec} fitted nothing; it needs no calibration")
        for name, tensor in fitted.items():
            tensors[Calibration.key(kind, str(method.spec), name)] = tensor
    metadata = {
        "format": FORMAT,
        "model": model_name,
        "model_fingerprint": fingerprint,
        "model_shape": stats.shape,
        "methods": [f"{kind}:{method.spec}" for kind, method in methods],
        "text": text_name,
        "text_sha256": text_sha256,
        "tokens": stats.tokens,
        "statistics": sorted(needs),
        "library_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
    }
    return Calibration(tensors, metadata)
