"""Layers on several devices, simulated on the CPU: each layer's cache state stays on its own device.

A model sharded by accelerate's ``device_map`` hands each layer's cache keys and values on that
layer's device. Here layer 0's keys, values and queries are moved to the ``meta`` device at the
cache boundary (its attention output comes back as zeros on the CPU, so the model runs on), while
layer 1 stays on the CPU: anything a layer made on another layer's device, or a calibration state
moved once and shared, shows up as a tensor on the wrong device. The harness's ``--device-map``
and its sharding over processes (``torchrun``) are checked here too, with the launcher's
variables set in-process. Two real GPUs: tests/test_devices_gpu.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from conftest import random_ids, tiny_model
from rich.console import Console
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from typer.testing import CliRunner

from headq_core import CacheStateError, QuantizedKVCache, StaticDecode, cache_kwargs
from headq_core.attention import headq_attention, headq_mask
from headq_core.cli import app
from headq_core.devices import on_device
from headq_core.errors import HeadqError
from headq_core.harness.bench import Combination
from headq_core.harness.perplexity import Windowing
from headq_core.harness.run import BenchOptions, run_bench
from headq_core.harness.shard import Shard, merge_parts
from headq_core.testing.calibration import calibration_for

META, CPU = torch.device("meta"), torch.device("cpu")
SPLIT = "headq-split"  # the attention function of the simulated two-device model
PAIRS = [
    ("kivi:bits=2", "kivi:bits=2"),
    ("headq:rank=4", "kivi:bits=4"),  # a calibrated query basis per layer
    ("gsrq", "gsrq"),  # calibrated codebooks per layer, keys and values
]


def _split_attention(module: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """The headq attention, with layer 0's query and mask on the meta device."""
    if module.layer_idx != 0:
        return headq_attention(module, query, key, *args, **kwargs)
    value, mask, *rest = args
    mask = None if mask is None else mask.to(META)
    out, _ = headq_attention(module, query.to(META), key, value, mask, *rest, **kwargs)
    return torch.zeros(out.shape, dtype=out.dtype), None


AttentionInterface.register(SPLIT, _split_attention)
AttentionMaskInterface.register(SPLIT, headq_mask)


def _split(cache: QuantizedKVCache) -> QuantizedKVCache:
    """The cache as a model with layer 0 on the meta device would feed it."""
    update = cache.update

    def on_meta(keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any) -> Any:
        if layer_idx == 0:
            keys, values = keys.to(META), values.to(META)
        return update(keys, values, layer_idx, *args, **kwargs)

    cache.update = on_meta  # type: ignore[method-assign]
    return cache


def _tensors(value: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from ``value`` through attrs fields, tuples and lists (blocks,
    their nested blocks, and the method state they refer to: bases, codebooks)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif attrs.has(type(value)):
        for field in attrs.fields(type(value)):
            yield from _tensors(getattr(value, field.name), seen)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item, seen)


def held_tensors(layer: Any) -> list[torch.Tensor]:
    """Every tensor a layer holds: sinks, window, arenas (with the state their blocks refer to),
    the value policy's statistic."""
    out = [] if layer.sq_attention is None else [layer.sq_attention]
    for stream in (layer.k, layer.v):
        out += list(_tensors((stream.sinks, stream.exact, [a.buffers for a in stream.arenas])))
    return out


def layer_devices(layer: Any) -> set[torch.device]:
    return {t.device for t in held_tensors(layer)}


def _generate(arch: str, keys: str, values: str) -> tuple[Any, QuantizedKVCache]:
    model = tiny_model(arch, attn=SPLIT)
    calibration = calibration_for(keys, values, model.config, tokens=256)
    cache = QuantizedKVCache(keys, values, window=8, config=model.config, calibration=calibration)
    ids = random_ids(2, 40)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        model.generate(
            ids, attention_mask=mask, **cache_kwargs(model, _split(cache)), max_new_tokens=40, do_sample=False
        )
    return model, cache


@pytest.mark.parametrize(("keys", "values"), PAIRS)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_each_layer_keeps_its_tokens_and_state_on_its_own_device(arch: str, keys: str, values: str) -> None:
    """After a padded prompt and 40 generated tokens (blocks encoded in both layers), layer 0 holds
    only meta tensors and layer 1 only CPU ones: windows, arenas, and the bases and codebooks
    their blocks read; a beam reorder and a crop keep it so."""
    _, cache = _generate(arch, keys, values)
    layers = cache.quantized_layers()
    assert [layer.device for layer in layers] == [META, CPU]
    for layer in layers:
        assert layer.k.arenas and layer.v.arenas, "nothing was encoded: the test would check nothing"
    assert layer_devices(layers[0]) == {META}
    assert layer_devices(layers[1]) == {CPU}
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.crop(-3)
    assert layer_devices(layers[0]) == {META} and layer_devices(layers[1]) == {CPU}
    assert cache.nbytes() > 0  # the accounting reads both devices


def test_a_calibration_gives_each_layer_its_own_copy_on_its_device() -> None:
    """HeadQ's bases and GSRQ's codebooks from one artifact: in a cache whose layer 0 is on meta,
    layer 0's state is on meta and layer 1's on the CPU; the artifact keeps its CPU tensors, so a
    second cache from it, all on the CPU, gets CPU state for layer 0."""
    config = tiny_model("llama").config
    artifact = calibration_for("headq:rank=4", "gsrq", config, tokens=256)
    assert artifact is not None
    before = {name: (t, t.device) for name, t in artifact.tensors.items()}

    def state(cache: Any, layer_idx: int) -> set[torch.device]:
        """Devices of the layer's basis and codebooks, as the methods hold them and as its blocks read them."""
        layer = cache.layers[layer_idx]
        held = [cache.key_method.layers[layer_idx], cache.value_method.books.layers[layer_idx]]
        held += [b.basis for b in layer.k.blocks] + [b.books for b in layer.v.blocks]
        return {t.device for t in _tensors(held)}

    caches = []
    for split in (True, False):
        cache = QuantizedKVCache("headq:rank=4", "gsrq", window=8, config=config, calibration=artifact)
        model = tiny_model("llama", attn=SPLIT if split else "headq")
        with torch.no_grad():
            model(random_ids(1, 48), **cache_kwargs(model, _split(cache) if split else cache), use_cache=True)
        caches.append(cache)
    assert state(caches[0], 0) == {META} and state(caches[0], 1) == {CPU}
    assert state(caches[1], 0) == {CPU} and state(caches[1], 1) == {CPU}
    assert all(artifact.tensors[name] is t and t.device == d for name, (t, d) in before.items())


def test_static_decode_refuses_a_cache_on_several_devices() -> None:
    """A static step holds one device's buffers: a cache whose layers are on two devices is refused
    with the reason, not run with one layer's tensors on the other's device."""
    model, cache = _generate("llama", "kivi:bits=2", "kivi:bits=2")
    model.set_attn_implementation("headq")
    with pytest.raises(CacheStateError, match="several devices"):
        StaticDecode(model, cache, capacity=200, graphs=False)


def test_each_layers_attention_runs_under_its_own_device_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device, not its tensors': the attention function makes
    each layer's device current (a CUDA device here is only named, never touched)."""
    from headq_core import attention

    guarded: list[torch.device] = []
    monkeypatch.setattr(attention, "on_device", lambda device: guarded.append(device) or on_device(device))
    _generate("llama", "kivi:bits=2", "fp16")
    assert guarded[:4] == [META, CPU, META, CPU] and set(guarded) == {META, CPU}
    guard = on_device(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


def test_a_model_under_accelerates_hooks_generates_the_same_tokens() -> None:
    """accelerate's dispatch (the hooks a device_map installs, which move each module's inputs to
    its device; every module on the CPU here) gives the tokens of the plain model."""
    from accelerate import dispatch_model

    ids = random_ids(2, 40)
    out = []
    for hooked in (False, True):
        model = tiny_model("llama", attn="headq")
        if hooked:
            dispatch_model(model, device_map={"": "cpu"}, main_device="cpu", force_hooks=True)
            assert hasattr(model.model.layers[1], "_hf_hook")
        cache = QuantizedKVCache("kivi:bits=2", "kivi:bits=2", window=8, config=model.config)
        with torch.no_grad():
            out.append(model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=30, do_sample=False))
    assert torch.equal(out[0], out[1])


# --- the harness: --device-map, and a bench sharded over processes ---------------------------------


def test_the_launchers_variables_give_the_shard() -> None:
    assert Shard.from_env({}) is None
    assert Shard.from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert Shard.from_env({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Shard(1, 2, 1)
    assert Shard.from_env({"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1"}) == Shard(5, 8, 1)
    for bad in ({"WORLD_SIZE": "2", "RANK": "2"}, {"WORLD_SIZE": "two"}):
        with pytest.raises(HeadqError):
            Shard.from_env(bad)


@pytest.mark.parametrize("world", [1, 2, 3, 5, 9])
def test_the_shards_split_the_rows_disjointly_and_completely(world: int) -> None:
    for count in range(12):
        taken = [i for rank in range(world) for i in Shard(rank, world, rank).rows(count)]
        assert sorted(taken) == list(range(count))


def _bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, out: Path, env: dict[str, str]) -> list[Any]:
    """``run_bench`` on a tiny Llama and a text file, under the launcher variables ``env``;
    returns the combinations it measured and the device maps it loaded with."""
    from headq_core.harness import bench, loading, run
    from headq_core.harness.loading import LoadedModel

    class Characters:
        def __call__(self, text: str, **_: object) -> dict:
            return {"input_ids": [ord(c) % 128 for c in text]}

    loads: list[Any] = []

    def load_model(name: Any, *, device_map: Any = None, **_: Any) -> LoadedModel:
        loads.append(device_map)
        return LoadedModel(tiny_model("llama", attn="headq"), Characters(), "tiny", "0123456789abcdef")

    measured: list[Any] = []
    real_measure = bench.measure
    monkeypatch.setattr(loading, "load_model", load_model)
    monkeypatch.setattr(
        run,
        "measure",
        lambda m, w, combo, *a, **k: measured.append(combo) or real_measure(m, w, combo, *a, **k),
    )
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text("".join(chr(32 + (i * 7919) % 95) for i in range(800)))
    options = BenchOptions(
        model="tiny",
        text=str(text),
        combinations=tuple(
            Combination(k, v)
            for k, v in [
                ("kivi:bits=2", "fp16"),
                ("kivi:bits=2", "kivi:bits=2"),
                ("kivi:bits=4", "kivi:bits=4"),
                ("kivi:bits=1", "kivi:bits=2"),
            ]
        ),
        windowing=Windowing(prefix=64, scored=32, windows=3, batch=2),
        window=8,
        diag_windows=1,
        skip=frozenset({"speed", "stream"}),  # timings differ from run to run
        device_map="auto" if not env else None,
    )
    run_bench(options, out_dir=out, console=Console(file=io.StringIO()))
    return [measured, loads]


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """A result without what differs between two runs of the same bench: clocks and the machine."""
    drop = ("created", "seconds", "environment")
    rows = [
        {k: v for k, v in row.items() if k not in ("seconds", "harness_tokens_per_s")}
        for row in result["rows"]
    ]
    return {**{k: v for k, v in result.items() if k not in drop}, "rows": rows}


def test_a_sharded_bench_merges_into_the_single_process_result(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Three processes (RANK 0-2 of WORLD_SIZE 3, set in-process) measure disjoint rows that
    cover the bench; `headq merge` of their parts writes the JSON a single process writes, but for
    clocks and the machine. Without a launcher, --device-map reaches the model's loading; under
    one, each process loads on its own GPU (none here: the CPU)."""
    single, loads = _bench(monkeypatch, tmp_path, tmp_path / "single", {})
    assert loads == ["auto"]
    taken = []
    for rank in range(3):
        measured, loads = _bench(
            monkeypatch, tmp_path, tmp_path / "parts", {"RANK": str(rank), "WORLD_SIZE": "3"}
        )
        assert loads == [None]
        taken += measured
    assert sorted(map(str, taken)) == sorted(map(str, single)) and len(taken) == len(single) == 5
    parts = sorted((tmp_path / "parts").glob("bench.rank*.json"))
    assert [p.name for p in parts] == ["bench.rank0.json", "bench.rank1.json", "bench.rank2.json"]
    outcome = CliRunner().invoke(app, ["merge", *map(str, parts)])
    assert outcome.exit_code == 0, outcome.output
    merged = json.loads((tmp_path / "parts" / "bench.json").read_text())
    alone = json.loads((tmp_path / "single" / "bench.json").read_text())
    assert merged["environment"]["processes"] == 3
    assert [(r["keys"], r["values"]) for r in merged["rows"]] == [
        (r["keys"], r["values"]) for r in alone["rows"]
    ]
    assert _comparable(merged) == _comparable(alone)
    assert (tmp_path / "parts" / "bench.md").exists() and (tmp_path / "parts" / "bench.png").exists()
    with pytest.raises(HeadqError, match="ranks 0 to 2"):
        merge_parts(parts[:2])
    other = json.loads(parts[1].read_text())
    other["windowing"]["prefix"] = 65
    parts[1].write_text(json.dumps(other))
    with pytest.raises(HeadqError, match="windowing"):
        merge_parts(parts)
