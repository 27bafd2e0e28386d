"""Cache operations generation relies on (beam reorder, batch select/repeat, crop), the storage
count, the window/sinks rule, and streaming emulation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
import pytest
import torch

from headq_core import QuantizedKVCache, get_registry
from headq_core.attention import headq_attention
from headq_core.builtin import ExactKeys, ExactValues
from headq_core.compat import cache_kwargs
from headq_core.layer import QuantizedLayer
from headq_core.layouts import EncodedBlock, iter_stored
from headq_core.registry import Registry
from headq_core.testing import feed, outlier_data

ModelFactory = Callable[..., Any]
IdsFactory = Callable[..., torch.Tensor]

pytestmark = [
    pytest.mark.usefixtures("no_grad"),
    pytest.mark.skipif("kivi" not in get_registry().names("key"), reason="headq-kivi not installed"),
]

KEYS, VALUES = "kivi:bits=2,group=16", "kivi:bits=4"


def _run(model: Any, cache: QuantizedKVCache, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed ``ids`` through the model in passes of ``chunks`` tokens; the logits of every pass."""
    out, start = [], 0
    for n in chunks:
        out.append(model(ids[:, start : start + n], **cache_kwargs(model, cache), use_cache=True).logits)
        start += n
    return torch.cat(out, dim=1)


def _filled(make_model: ModelFactory, make_ids: IdsFactory, *, keys: str = KEYS, values: str = VALUES) -> Any:
    """A llama (GQA) model and a batch-3 cache holding sinks, encoded blocks and a window."""
    model = make_model("llama")
    model.set_attn_implementation("headq")
    cache = QuantizedKVCache(keys, values, window=5, sinks=2, config=model.config)
    ids = make_ids(3, 45, seed=7)
    _run(model, cache, ids, [30, *[1] * 15])
    for layer in cache.quantized_layers():
        for stream in (layer.k, layer.v):
            assert stream.sinks is not None and stream.blocks and stream.window is not None
    return model, cache


def _decoded(cache: QuantizedKVCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [layer.decoded() for layer in cache.quantized_layers()]


def _stored(layer: QuantizedLayer) -> dict[str, torch.Tensor]:
    """Every batched tensor the layer holds, by a stable name."""
    out: dict[str, torch.Tensor] = {}
    for kind, stream in (("k", layer.k), ("v", layer.v)):
        out[f"{kind}.sinks"] = stream.sinks
        out[f"{kind}.window"] = stream.window
        for i, block in enumerate(stream.blocks):
            for name, tensor, _, batched in iter_stored(block):
                if batched:
                    out[f"{kind}.block{i}.{name}"] = tensor
    return out


@pytest.mark.parametrize("beam_idx", [[2, 0, 0], [1, 2, 0]])
def test_reorder_cache_permutes_every_tensor(
    beam_idx: list[int], make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    _, cache = _filled(make_model, make_ids)
    idx = torch.tensor(beam_idx)
    before = _decoded(cache)
    stored = [_stored(layer) for layer in cache.quantized_layers()]
    cache.reorder_cache(idx)
    for (k0, v0), (k1, v1) in zip(before, _decoded(cache), strict=True):
        assert torch.equal(k1, k0[idx]) and torch.equal(v1, v0[idx])
    for old, layer in zip(stored, cache.quantized_layers(), strict=True):
        new = _stored(layer)
        assert new.keys() == old.keys()
        for name in old:
            assert torch.equal(new[name], old[name][idx]), name


def test_reordered_cache_continues_like_the_rows_it_took(
    make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model, cache = _filled(make_model, make_ids)
    _, twin = _filled(make_model, make_ids)
    perm = torch.tensor([1, 2, 0])
    nxt = make_ids(3, 4, seed=8)
    cache.reorder_cache(perm)
    got = _run(model, cache, nxt, [1, 3])
    # the un-reordered twin, fed row perm[i]'s tokens in row perm[i]
    want = _run(model, twin, nxt[torch.argsort(perm)], [1, 3])
    # a row's logits in another batch position may round differently with two threads (up to
    # 3e-6 seen); a wrong reorder moves them by O(1)
    torch.testing.assert_close(got, want[perm], rtol=1e-5, atol=1e-5)


def test_batch_select_indices(make_model: ModelFactory, make_ids: IdsFactory) -> None:
    model, cache = _filled(make_model, make_ids)
    before, nbytes = _decoded(cache), cache.nbytes()
    keep = torch.tensor([0, 2])
    cache.batch_select_indices(keep)
    for (k0, v0), (k1, v1) in zip(before, _decoded(cache), strict=True):
        assert torch.equal(k1, k0[keep]) and torch.equal(v1, v0[keep])
    assert cache.nbytes() * 3 == nbytes * 2  # every tensor the cache holds has the batch axis
    logits = model(make_ids(2, 1, seed=9), **cache_kwargs(model, cache)).logits
    assert logits.shape == (2, 1, 128) and torch.isfinite(logits).all()


def test_batch_repeat_interleave(make_model: ModelFactory, make_ids: IdsFactory) -> None:
    model, cache = _filled(make_model, make_ids)
    before, nbytes = _decoded(cache), cache.nbytes()
    cache.batch_repeat_interleave(2)
    for (k0, v0), (k1, v1) in zip(before, _decoded(cache), strict=True):
        assert torch.equal(k1, k0.repeat_interleave(2, dim=0))
        assert torch.equal(v1, v0.repeat_interleave(2, dim=0))
    assert cache.nbytes() == 2 * nbytes
    nxt = make_ids(3, 1, seed=9).repeat_interleave(2, dim=0)
    logits = model(nxt, **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(logits[0::2], logits[1::2], rtol=0, atol=1e-6)


@pytest.mark.parametrize(("window", "sinks"), [(0, 0), (3, 2)])
@pytest.mark.parametrize("remove", [1, 5, 19])
def test_crop_then_continue_matches_the_cropped_sequence(
    window: int, sinks: int, remove: int, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model("qwen2")
    ids = make_ids(2, 20, seed=11)
    more = make_ids(2, 6, seed=12)
    model.set_attn_implementation("headq")
    cache = QuantizedKVCache("fp16", "fp16", window=window, sinks=sinks, config=model.config)
    _run(model, cache, ids, [12, *[1] * 8])
    before = _decoded(cache)
    cache.crop(-remove)
    kept = 20 - remove
    assert cache.get_seq_length() == kept
    for (k0, v0), (k1, v1) in zip(before, _decoded(cache), strict=True):
        assert torch.equal(k1, k0[:, :, :kept]) and torch.equal(v1, v0[:, :, :kept])
    got = _run(model, cache, more, [1, 2, 3])
    model.set_attn_implementation("sdpa")
    want = model(torch.cat([ids[:, :kept], more], dim=1), use_cache=False).logits[:, kept:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remove", [1, 10])
def test_a_crop_within_the_recent_passes_leaves_no_trace(
    remove: int, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    """The 45 tokens came in passes of 30 and 15 x 1, all within CROP_TOKENS: the cropped cache
    holds exactly what a cache that only ever saw the kept tokens holds, and goes on identically
    (before, a crop left the kept tokens in their decoded form: up to 0.86 off in the keys)."""
    model, cache = _filled(make_model, make_ids)
    cache.crop(-remove)
    kept = 45 - remove
    fresh = QuantizedKVCache(KEYS, VALUES, window=5, sinks=2, config=model.config)
    ids = make_ids(3, 45, seed=7)
    _run(model, fresh, ids[:, :kept], [30, *[1] * (kept - 30)])
    for a, b in zip(cache.quantized_layers(), fresh.quantized_layers(), strict=True):
        assert a.get_seq_length() == b.get_seq_length() == kept
        for x, y in zip(a.decoded(), b.decoded(), strict=True):
            assert torch.equal(x, y)
    assert cache.nbytes() == fresh.nbytes() and cache.is_croppable
    more = make_ids(3, 12, seed=13)
    assert torch.equal(_run(model, cache, more, [4, *[1] * 8]), _run(model, fresh, more, [4, *[1] * 8]))


@pytest.mark.parametrize(
    ("keys", "values"), [(KEYS, VALUES), ("headq", "gsrq"), ("gsrq:bits=2", "kivi:bits=2")]
)
@pytest.mark.parametrize("remove", [1, 7, 33, 56])
def test_a_crop_is_the_cache_that_never_saw_the_tokens(keys: str, values: str, remove: int) -> None:
    """Tokens in passes of 25, 1, 9, 1, 1, 20 (57 in all) through the attention, then a crop
    anywhere back: every stored tensor equals a cache fed the same tokens without the cropped
    ones (the passes cut where the crop falls)."""
    from headq_core.testing.calibration import calibration_for
    from headq_core.testing.driving import model_config

    config = model_config(head_dim=64, layers=1)
    calibration = calibration_for(keys, values, config, tokens=256)
    k, v, q = (outlier_data((2, h, 57, 64), seed=s) for h, s in ((2, 1), (2, 2), (4, 3)))
    chunks = [25, 1, 9, 1, 1, 20]
    cache = QuantizedKVCache(keys, values, window=6, sinks=1, config=config, calibration=calibration)
    feed(cache, k, v, q, chunks)
    cache.crop(-remove)
    kept, cut = 57 - remove, []
    for n in chunks:
        if sum(cut) < kept:
            cut.append(min(n, kept - sum(cut)))
    fresh = QuantizedKVCache(keys, values, window=6, sinks=1, config=config, calibration=calibration)
    feed(fresh, k, v, q, cut)
    a, b = cache.quantized_layers()[0], fresh.quantized_layers()[0]
    assert a.get_seq_length() == b.get_seq_length() == kept
    stored_a, stored_b = _stored(a), _stored(b)
    assert stored_a.keys() == stored_b.keys()
    for name, t in stored_a.items():
        assert (t is None and stored_b[name] is None) or torch.equal(t, stored_b[name]), name


def test_a_value_policy_with_a_statistic_is_not_croppable() -> None:
    """A²'s statistic took in the queries a crop removes: the cache says so, as transformers asks."""
    from headq_core.testing.driving import model_config

    assert not QuantizedKVCache("kivi:bits=2", "a2", config=model_config()).is_croppable
    assert QuantizedKVCache("kivi:bits=2", "kivi:bits=2", config=model_config()).is_croppable


@pytest.mark.parametrize("remove", [10, 44])
def test_a_crop_further_back_keeps_what_attention_read(
    monkeypatch: pytest.MonkeyPatch, remove: int, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    """Beyond the remembered passes (here the last 4 tokens), encoded tokens come back decoded."""
    from headq_core import layer as layer_module

    monkeypatch.setattr(layer_module, "CROP_TOKENS", 4)
    model, cache = _filled(make_model, make_ids)
    before = _decoded(cache)
    for layer in cache.quantized_layers():
        assert (layer.k.encoded, layer.v.encoded) == (32, 38)
    cache.crop(-remove)
    kept = 45 - remove
    for layer, (k0, v0) in zip(cache.quantized_layers(), before, strict=True):
        assert layer.get_seq_length() == kept
        k1, v1 = layer.decoded()
        # nothing exact is invented: the kept tokens read exactly as they did before the cut
        assert torch.equal(k1, k0[:, :, :kept]) and torch.equal(v1, v0[:, :, :kept])
    _run(model, cache, make_ids(3, 20, seed=13), [4, *[1] * 16])
    for layer, (k0, v0) in zip(cache.quantized_layers(), before, strict=True):
        assert layer.get_seq_length() == kept + 20
        for stream in (layer.k, layer.v):
            assert stream.sink_len() + stream.encoded == layer.encoded_end(stream, kept + 20)
        # Tokens that were encoded before the cut and went back to the window decoded are encoded
        # again in the same groups; affine quantization of its own reconstruction is exact, so they
        # still read the same. (Tokens that were exact then are encoded now, for the first time.)
        k1, v1 = layer.decoded()
        lossy_k, lossy_v = min(kept, 2 + 32), min(kept, 2 + 38)  # sinks + encoded before the cut
        assert torch.equal(k1[:, :, :lossy_k], k0[:, :, :lossy_k])
        assert torch.equal(v1[:, :, :lossy_v], v0[:, :, :lossy_v])


def test_crop_edge_cases(make_model: ModelFactory, make_ids: IdsFactory) -> None:
    model, cache = _filled(make_model, make_ids)
    before = _decoded(cache)
    cache.crop(0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(before, _decoded(cache), strict=True))
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    cache.crop(-1000)
    assert cache.get_seq_length() == 0
    # an emptied cache starts over exactly like a fresh one, sinks included
    fresh = QuantizedKVCache(KEYS, VALUES, window=5, sinks=2, config=model.config)
    ids = make_ids(3, 40, seed=17)
    torch.testing.assert_close(_run(model, cache, ids, [25, 1, 14]), _run(model, fresh, ids, [25, 1, 14]))
    for (k0, v0), (k1, v1) in zip(_decoded(fresh), _decoded(cache), strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)


def _tensor_bytes(value: Any) -> int:
    """Bytes of every tensor reachable from ``value``, walking attrs fields, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, EncodedBlock):
        return sum(_tensor_bytes(getattr(value, f.name)) for f in attrs.fields(type(value)))
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def test_nbytes_counts_every_tensor(make_model: ModelFactory, make_ids: IdsFactory) -> None:
    _, cache = _filled(make_model, make_ids)
    manual = 0
    for layer in cache.quantized_layers():
        for stream in (layer.k, layer.v):
            manual += _tensor_bytes([stream.sinks, stream.window, stream.blocks])
            manual += stream.method.state_nbytes(layer.layer_idx)
        manual += _tensor_bytes(layer.sq_attention)
    assert cache.nbytes() == manual
    parts = cache.nbytes_by_part()
    assert sum(sum(p.values()) for p in parts.values()) == manual

    # From first principles, per layer: batch 3 x 2 KV heads of 16 channels, 45 tokens, float32 model.
    rows, d, tokens, sinks, window = 3 * 2, 16, 45, 2, 5
    enc_k = (tokens - sinks - window) // 16 * 16  # keys leave the window in groups of 16
    enc_v = tokens - sinks - window  # values one by one
    # keys: 2-bit codes along tokens, fp16 scale and minimum per 16 tokens, the rest float32
    keys = rows * d * (enc_k * 2 // 8 + enc_k // 16 * 4 + (tokens - enc_k) * 4)
    # values: 4-bit codes along channels, fp16 scale and minimum per token (group = head_dim)
    values = rows * (enc_v * d * 4 // 8 + enc_v * 4 + (tokens - enc_v) * d * 4)
    layers = len(cache.quantized_layers())
    assert sum(parts["keys"].values()) == layers * keys
    assert sum(parts["values"].values()) == layers * values
    assert parts["keys"]["exact"] == layers * rows * d * (tokens - enc_k) * 4
    assert parts["keys"]["payload"] == layers * rows * d * enc_k * 2 // 8


def _one_pass(cache: QuantizedKVCache, k: torch.Tensor, v: torch.Tensor, q: torch.Tensor) -> None:
    """Layer 0 of ``cache`` takes the tokens ``k, v`` (b, h, n, d) and attends with queries ``q``."""
    start = cache.get_seq_length()
    n = k.shape[-2]
    positions = torch.arange(start + n)
    mask = (positions[None, :] <= positions[start:, None]).expand(k.shape[0], 1, n, start + n)
    k_tagged, v_new = cache.update(k, v, 0)
    headq_attention(torch.nn.Module().eval(), q, k_tagged, v_new, mask)


@pytest.mark.parametrize(
    ("window", "group", "sinks"), [(0, 16, 0), (5, 16, 0), (16, 8, 3), (3, 32, 4), (40, 16, 2)]
)
def test_exact_keys_follow_the_window_rule(window: int, group: int, sinks: int) -> None:
    cache = QuantizedKVCache(f"kivi:bits=4,group={group}", "kivi:bits=4", window=window, sinks=sinks)
    shape = (1, 2, 70, 32)
    k, v, q = (outlier_data(shape, seed=s) for s in (1, 2, 3))
    done = 0
    for n in (1, 1, 2, 9, 1, 1, 1, 17, 1, 3, 1, 1, 30, 1):
        sl = slice(done, done + n)
        _one_pass(cache, k[..., sl, :], v[..., sl, :], q[..., sl, :])
        done += n
        layer = cache.quantized_layers()[0]
        exact_k = layer.k.sink_len() + (0 if layer.k.window is None else layer.k.window.shape[-2])
        exact_v = layer.v.sink_len() + (0 if layer.v.window is None else layer.v.window.shape[-2])
        held_sinks = min(done, sinks)
        assert layer.k.sink_len() == layer.v.sink_len() == held_sinks
        if done >= sinks + window:
            # the newest `window` tokens stay exact; older ones leave in whole groups (values: singly)
            assert window <= exact_k - held_sinks < window + group
            assert (done - exact_k) % group == 0
            assert exact_v == held_sinks + window
        else:
            assert exact_k == exact_v == done
        assert exact_k == done - (layer.encoded_end(layer.k, done) - held_sinks)
        assert layer.k.encoded + exact_k == layer.v.encoded + exact_v == done
    assert done == 70


def test_sinks_and_window_hold_the_exact_keys(make_model: ModelFactory, make_ids: IdsFactory) -> None:
    model = make_model("llama")
    model.set_attn_implementation("headq")
    ids = make_ids(2, 41, seed=14)
    exact = QuantizedKVCache("fp16", "fp16", config=model.config)
    quant = QuantizedKVCache(KEYS, VALUES, window=5, sinks=3, config=model.config)
    _run(model, exact, ids, [20, *[1] * 21])
    _run(model, quant, ids, [20, *[1] * 21])
    # layer 0's keys and values depend on the tokens only, so both caches saw the same ones
    k_exact, v_exact = exact.quantized_layers()[0].decoded()
    layer = quant.quantized_layers()[0]
    k_q, v_q = layer.decoded()
    end_k = layer.encoded_end(layer.k, 41)
    end_v = layer.encoded_end(layer.v, 41)
    assert (end_k, end_v) == (35, 36)
    for got, want, end in ((k_q, k_exact, end_k), (v_q, v_exact, end_v)):
        assert torch.equal(got[:, :, :3], want[:, :, :3])  # sinks
        assert torch.equal(got[:, :, end:], want[:, :, end:])  # window
        err = (got[:, :, 3:end] - want[:, :, 3:end]).abs()
        assert err.amax() > 0  # encoded for real
    # within half a quantization step: keys 2-bit per channel, values 4-bit per token
    key_range = k_exact[:, :, 3:end_k].amax(dim=2, keepdim=True) - k_exact[:, :, 3:end_k].amin(
        dim=2, keepdim=True
    )
    val_range = v_exact[:, :, 3:end_v].amax(dim=3, keepdim=True) - v_exact[:, :, 3:end_v].amin(
        dim=3, keepdim=True
    )
    slack = 1e-3 * max(k_exact.abs().amax(), v_exact.abs().amax())  # fp16 scale and minimum
    assert ((k_q - k_exact)[:, :, 3:end_k].abs() <= key_range / 3 / 2 * 1.01 + slack).all()
    assert ((v_q - v_exact)[:, :, 3:end_v].abs() <= val_range / 15 / 2 * 1.01 + slack).all()


# --- streaming emulation ---------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("window", "sinks"), [(0, 0), (6, 0), (0, 3), (7, 2)])
def test_emulated_streaming_equals_true_streaming(
    arch: str, window: int, sinks: int, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model(arch, dtype=torch.float64)
    model.set_attn_implementation("headq")
    prefix, scored = 10, 38
    ids = make_ids(2, prefix + scored, seed=15)

    def cache() -> QuantizedKVCache:
        return QuantizedKVCache(
            "kivi:bits=2,group=16", "kivi:bits=2", window=window, sinks=sinks, config=model.config
        )

    streaming = cache()
    want = _run(model, streaming, ids, [prefix, *[1] * scored])[:, prefix:]
    emulated = cache()
    _run(model, emulated, ids, [prefix])
    emulated.emulate_streaming = True
    got = _run(model, emulated, ids[:, prefix:], [scored])
    assert _rel(got, want) < 1e-4
    # Both end in the same state. Layer 0 sees the tokens only; later layers see float32 attention
    # arithmetic done in another order, which may move an fp16 scale by one unit, never a code.
    for i, ((k0, v0), (k1, v1)) in enumerate(zip(_decoded(streaming), _decoded(emulated), strict=True)):
        tolerance = 1e-6 if i == 0 else 2e-3
        assert _rel(k1, k0) < tolerance and _rel(v1, v0) < tolerance

    # the emulation is what makes them equal: a plain multi-token pass reads its own tokens exact
    plain = cache()
    _run(model, plain, ids, [prefix])
    assert _rel(_run(model, plain, ids[:, prefix:], [scored]), want) > 1e-3


@pytest.mark.parametrize(("window", "sinks"), [(0, 0), (5, 2)])
def test_emulated_streaming_from_the_first_token(
    window: int, sinks: int, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    model = make_model("qwen2", dtype=torch.float64)
    model.set_attn_implementation("headq")
    ids = make_ids(1, 40, seed=16)
    settings: dict[str, Any] = {"window": window, "sinks": sinks, "config": model.config}
    streaming = QuantizedKVCache("kivi:bits=2,group=16", "kivi:bits=4", **settings)
    want = _run(model, streaming, ids, [1] * 40)
    emulated = QuantizedKVCache("kivi:bits=2,group=16", "kivi:bits=4", emulate_streaming=True, **settings)
    got = _run(model, emulated, ids, [40])
    assert _rel(got, want) < 1e-4


# --- attention statistics for value policies ---------------------------------------------------


class _RecordingValues(ExactValues):
    """Exact values that keep the squared attention each encoded token arrived with."""

    name = "recording"
    wants_attention_stats = True

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.seen: list[torch.Tensor] = []

    def encode(self, values: torch.Tensor, layer_idx: int, sq_attention: torch.Tensor | None = None) -> Any:
        assert sq_attention is not None and sq_attention.shape == values.shape[:3]
        self.seen.append(sq_attention.clone())
        return super().encode(values, layer_idx, sq_attention)


def _stats_cache(window: int, *, emulate: bool = False) -> QuantizedKVCache:
    registry = Registry()
    registry.add_key_quantizer(ExactKeys)
    registry.add_value_policy(_RecordingValues)
    return QuantizedKVCache("fp16", "recording", window=window, registry=registry, emulate_streaming=emulate)


@pytest.mark.parametrize("window", [0, 1, 4])
def test_value_policies_get_the_squared_attention_of_their_window(window: int) -> None:
    b, kv_heads, group, tokens, prefill, d = 2, 2, 3, 24, 9, 8
    k, v = outlier_data((b, kv_heads, tokens, d), seed=1), outlier_data((b, kv_heads, tokens, d), seed=2)
    q = outlier_data((b, kv_heads * group, tokens, d), seed=3)
    cache = _stats_cache(window)
    feed(cache, k, v, q, [prefill, *[1] * (tokens - prefill)])

    # exact attention (keys are exact), then who read value j unquantized: the prefill reads
    # everything in flight; decode step i reads exact the last max(window, 1) tokens
    logits = q.reshape(b, kv_heads, group, tokens, d) @ k.unsqueeze(2).transpose(-1, -2) / d**0.5
    causal = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    probs = logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (b, kv, g, i, j)
    i, j = torch.arange(tokens)[:, None], torch.arange(tokens)[None, :]
    exact = causal & ((i < prefill) | (j >= i + 1 - max(window, 1)))
    want = (probs * exact).square().sum(dim=(2, 3))  # (b, kv, j)

    layer = cache.quantized_layers()[0]
    method = cache.value_method
    assert isinstance(method, _RecordingValues)
    flushed = torch.cat(method.seen, dim=-1)
    assert flushed.shape[-1] == layer.v.encoded == tokens - window
    torch.testing.assert_close(flushed, want[..., : tokens - window], rtol=1e-5, atol=1e-6)
    assert layer.sq_attention is not None
    torch.testing.assert_close(layer.sq_attention, want[..., tokens - window :], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("window", [0, 3])
def test_emulated_streaming_gives_value_policies_the_same_statistics(window: int) -> None:
    tokens, prefill = 30, 6
    k, v = outlier_data((1, 2, tokens, 8), seed=4), outlier_data((1, 2, tokens, 8), seed=5)
    q = outlier_data((1, 4, tokens, 8), seed=6)
    streaming = _stats_cache(window)
    feed(streaming, k, v, q, [prefill, *[1] * (tokens - prefill)])
    emulated = _stats_cache(window)
    feed(emulated, k[..., :prefill, :], v[..., :prefill, :], q[..., :prefill, :], [prefill])
    emulated.emulate_streaming = True
    _one_pass(emulated, k[..., prefill:, :], v[..., prefill:, :], q[..., prefill:, :])
    seen = [torch.cat(c.value_method.seen, dim=-1) for c in (streaming, emulated)]  # type: ignore[attr-defined]
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-6)
    windows = [c.quantized_layers()[0].sq_attention for c in (streaming, emulated)]
    torch.testing.assert_close(windows[1], windows[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config_layers", [1, 3])
def test_a_cache_built_for_another_models_config_is_refused(config_layers: int) -> None:
    """A 2-layer model with a cache built for 1 or 3 layers: refused, the mismatch named (before,
    extra layers were appended silently, or never filled)."""
    from transformers import AutoModelForCausalLM

    from headq_core.errors import CacheStateError
    from headq_core.testing import model_config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(head_dim=16), attn_implementation="headq").eval()
    cache = QuantizedKVCache("kivi:bits=2", "fp16", config=model_config(head_dim=16, layers=config_layers))
    ids = torch.randint(1, 100, (1, 8))
    with torch.no_grad(), pytest.raises(CacheStateError, match=f"config of {config_layers} layers"):
        model(ids, **cache_kwargs(model, cache))
        model(ids[:, :1], **cache_kwargs(model, cache))


def test_layer_keys_and_values_are_the_stored_tokens_decoded(
    monkeypatch: pytest.MonkeyPatch, make_model: ModelFactory, make_ids: IdsFactory
) -> None:
    """``layer.keys`` / ``layer.values`` are what the attention reads, decoded on access (None
    before the first update, as on DynamicCache's layers); decoding never reads them."""
    reads: list[str] = []
    for name in ("keys", "values"):
        prop = getattr(QuantizedLayer, name)
        counted = property(
            lambda self, prop=prop, name=name: reads.append(name) or prop.fget(self), prop.fset
        )
        monkeypatch.setattr(QuantizedLayer, name, counted)
    model = make_model("llama")
    model.set_attn_implementation("headq")
    cache = QuantizedKVCache(KEYS, VALUES, window=5, sinks=2, config=model.config)
    ids = make_ids(3, 45, seed=7)
    model.generate(ids[:, :30], **cache_kwargs(model, cache), max_new_tokens=15, do_sample=False)
    assert not reads, f"decoding read layer.{reads[0]}"
    for layer in cache.quantized_layers():
        k, v = layer.decoded()
        assert layer.keys is not None and layer.values is not None
        assert layer.keys.dtype == layer.values.dtype == model.dtype
        assert torch.equal(layer.keys, k.to(model.dtype)) and torch.equal(layer.values, v.to(model.dtype))
        assert layer.keys.shape[-2] == cache.get_seq_length() == 44
        with pytest.raises(AttributeError, match="write through update"):
            layer.keys = k
    fresh = QuantizedKVCache(KEYS, VALUES, window=5, sinks=2, config=model.config)
    assert fresh.layers[0].keys is None and fresh.layers[0].values is None
