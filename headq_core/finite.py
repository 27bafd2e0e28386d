"""No NaN or Inf is stored silently, and checking for them never stalls the GPU.

On the CPU a check costs nothing but the reduction, so the cache checks every pass's tokens, and
every block a method encodes, before it stores them (the error then names the layer, position and
channel, and nothing of the pass is kept). On a GPU reading a reduction back would make the host
wait for the device in every layer of every step, so :class:`DeviceFlag` instead folds each check
into one device-side flag, copied to pinned host memory at the end of a pass without a sync; the
next pass reads that copy once the device has written it (``generate`` synchronizes between steps
anyway), and the cache then finds the culprit and refuses to go on. :meth:`DeviceFlag.check` reads
the flag at once, with a sync, for callers that want to know now.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def checkable(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a one-byte float (float8) its float16 copy: NaN and Inf carry over, and the
    reductions the checks use exist for it."""
    return t.to(torch.float16) if t.element_size() == 1 else t


class DeviceFlag:
    """Whether everything checked on one device so far was finite, without a device-to-host sync.

    Each tensor checked costs one reduction: its sum in float32, which is NaN or Inf exactly when
    one of its elements is (float16 and bfloat16 values, and any float32 value below 1e30, cannot
    add up to an overflow); the pass's sums are folded into the flag once, at its end.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self._host = torch.ones((), dtype=torch.bool).pin_memory()
        self._copied: torch.cuda.Event | None = None
        self._sums: list[torch.Tensor] = []

    def watch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Check each floating tensor (device work only)."""
        self._sums += [
            checkable(t).sum(dtype=torch.float32) for t in tensors if t.is_floating_point() and t.numel()
        ]
        if len(self._sums) > 1024:  # passes that never end (no last layer): fold now and then
            self.ok &= torch.isfinite(torch.stack(self._sums).sum())
            self._sums = []

    def fold(self) -> None:
        """Fold the checks so far into the flag (device work only: a captured graph does this)."""
        if self._sums:
            self.ok &= torch.isfinite(torch.stack(self._sums).sum())
            self._sums = []

    def publish(self) -> None:
        """Fold this pass's checks into the flag and start copying it to the host (at a pass's end)."""
        self.fold()
        self._host.copy_(self.ok, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(self.device))  # the flag's device, not the current one

    def tripped(self) -> bool:
        """Whether the last published flag says something non-finite was stored; False while the
        copy is still on its way (it is read at a later pass instead: never waits)."""
        if self._copied is None or not self._copied.query():
            return False
        return not bool(self._host)

    def check(self) -> bool:
        """Whether everything checked so far was finite, now (synchronizes with the device)."""
        self.publish()
        return bool(self.ok)


def locate_non_finite(layers: Iterable[Any]) -> str:
    """The message for the first non-finite number the cache layers hold (found with syncs: this
    runs only once something was found)."""
    for layer in layers:
        for name, tokens in zip(("keys", "values"), layer.decoded(), strict=True):
            bad = (~torch.isfinite(tokens)).nonzero()
            if bad.shape[0]:
                b, h, t, c = bad[0].tolist()
                return (
                    f"layer {layer.layer_idx}: {name} hold {tokens[b, h, t, c].item()} at batch {b}, kv head "
                    f"{h}, position {t}, channel {c}, stored by an earlier pass (on a GPU the check runs "
                    "without stalling the device, so it reports a pass late); this cache cannot continue, "
                    "start a new one"
                )
    return "a non-finite number was stored (not found again in the decoded tokens); start a new cache"
