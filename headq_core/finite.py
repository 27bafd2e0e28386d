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

import torch


class DeviceFlag:
    """Whether everything checked on one device so far was finite, without a device-to-host sync."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self._host = torch.ones((), dtype=torch.bool).pin_memory()
        self._copied: torch.cuda.Event | None = None

    def watch(self, tensors: Iterable[torch.Tensor]) -> None:
        """Fold ``isfinite(t).all()`` of each floating tensor into the flag (device work only)."""
        for t in tensors:
            if t.is_floating_point() and t.numel():
                self.ok &= torch.isfinite(t).all()

    def publish(self) -> None:
        """Start copying the flag to the host (called at the end of a pass)."""
        self._host.copy_(self.ok, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def tripped(self) -> bool:
        """Whether the last published flag says something non-finite was stored; False while the
        copy is still on its way (it is read at a later pass instead: never waits)."""
        if self._copied is None or not self._copied.query():
            return False
        return not bool(self._host)

    def check(self) -> bool:
        """Whether everything checked so far was finite, now (synchronizes with the device)."""
        return bool(self.ok)
