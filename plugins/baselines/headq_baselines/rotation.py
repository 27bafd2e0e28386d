"""A rotation-family method in the TurboQuant line: rotate each token, then optimal scalar codes.

TurboQuant (Zandieh, Daliri, Hadian, Mirrokni, 2025, arXiv:2504.19874) rotates each vector by a
random orthogonal matrix, after which every coordinate follows the same known distribution (for a
unit vector in ``d`` dimensions, close to ``N(0, 1/d)``), so one scalar quantizer built for that
distribution (Lloyd–Max) serves every coordinate; the norm is kept apart. Here:

- the rotation is a randomized Hadamard transform, ``H diag(s) / sqrt(d)`` with signs ``s``
  drawn from ``seed``, rebuilt from the spec whenever it is used (so it is held nowhere and counts
  0 bits); ``head_dim`` must be a power of two;
- each token of each KV head is rotated, divided by its norm times ``1 / sqrt(d)``, and each
  coordinate coded to the nearest of the ``2^b`` Lloyd–Max levels for ``N(0, 1)``; the norm is
  stored in float16;
- fractional ``bits`` (2.5, 3.5) put the first half of the rotated coordinates at one bit more
  than the second (after the rotation no coordinate is special): ``bits + 16 / head_dim`` per
  element either way.

What differs from the paper: a Hadamard rotation instead of a dense random one, the Gaussian
instead of the exact Beta law of the coordinates, and no 1-bit residual sketch (QJL) for keys.
"""

from __future__ import annotations

import functools
import math

import attrs
import torch

from headq_baselines.pair import key_and_value
from headq_core import MethodConfig
from headq_core.layouts import EncodedBlock, NoKernelLayout, stored
from headq_kernels import decode_plan, pack_planes, unpack_planes

BITS = (2.0, 2.5, 3.0, 3.5, 4.0)


@attrs.frozen
class RotationConfig(MethodConfig):
    bits: float = attrs.field(
        default=3.0,
        validator=attrs.validators.in_(BITS),
        metadata={"help": "code bits per element: 2 to 4 by halves"},
    )
    seed: int = attrs.field(default=0, metadata={"help": "seed of the rotation's random signs"})

    @property
    def widths(self) -> tuple[int, int]:
        """Code bits of the first and of the second half of the rotated coordinates."""
        return math.ceil(self.bits), math.floor(self.bits)

    def bits_per_element(self, head_dim: int) -> dict[str, float]:
        return {"payload": float(self.bits), "scales": 16.0 / head_dim}


@functools.cache
def levels(bits: int) -> torch.Tensor:
    """The ``2^bits`` Lloyd–Max levels of ``N(0, 1)`` (float32, ascending): each level is the mean
    of the normal law between the midpoints to its neighbours."""
    n = 1 << bits
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    c = normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)  # start at the quantiles
    for _ in range(200):
        edges = torch.cat(
            [torch.tensor([-math.inf]), (c[1:] + c[:-1]) / 2, torch.tensor([math.inf])]
        ).double()
        mass = normal.cdf(edges[1:]) - normal.cdf(edges[:-1])
        pdf = torch.exp(-0.5 * edges.clamp(-40, 40) ** 2) / math.sqrt(2 * math.pi)
        c = (pdf[:-1] - pdf[1:]) / mass
    return c.float()


@functools.cache
def rotation(head_dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """``H diag(s) / sqrt(d)`` (d, d) float32: orthogonal, rebuilt from the seed once per device
    (a CUDA-graph capture that encodes must find it there already). Do not write to it."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two head_dim, got {head_dim}")
    h = torch.ones((1, 1))
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    return (h * signs / math.sqrt(head_dim)).to(device)


@functools.cache
def kernel_tables(
    widths: tuple[int, int], head_dim: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """What the decode kernel reads besides the tokens (rebuilt from the spec, like the rotation):
    each half's levels over ``sqrt(d)`` (2, 16) float32, and the interleaved basis (d, d) float32."""
    table = torch.zeros(2, 16)
    for row, width in enumerate(widths):
        table[row, : 1 << width] = levels(width) / math.sqrt(head_dim)
    return table.to(device), decode_plan.interleaved_basis(rotation(head_dim, seed, device))


@functools.cache
def _levels_on(bits: int, device: torch.device) -> torch.Tensor:
    return levels(bits).to(device)


@functools.cache
def _bounds_on(bits: int, device: torch.device) -> torch.Tensor:
    """The midpoints between neighbouring levels, where the nearest level changes."""
    table = _levels_on(bits, device)
    return (table[1:] + table[:-1]) / 2


def _code(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Index of the nearest level for each coordinate of ``u`` (standard-normal scale)."""
    return torch.bucketize(u.contiguous(), _bounds_on(bits, u.device))


@attrs.define(kw_only=True)
class RotatedBlock(EncodedBlock):
    """first, second: (b, h, tokens, words) int32, the level indices of the first and second half
    of the rotated coordinates, packed as bit planes; norm (b, h, tokens, 1) float16."""

    first: torch.Tensor = stored("payload")
    second: torch.Tensor = stored("payload")
    norm: torch.Tensor = stored("scales")
    widths: tuple[int, int]
    seed: int
    head_dim: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d = self.head_dim
        parts = [
            _levels_on(width, words.device)[unpack_planes(words, width, d // 2).long()]
            for words, width in ((self.first, self.widths[0]), (self.second, self.widths[1]))
        ]
        y = torch.cat(parts, dim=-1) * (self.norm.float() / math.sqrt(d))
        return (y @ rotation(d, self.seed, y.device)).to(dtype)  # rows times R: R^T applied to each

    def kernel_segment(self, covered: int) -> decode_plan.Segment:
        """The kernel attends in the rotated basis: the query turns once per split, never a token."""
        d = self.head_dim
        if d < 64:
            raise NoKernelLayout(
                f"rotated tokens of head_dim {d}: the kernel reads halves of 32 channels or more"
            )
        table, basis = kernel_tables(self.widths, d, self.seed, self.first.device)
        return decode_plan.Rotated(
            self.first, self.second, self.norm, table, basis, self.tokens, self.widths, self.dequantize, covered=covered
        )  # fmt: skip


def encode(x: torch.Tensor, config: RotationConfig) -> RotatedBlock:
    """(b, h, tokens, d) -> its :class:`RotatedBlock`."""
    d = x.shape[-1]
    y = x.float() @ rotation(d, config.seed, x.device).T
    norm = y.norm(dim=-1, keepdim=True).to(torch.float16)
    # code against the stored float16 norm, so that decoding reproduces the encoder's numbers
    u = y * (math.sqrt(d) / norm.float().clamp_min(torch.finfo(torch.float16).tiny))
    hi, lo = config.widths
    return RotatedBlock(
        tokens=x.shape[-2],
        first=pack_planes(_code(u[..., : d // 2], hi), hi),
        second=pack_planes(_code(u[..., d // 2 :], lo), lo),
        norm=norm,
        widths=(hi, lo),
        seed=config.seed,
        head_dim=d,
    )


SUITE_ROWS = (("rotation:bits=2.5", "rotation:bits=2.5"), ("rotation:bits=3.5", "rotation:bits=3.5"))


RotationKeys, RotationValues = key_and_value(
    "Rotation",
    "rotation",
    RotationConfig,
    encode,
    "randomized Hadamard rotation, Lloyd-Max codes per coordinate, a float16 norm per token and KV head",
    SUITE_ROWS,
)
