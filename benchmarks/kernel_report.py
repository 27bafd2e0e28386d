"""Compile report of the decode kernels for sm_90, without a GPU: registers, spills, shared memory,
layout conversions and the SASS of the token loop (instructions per warp per tile, by opcode).

Run::

    python benchmarks/kernel_report.py [NAME ...] [--cap REGISTERS]

Needs Triton with its bundled CUDA tools (``cuobjdump``); the settings are those of the
benchmark's Llama-3-8B shapes (4 query heads per KV head, head_dim 128, 128-token tiles), and
each launch's own register cap unless ``--cap`` sets another. Spilled registers show as local
loads and stores in the token loop.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from headq_kernels import folded_launch, triton_decode, triton_folded

COMMON = dict(q_ptr="*fp16", qr_ptr="*fp32", seg_ptr="*i64", split_ptr="*i32", mask_ptr="*u8", o_ptr="*fp32")
COMMON.update(ml_ptr="*fp32", HKV="i32", n_splits="i32", mask_stride="i32", qk_scale="fp32")
COMMON.update(tail_ptr="*fp32", tail_start="i32", tail_len="i32")
FOLDED_ARGS = dict(COMMON, zb_ptr="*fp32", ngb="i32")
GENERIC_ARGS = COMMON
FOLDED = dict(
    G=4, GP=4, D=128, BLOCK_N=128, K_BITS=2, K_GROUP=32, V_BITS=2, V_GROUP=32, V_HI=0, V_CHUNK=0, V_PLACES=1
)
FOLDED.update(R=0, Z_BITS=4, HAS_MASK=True, TAIL=False, HILO=False)
A2 = dict(FOLDED, V_HI=4, V_CHUNK=32, V_PLACES=4)  # A² values: 2 and 4 bits in rows of 32 tokens, 3 at 4
GENERIC = dict(
    G=4, G_PAD=16, ROWS=16, D=128, BLOCK_N=128, K_KIND=0, K_BITS=2, K_GROUP=32, K_BOOK=(1, 8, 0, 1, 0, 0)
)
GENERIC.update(K_TOK=(0, 8, 1, 2, 2), V_TOK=(0, 8, 1, 2, 2))
GENERIC.update(
    V_KIND=0, V_BITS=2, V_GROUP=32, V_BOOK=(1, 8, 0, 1, 0, 0), V_MIXED=(2, 2, 2, 2, 1, 1, 0), R=0, R_PAD=16
)
GENERIC.update(Z_BITS=4, HAS_MASK=True, TAIL=False, DT=tl.float16, MATH=tl.float16, ALIGNED=True)

CASES: dict[str, tuple[Any, dict[str, str], dict[str, Any]]] = {
    "folded kivi2": (triton_folded._folded_split_kernel, FOLDED_ARGS, FOLDED),
    "folded kivi2 hilo": (triton_folded._folded_split_kernel, FOLDED_ARGS, dict(FOLDED, HILO=True)),
    "folded kivi4": (triton_folded._folded_split_kernel, FOLDED_ARGS, dict(FOLDED, K_BITS=4, V_BITS=4)),
    "folded headq r8": (triton_folded._folded_split_kernel, FOLDED_ARGS, dict(FOLDED, R=8)),
    "folded a2": (triton_folded._folded_split_kernel, FOLDED_ARGS, A2),
    "folded a2 tail": (triton_folded._folded_split_kernel, FOLDED_ARGS, dict(A2, TAIL=True)),
    "generic kivi2": (triton_decode._decode_split_kernel, GENERIC_ARGS, GENERIC),
    "generic headq r8": (triton_decode._decode_split_kernel, GENERIC_ARGS, dict(GENERIC, R=8)),
    # A² values: 2 and 4 bits; greedy over 1, 2, 4 and 8 bits (rows of 32 tokens)
    "generic a2": (triton_decode._decode_split_kernel, GENERIC_ARGS, dict(GENERIC, V_KIND=2, V_MIXED=(2, 4, 4, 4, 2, 32, 1))),
    "generic a2 greedy": (
        triton_decode._decode_split_kernel, GENERIC_ARGS, dict(GENERIC, V_KIND=2, V_MIXED=(1, 2, 4, 8, 4, 32, 2)),
    ),
    # GSRQ at 1 bit: one stage of 256 codewords of 8 channels, for keys (read as the query's float16
    # tables) and values
    "generic gsrq": (
        triton_decode._decode_split_kernel,
        dict(GENERIC_ARGS, qr_ptr="*fp16"),
        dict(GENERIC, ROWS=4, K_KIND=3, K_BOOK=(8, 8, 0, 1, 0, 16), V_KIND=3, V_BOOK=(8, 8, 0, 1, 0, 16)),
    ),
    # what engines ship: scaled tokens (fp8 e4m3, int4 with a scale per token and head) and rotated
    # tokens at 3.5 bits (4 and 3 bits for the two halves), keys and values alike
    "generic fp8": (
        triton_decode._decode_split_kernel, GENERIC_ARGS, dict(GENERIC, K_KIND=4, K_TOK=(1, 8, 1, 2, 2), V_KIND=4, V_TOK=(1, 8, 1, 2, 2)),
    ),
    "generic int4": (
        triton_decode._decode_split_kernel, GENERIC_ARGS, dict(GENERIC, K_KIND=4, K_TOK=(0, 4, 1, 2, 2), V_KIND=4, V_TOK=(0, 4, 1, 2, 2)),
    ),
    "generic rotation 3.5": (
        triton_decode._decode_split_kernel, GENERIC_ARGS, dict(GENERIC, K_KIND=5, K_TOK=(0, 8, 1, 4, 3), V_KIND=5, V_TOK=(0, 8, 1, 4, 3)),
    ),
}  # fmt: skip


def report(
    kernel: Any, args: dict[str, str], constants: dict[str, Any], top: int = 10, cap: int | None = None
) -> str:
    """One kernel's report; ``cap``: compile under this register cap instead of the launch's (0: none)."""
    options: dict[str, Any] = dict(num_warps=4, num_stages=2)
    if kernel is triton_folded._folded_split_kernel:  # the launch's own settings
        c = constants
        options.update(
            folded_launch.settings(c["D"], c["G"], c["K_BITS"], c["R"], c["HILO"], c["V_CHUNK"] > 0)
        )
    elif triton_decode.CODEBOOK in (constants["K_KIND"], constants["V_KIND"]):
        options.update(num_stages=1)  # as ``triton_decode.attend`` launches codebook tiles
    if cap is not None:
        options["maxnreg"] = cap or None
    signature = dict(args, **{name: "constexpr" for name in constants})
    source = ASTSource(kernel, signature, constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])

        def dump(flag: str) -> str:
            cmd = [os.path.join(tools, "cuobjdump"), flag, path]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

        usage, sass = dump("-res-usage"), dump("-sass")
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    assert found, usage
    lines = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = []  # backward branches: (target, branch)
    for address, text in lines:
        branch = re.search(r"BRA\s.*0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            loops.append((int(branch.group(1), 16), address))
    start, end = max(loops, key=lambda loop: loop[1] - loop[0]) if loops else (0, 0)
    body = [
        re.sub(r"^@!?U?P\w+\s+", "", text).split()[0] for address, text in lines if start <= address <= end
    ]
    opcodes = collections.Counter(op.split(".")[0] for op in body).most_common(top)
    moves = sum(op == "IMAD.MOV.U32" for op in body)
    local = sum(op.startswith(("LDL", "STL")) for op in body)  # spilled registers, read and written
    return (
        f"registers {found.group(1)}, spill stack {found.group(2)} B, shared {compiled.metadata.shared} B, "
        f"layout conversions {compiled.asm['ttgir'].count('convert_layout')}; token loop {len(body)} instructions "
        f"per warp ({moves} register moves, {local} local loads and stores): "
        f"{', '.join(f'{op} {n}' for op, n in opcodes)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"cases to compile, of: {', '.join(CASES)} (all)")
    parser.add_argument("--opcodes", type=int, default=10, help="the most frequent opcodes to list")
    parser.add_argument(
        "--cap",
        type=int,
        default=None,
        help="compile under this register cap instead of the launch's (0: none)",
    )
    args = parser.parse_args()
    if unknown := set(args.names) - set(CASES):
        parser.error(f"unknown cases: {', '.join(sorted(unknown))}")
    for name in args.names or CASES:
        print(f"{name}: {report(*CASES[name], top=args.opcodes, cap=args.cap)}", flush=True)


if __name__ == "__main__":
    main()
