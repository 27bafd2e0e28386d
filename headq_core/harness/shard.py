"""A bench spread over processes, one per GPU, and the one result its parts make.

Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` above 1), process ``RANK`` measures
rows ``RANK``, ``RANK + WORLD_SIZE``, ... of the bench (combinations, then peer rows), on its own
GPU (``cuda:LOCAL_RANK``) unless ``--device-map`` says otherwise, and writes them as
``NAME.rank{RANK}.json``. :func:`merge_parts` (``headq merge OUT/NAME.rank*.json``) puts the rows
back in order and finishes them as a single process would have: the same JSON, but for the
start time, the wall time and ``environment.processes``. The processes never wait for each other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import torch

from headq_core.errors import HeadqError
from headq_core.harness.bench import Combination, finish
from headq_core.harness.report import _json_default

PART_FORMAT = "headq-bench-part/1"
# what every part of one bench must share (the calibration is rank 0's: pass --calibration so
# that every process reads the same artifact)
SHARED = ("model", "text", "windowing", "cache", "baseline", "diagnostics", "skipped", "peers_skipped")


@attrs.frozen
class Shard:
    """This process's place among ``world`` processes of one bench."""

    rank: int
    world: int
    local_rank: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Shard | None:
        """The shard a launcher's variables give (``RANK`` or ``LOCAL_RANK``, ``WORLD_SIZE``), or
        None for a single process."""
        env = os.environ if env is None else env
        try:
            world = int(env.get("WORLD_SIZE") or 1)
            rank = int(env.get("RANK") or env.get("LOCAL_RANK") or 0)
            local_rank = int(env.get("LOCAL_RANK") or rank)
        except ValueError as err:
            raise HeadqError(f"RANK, LOCAL_RANK and WORLD_SIZE must be integers: {err}") from err
        if world <= 1:
            return None
        if not 0 <= rank < world:
            raise HeadqError(f"RANK {rank} is outside WORLD_SIZE {world}")
        return cls(rank, world, local_rank)

    def rows(self, count: int) -> list[int]:
        """Indices of the rows of ``count`` this process measures."""
        return list(range(self.rank, count, self.world))

    def device_map(self) -> str | None:
        """This process's GPU, where there is one."""
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else None

    def part_path(self, out_dir: Path, stem: str) -> Path:
        return Path(out_dir) / f"{stem}.rank{self.rank}.json"


def write_part(result: dict[str, Any], shard: Shard, indices: list[int], total: int, path: Path) -> Path:
    """Write a process's unfinished ``result`` (its rows are rows ``indices`` of ``total``)."""
    part = {**result, "format": PART_FORMAT, "part": {"rank": shard.rank, "world": shard.world}}
    part["part"].update(indices=indices, rows=total)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(part, indent=2, default=_json_default))
    return path


def finished(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` with its rows finished (ΔPPL, excess removed, spreads, correlations)."""
    baseline = result.get("baseline")
    extra = finish(result["rows"], Combination(**baseline) if baseline else None)
    return {**result, **extra}


def merge_parts(paths: list[Path]) -> dict[str, Any]:
    """The result of one bench from the parts its processes wrote (any order, each rank once)."""
    parts = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as err:
            raise HeadqError(f"cannot read bench part {path}: {err}") from err
        if not isinstance(data, dict) or data.get("format") != PART_FORMAT:
            raise HeadqError(f"{path} is not a part of a sharded bench (format {PART_FORMAT})")
        parts.append(data)
    if not parts:
        raise HeadqError("no parts to merge")
    world = parts[0]["part"]["world"]
    ranks = sorted(p["part"]["rank"] for p in parts)
    if ranks != list(range(world)):
        raise HeadqError(f"a bench of {world} processes needs ranks 0 to {world - 1} once each, got {ranks}")
    for key in SHARED:
        if any(p.get(key) != parts[0].get(key) for p in parts):
            raise HeadqError(f"the parts differ in {key!r}: they are not parts of one bench")
    total = parts[0]["part"]["rows"]
    rows = {i: row for p in parts for i, row in zip(p["part"]["indices"], p["rows"], strict=True)}
    if sorted(rows) != list(range(total)):
        raise HeadqError(f"the parts hold rows {sorted(rows)}, not the bench's {total}")
    first = min(parts, key=lambda p: p["part"]["rank"])
    result = {k: v for k, v in first.items() if k != "part"}
    result.update(
        format="headq-bench/1",
        created=min(p["created"] for p in parts),
        seconds=max(p["seconds"] for p in parts),
        environment={**first["environment"], "processes": world},
        rows=[rows[i] for i in range(total)],
    )
    return finished(result)
