"""The three interfaces a plugin implements: key quantizers, value policies, distortion metrics.

Shapes used throughout (numpy-style docstrings repeat them where tensors are made):
- keys, values: ``(batch, kv_heads, tokens, head_dim)``
- grouped queries: ``(batch, kv_heads, rows, head_dim)`` where ``rows = group_size * q_len``, the
  query heads that share one KV head laid out head-major (GQA folded into rows)
- logits and attention: ``(batch, kv_heads, rows, tokens)``
"""

from __future__ import annotations

import re
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import attrs
import torch

from headq_core.errors import SpecError, suggest
from headq_core.layouts import EncodedBlock
from headq_core.spec import Spec, parse_spec

AttentionStatistic = Literal["sq_attention", "attention"]


@attrs.frozen
class MethodConfig:
    """Base of every method config: a frozen attrs class whose fields are the spec parameters.

    Give each field a default, a validator and ``metadata={"help": "..."}``. Field types may be
    int, float, bool, str or :class:`Spec` (a nested method, e.g. HeadQ's base quantizer).
    """

    version: ClassVar[int] = 1

    @classmethod
    def parameters(cls) -> list[attrs.Attribute[Any]]:
        attrs.resolve_types(cls)
        return list(attrs.fields(cls))

    @classmethod
    def from_params(cls, params: dict[str, Any], *, method: str) -> MethodConfig:
        """Build a config from spec parameters (strings or typed values), with clear errors."""
        fields = {f.name: f for f in cls.parameters()}
        kwargs: dict[str, Any] = {}
        for key, raw in params.items():
            if key not in fields:
                known = ", ".join(fields) or "none"
                raise SpecError(
                    f"method {method!r} has no parameter {key!r}.{suggest(key, fields)} "
                    f"Its parameters: {known}."
                )
            kwargs[key] = _convert(raw, fields[key].type, method, key)
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            # attrs validators raise (message, attribute, bound, value): show the message only
            reason = err.args[0] if len(err.args) > 1 and isinstance(err.args[0], str) else err
            raise SpecError(f"invalid parameters for {method!r}: {reason}") from err

    def to_params(self, *, all_fields: bool = False) -> tuple[tuple[str, str | Spec], ...]:
        """Spec parameters of this config: those differing from the default, or all of them."""
        out: list[tuple[str, str | Spec]] = []
        for field in self.parameters():
            value = getattr(self, field.name)
            if all_fields or field.default is attrs.NOTHING or value != field.default:
                out.append((field.name, value if isinstance(value, Spec) else _format(value)))
        return tuple(out)


def _format(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


_NUMBER = {
    int: re.compile(r"[+-]?[0-9]+", re.ASCII),
    float: re.compile(
        r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|nan)", re.ASCII | re.IGNORECASE
    ),
}


def _convert(raw: Any, annotation: Any, method: str, key: str) -> Any:
    if not isinstance(raw, (str, Spec)):
        return raw  # already typed (configs built in code)
    kind = annotation if isinstance(annotation, type) else None
    if annotation is Spec or kind is Spec:
        return parse_spec(raw)
    if isinstance(raw, Spec):
        raise SpecError(f"parameter {key!r} of {method!r} takes a plain value, not a nested spec")
    choices = typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else ()
    if choices:
        if raw not in choices:
            raise SpecError(
                f"parameter {key!r} of {method!r} must be one of {', '.join(map(str, choices))}; "
                f"got {raw!r}.{suggest(raw, map(str, choices))}"
            )
        return raw
    try:
        if kind is bool:
            low = raw.lower()
            if low not in _TRUE | _FALSE:
                raise ValueError(raw)
            return low in _TRUE
        # Python's int() and float() take other scripts' digits and underscores ("２", "1_6"): a
        # spec is ASCII, so that what it says is what it reads as
        if kind in (int, float) and not _NUMBER[kind].fullmatch(raw):
            raise ValueError(raw)
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        raise SpecError(
            f"parameter {key!r} of {method!r} must be {kind.__name__ if kind else annotation}, got {raw!r}"
        ) from None
    return raw


class Method(ABC):
    """What key quantizers and value policies share: a name, a config and per-layer state."""

    name: ClassVar[str]
    config_class: ClassVar[type[MethodConfig]]
    summary: ClassVar[str] = ""
    calibration_needs: ClassVar[frozenset[str]] = frozenset()
    # (keys spec, values spec) of this method's rows in ``headq bench``'s default suite; empty: its
    # default spec with exact values (a key quantizer) or behind KIVI-2 keys (a value policy)
    suite_rows: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: MethodConfig | None = None) -> None:
        config = self.config_class() if config is None else config
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} takes a {self.config_class.__name__}")
        self.config = config

    @property
    def spec(self) -> Spec:
        return Spec(self.name, self.config.to_params())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"

    @property
    def block_tokens(self) -> int:
        """Tokens per encode unit: the cache flushes the window in multiples of this."""
        return 1

    def stores_exactly(self, dtype: torch.dtype) -> bool:
        """Whether encoding tokens of ``dtype`` keeps them exactly as they are (``fp16`` in the
        model's dtype). The cache then never calls :meth:`encode`: the tokens stay where they are."""
        return False

    def state_nbytes(self, layer_idx: int) -> int:
        """Bytes of per-layer state the method holds besides its blocks (bases, codebooks)."""
        return 0

    def nominal_bits(self, head_dim: int) -> dict[str, float]:
        """Bits per element of an encoded token by part, for ``headq describe`` (no window)."""
        return {}

    def stores(self) -> str:
        """One line on what an encoded block holds, for ``headq describe``."""
        return self.summary

    def fit(self, stats: Any) -> dict[str, torch.Tensor]:
        """Fit to :class:`~headq_core.calibration.CalibrationStats`; the tensors to keep.

        Only methods with ``calibration_needs`` are asked; the result is saved in the artifact
        and handed back through :meth:`bind`.
        """
        return {}

    def bind(self, model_config: Any, calibration: Any = None) -> None:  # noqa: B027
        """Called once by the cache before use, with the model config and any calibration.

        Methods that need calibration raise :class:`~headq_core.errors.CalibrationError` here
        when it is missing or does not fit the model.
        """


class KeyQuantizer(Method):
    """Encodes key blocks and computes logits against them.

    A method that corrects logits (HeadQ) overrides :meth:`logits`; everything else in the
    runtime goes through :meth:`encode` and the block's own ``dequantize``.
    """

    @abstractmethod
    def encode(self, keys: torch.Tensor, layer_idx: int) -> EncodedBlock:
        """keys: (batch, kv_heads, tokens, head_dim), tokens a multiple of ``block_tokens``."""

    def encode_at(self, keys: torch.Tensor, layer_idx: int, start: int) -> EncodedBlock:
        """:meth:`encode` for keys whose first token is the layer's token ``start`` (sinks
        included), as the cache calls it. A method whose encoding depends on where a token sits
        (keys rotated back to before the rotary embedding) overrides it; the default ignores it."""
        return self.encode(keys, layer_idx)

    def logits(self, query: torch.Tensor, block: EncodedBlock, layer_idx: int) -> torch.Tensor:
        """Raw dot products ``q . k_hat`` (unscaled).

        query: (batch, kv_heads, rows, head_dim) float32. Returns (batch, kv_heads, rows, tokens).
        """
        return query @ block.dequantize(query.dtype).transpose(-1, -2)

    def keys_as_read(self, block: EncodedBlock, dtype: torch.dtype) -> torch.Tensor | None:
        """(batch, kv_heads, tokens, head_dim): keys whose dot products with a query are
        :meth:`logits`, or None where the logits are not such dot products.

        A multi-token pass reads keys given this way through PyTorch's SDPA, in bounded memory
        and at its speed; without them it computes :meth:`logits` tile by tile. The default is the
        dequantized block where the method keeps the default :meth:`logits`, None where it
        overrides them: a method whose own logits are dot products (a faster formula, a logit
        correction folded into its ``dequantize``) overrides this too.
        """
        if type(self).logits is not KeyQuantizer.logits:
            return None
        return block.dequantize(dtype)


class ValuePolicy(Method):
    """Encodes value blocks and reads them out with attention weights.

    A policy that sets ``wants_attention_stats`` receives, at encode time, the running sum of
    squared attention of each token over the queries that saw it while it sat in the window
    (summed over the query heads of its KV group). A policy may name another statistic with
    :attr:`attention_statistic`: ``"attention"`` gives the running sum of attention itself.
    """

    wants_attention_stats: ClassVar[bool] = False

    @property
    def attention_statistic(self) -> AttentionStatistic | None:
        """The running sum the cache keeps per window token and hands to :meth:`encode`.

        ``"sq_attention"`` sums ``p^2``, ``"attention"`` sums ``p``; None keeps nothing (no cost).
        """
        return "sq_attention" if self.wants_attention_stats else None

    @abstractmethod
    def encode(
        self, values: torch.Tensor, layer_idx: int, sq_attention: torch.Tensor | None = None
    ) -> EncodedBlock:
        """values: (batch, kv_heads, tokens, head_dim); sq_attention: (batch, kv_heads, tokens), the
        statistic named by :attr:`attention_statistic` (None when it names none)."""

    def readout(self, probs: torch.Tensor, block: EncodedBlock, layer_idx: int) -> torch.Tensor:
        """probs: (batch, kv_heads, rows, tokens). Returns (batch, kv_heads, rows, head_dim)."""
        return probs @ block.dequantize(probs.dtype)

    def values_as_read(self, block: EncodedBlock, dtype: torch.dtype) -> torch.Tensor | None:
        """(batch, kv_heads, tokens, head_dim): values whose probability-weighted sum is
        :meth:`readout`, or None; the default as for :meth:`KeyQuantizer.keys_as_read`."""
        if type(self).readout is not ValuePolicy.readout:
            return None
        return block.dequantize(dtype)


@attrs.frozen
class AttentionSample:
    """One decode attention sample for the distortion metrics, for every (batch, kv head).

    query: (batch, kv_heads, rows, head_dim), exact and quantized keys and values:
    (batch, kv_heads, tokens, head_dim); logits and probs: (batch, kv_heads, rows, tokens), logits
    already scaled; mask: (batch, 1, rows or 1, tokens) bool, True where attention is allowed.
    """

    query: torch.Tensor
    keys: torch.Tensor
    keys_hat: torch.Tensor
    values: torch.Tensor
    values_hat: torch.Tensor
    logits: torch.Tensor
    logits_hat: torch.Tensor
    probs: torch.Tensor
    probs_hat: torch.Tensor
    mask: torch.Tensor


@attrs.frozen
class DistortionMetric:
    """A named function of an :class:`AttentionSample` giving a value per (batch, kv_head)."""

    name: str
    fn: Callable[[AttentionSample], torch.Tensor]
    description: str = ""

    def __call__(self, sample: AttentionSample) -> torch.Tensor:
        return self.fn(sample)
