"""Every registered key quantizer and value policy passes the conformance kit, and the kit catches
methods that break its rules."""

from __future__ import annotations

import math
from typing import Any

import attrs
import pytest
import torch

from headq_core import KeyQuantizer, MethodConfig, QuantizedKVCache, get_registry
from headq_core.builtin import ExactKeys, ExactValues
from headq_core.layouts import AffineBlock, DenseBlock, EncodedBlock, stored
from headq_core.registry import Registry
from headq_core.spec import Spec
from headq_core.testing import (
    check_key_quantizer,
    check_value_policy,
    feed,
    outlier_data,
    snr_db,
    snr_floor_db,
)
from headq_core.testing.driving import model_config
from headq_kernels import bytes_along_tokens, quantize_affine

_REGISTRY = get_registry()
_KIVI = "kivi" in _REGISTRY.names("key")
_KIVI_SPECS = [
    f"kivi:bits={bits},group={group}"
    for bits in (1, 2, 4, 8)
    for group in (16, 32, 64)
    if group % (32 // bits) == 0
]
_EXTRA_SPECS = ["fp16:dtype=float16", "fp16:dtype=bfloat16", "fp16:dtype=float32"]
_BASELINES = "int" in _REGISTRY.names("key")
_BASELINE_SPECS = [
    "fp8:format=e5m2",
    "fp8:scale=none",
    "int:bits=4",
    "int:mode=affine",
    "rotation:bits=2",
    "rotation:bits=2.5",
    "rotation:bits=3.5,seed=7",
    "rotation:bits=4",
    "int:bits=4,mode=affine",
]


def _specs(kind: str) -> list[Any]:
    specs: list[Any] = list(_REGISTRY.names(kind)) + _EXTRA_SPECS
    specs += [
        pytest.param(s, marks=pytest.mark.skipif(not _KIVI, reason="headq-kivi not installed"))
        for s in _KIVI_SPECS
    ]
    specs += [
        pytest.param(s, marks=pytest.mark.skipif(not _BASELINES, reason="headq-baselines not installed"))
        for s in _BASELINE_SPECS
    ]
    return specs


def _floor(spec: str) -> float | None:
    """fp8's SNR floor: its relative rounding, 2^-(mantissa bits + 1), not the integer floor of 8
    payload bits (the kit's default); every other method: the default."""
    if not spec.startswith("fp8"):
        return None
    mantissa = 2 if "e5m2" in spec else 3
    return 20 * math.log10(2.0 ** (mantissa + 1))


@pytest.mark.parametrize("spec", _specs("key"))
def test_key_quantizer_conforms(spec: str) -> None:
    check_key_quantizer(spec, snr_floor=_floor(spec))


@pytest.mark.parametrize("spec", _specs("value"))
def test_value_policy_conforms(spec: str) -> None:
    check_value_policy(spec, snr_floor=_floor(spec))


def test_every_registered_name_is_covered() -> None:
    registry = get_registry()
    assert set(registry.names("key")) <= {str(s) for s in _specs("key")}
    assert set(registry.names("value")) <= {str(s) for s in _specs("value")}
    assert "fp16" in registry.names("key") and "fp16" in registry.names("value")


@pytest.mark.skipif(not _KIVI, reason="headq-kivi not installed")
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_kivi_holds_packed_codes_in_the_cache(bits: int) -> None:
    group, tokens = 32, 96
    cache_ = QuantizedKVCache(f"kivi:bits={bits},group={group}", f"kivi:bits={bits},group={group}")
    shape = (2, 2, tokens, 64)
    k = outlier_data(shape, seed=1, dtype=torch.float16)
    v = outlier_data(shape, seed=2, dtype=torch.float16)
    q = outlier_data((2, 4, tokens, 64), seed=3, dtype=torch.float16)
    feed(cache_, k, v, q, [40, *[1] * (tokens - 40)], layers=2)
    encoded_elements = 0
    for layer in cache_.quantized_layers():
        for stream in (layer.k, layer.v):
            assert stream.blocks, "nothing was encoded"
            for block in stream.blocks:
                assert isinstance(block, AffineBlock)
                # keys: bytes along tokens, channels adjacent; values: int32 words along channels
                assert block.codes.dtype == (torch.uint8 if block.axis == "tokens" else torch.int32)
                encoded_elements += block.tokens * 2 * 2 * 64
    assert encoded_elements == 2 * 2 * (tokens + tokens) * 2 * 64  # window 0: keys and values all encoded
    parts = cache_.nbytes_by_part()
    payload = parts["keys"]["payload"] + parts["values"]["payload"]
    assert payload == bits * encoded_elements // 8
    fp16_bytes = 2 * encoded_elements
    # codes plus two fp16 numbers per group of 32 (keys) or of 32 channels (values)
    assert cache_.nbytes() == payload + 4 * encoded_elements // group
    assert cache_.nbytes() < fp16_bytes


def test_snr_floor_rises_with_bits() -> None:
    floors = [snr_floor_db(b) for b in (0.5, 1, 1.5, 2, 3, 4, 8, 16, 32)]
    assert floors == sorted(floors)
    for bits in (2, 4, 8):
        assert 6.02 * bits - 16 <= snr_floor_db(bits) <= 6.02 * bits - 6
    assert snr_floor_db(16) >= 50


def test_snr_db_measures_noise() -> None:
    x = outlier_data((2, 2, 64, 16), seed=0)
    assert snr_db(x, x) == float("inf")
    noise = 0.1 * x.std() * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    want = 10 * torch.log10(x.square().sum() / noise.square().sum()).item()
    assert snr_db(x, x + noise) == pytest.approx(want, rel=1e-6)
    assert snr_db(x, torch.zeros_like(x)) == pytest.approx(0.0, abs=1e-9)


# --- the kit catches broken methods -------------------------------------------------------------


@attrs.frozen
class _BitsConfig(MethodConfig):
    bits: int = attrs.field(default=4, validator=attrs.validators.in_((2, 4, 8)))


class _AffineKeys(KeyQuantizer):
    """A correct per-channel affine key quantizer, the base the broken ones below bend."""

    name = "affine"
    config_class = _BitsConfig
    config: _BitsConfig
    group = 32

    @property
    def block_tokens(self) -> int:
        return self.group

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        codes, scale, zero = quantize_affine(keys.transpose(-1, -2), self.config.bits, self.group)
        return AffineBlock(
            tokens=keys.shape[-2],
            codes=bytes_along_tokens(codes),
            scale=scale,
            zero=zero,
            bits=self.config.bits,
            group=self.group,
            axis="tokens",
        )

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return {"payload": float(self.config.bits), "scales": 32.0 / self.group}


class _NoScaleKeys(_AffineKeys):
    name = "noscale"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        block = super().encode(keys, layer_idx)
        assert isinstance(block, AffineBlock)
        return attrs.evolve(block, scale=torch.zeros_like(block.scale))


class _FakeQuantKeys(_AffineKeys):
    """Rounds to the grid but keeps the result as a float tensor."""

    name = "fakequant"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        block = super().encode(keys, layer_idx)
        return DenseBlock(tokens=block.tokens, data=block.dequantize(keys.dtype))


@attrs.define(kw_only=True)
class _HiddenBlock(DenseBlock):
    norms: torch.Tensor  # not declared with stored(): the cache would not count it


class _HiddenTensorKeys(_AffineKeys):
    name = "hidden"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        return _HiddenBlock(tokens=keys.shape[-2], data=keys.half(), norms=keys.norm(dim=-1))

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return {"payload": 16.0}


class _NoisyKeys(_AffineKeys):
    name = "noisy"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        return super().encode(keys + 1e-3 * torch.randn_like(keys), layer_idx)


@attrs.define(kw_only=True)
class _WrongAxisBlock(AffineBlock):
    def token_axis(self, name: str) -> int:
        return 2


class _WrongAxisKeys(_AffineKeys):
    name = "wrongaxis"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        block = super().encode(keys, layer_idx)
        return _WrongAxisBlock(**attrs.asdict(block, recurse=False))


@attrs.define(kw_only=True)
class _SharedCodesBlock(EncodedBlock):
    codes: torch.Tensor = stored("payload", batched=False)  # wrong: codes have a batch axis

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.codes.to(dtype)


class _SharedCodesKeys(_AffineKeys):
    name = "shared"

    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        return _SharedCodesBlock(tokens=keys.shape[-2], codes=keys.half())

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        return {"payload": 16.0}


class _ForgetfulSpecKeys(_AffineKeys):
    name = "forgetful"

    @property
    def spec(self) -> Spec:
        return Spec(self.name)


class _UncountedStateKeys(_AffineKeys):
    """Learns a per-layer channel norm from calibration and holds it, but counts nothing."""

    name = "uncounted"
    calibration_needs = frozenset({"key_moments"})

    def fit(self, stats: Any) -> dict[str, torch.Tensor]:
        return {
            "norms": torch.stack([m.diagonal(dim1=-2, dim2=-1).sqrt() for m in stats.key_moments]).float()
        }

    def bind(self, model_config: Any, calibration: Any = None) -> None:
        self.norms = calibration.tensors_for("key", self)["norms"]


class _CountedStateKeys(_UncountedStateKeys):
    name = "counted"

    def state_nbytes(self, layer_idx: int) -> int:
        return self.norms[layer_idx].numel() * self.norms.element_size()


def _registry_with(cls: type[KeyQuantizer]) -> Registry:
    registry = Registry()
    registry.add_key_quantizer(ExactKeys)
    registry.add_value_policy(ExactValues)
    registry.add_key_quantizer(cls)
    return registry


def test_the_correct_base_passes() -> None:
    check_key_quantizer("affine:bits=4", registry=_registry_with(_AffineKeys))


@pytest.mark.parametrize(
    ("cls", "spec", "message"),
    [
        (_NoScaleKeys, "noscale:bits=8", "SNR is .* below the floor"),
        (_FakeQuantKeys, "fakequant:bits=2", "reports 2 payload bits per element but stores 16"),
        (_HiddenTensorKeys, "hidden", "not declared with stored\\(\\): norms"),
        (_NoisyKeys, "noisy", "different stored"),
        (_WrongAxisKeys, "wrongaxis", "do not decode to their concatenation"),
        (_SharedCodesKeys, "shared", "reordering the batch"),
        (_ForgetfulSpecKeys, "forgetful:bits=2", "building from 'forgetful' gives"),
        (_UncountedStateKeys, "uncounted", "state_nbytes counts 0 bytes over 2 layers, but the method holds"),
    ],
)
def test_the_kit_catches(cls: type[KeyQuantizer], spec: str, message: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match=message) as info:
        check_key_quantizer(spec, registry=_registry_with(cls))
    assert spec.split(":")[0] in str(info.value)


def test_state_a_method_counts_passes_the_kit() -> None:
    """The same learned state, counted by state_nbytes, passes (and shows in the cache's bits)."""
    check_key_quantizer("counted", registry=_registry_with(_CountedStateKeys))


def test_the_kit_binds_methods_to_the_model_config() -> None:
    seen: list[Any] = []

    class _Binding(_AffineKeys):
        name = "binding"

        def bind(self, model_config: Any, calibration: Any = None) -> None:
            seen.append((model_config.head_dim, model_config.num_key_value_heads, calibration))

    check_key_quantizer("binding", registry=_registry_with(_Binding), calibration="artifact", windows=())
    assert seen and all(s == (64, 2, "artifact") for s in seen)
    config = model_config(kv_heads=1, head_dim=32)
    assert config.num_attention_heads * config.head_dim == config.hidden_size
