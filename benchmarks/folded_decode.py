"""Driver of the folded-scale KIVI decode prototype (``folded_kernels.py``): variants, a CPU check
under Triton's interpreter, GPU timings against the fused kernel and SDPA, an offline compile report.

Run::

    TRITON_INTERPRET=1 OMP_NUM_THREADS=1 python benchmarks/folded_decode.py --check
    python benchmarks/folded_decode.py [--variants [NAME ...]] [--splits N ...] [--shapes BxT ...]
    python benchmarks/folded_decode.py --asm [--variants]   # sm_90 regs/SASS, no GPU
    ncu --kernel-name regex:fold_split --launch-skip 2 --launch-count 1 python benchmarks/folded_decode.py --profile

Token counts must be whole multiples of the split; fp16 only; d = 128, G = 32, bits 2 or 4, GQA 4.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import torch
import triton
from folded_kernels import I2F, MASK, NX, SHIFT, _fold_split_kernel

from headq_kernels.triton_decode import _merge_kernel

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# host side

VARIANTS: dict[str, dict[str, Any]] = {
    # name: kernel options and launch; H100 timings (b=8, t=128k, KIVI-2 / KIVI-4) from the first runs
    "fold-kv/mask": {"unpack": MASK, "fold_v": True},  # 961 / 1001 us: the default
    "fold-kv/shift": {"unpack": SHIFT, "fold_v": True},  # 968 us: the unpack is not the bound any more
    "fold-kv/i2f": {"unpack": I2F, "fold_v": True},  # idea 1+2 alone, int->float unpack (spills)
    "fold-k/shift+magic-v": {"unpack": SHIFT, "fold_v": False},  # 1233 us: keys folded, values dequantized
    "fold-k/i2f": {"unpack": I2F, "fold_v": False},  # idea 1 alone
    "fold-kv/mask/rows16": {"unpack": MASK, "fold_v": True, "row4": False},  # 1048 us: softmax on 16 rows
    "fold-kv/mask/half": {"unpack": MASK, "fold_v": True, "half": True},  # 954 / 952 us: 64-token dots
    "fold-kv/mask/w8": {"unpack": MASK, "fold_v": True, "num_warps": 8},  # 1381 us
    "fold-kv/mask/r128": {"unpack": MASK, "fold_v": True, "maxnreg": 128},  # 988 us: 2x occupancy, no gain
    "fold-kv/mask/s3": {"unpack": MASK, "fold_v": True, "num_stages": 3},  # 1003 us
    "fold-kv/mask/pf8": {"unpack": MASK, "fold_v": True, "l2pf": 8},  # 961 / 1076 us: L2 prefetch, no gain
}
DEFAULT = "fold-kv/mask"
last_compiled: list[Any] = []


def default_split(tokens: int, batch_heads: int, block: int = 128, lo: int = 512, hi: int = 4096) -> int:
    """Splits so that the programs fill 132 SMs about 8 times over; a power of two dividing tokens."""
    want = max(1, tokens * batch_heads // (132 * 8))
    split = min(hi, max(lo, 1 << (want - 1).bit_length()))
    while split > block and tokens % split:
        split //= 2
    return split


def fold_attend(
    q: torch.Tensor,
    keys: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    values: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    k_bits: int,
    v_bits: int,
    group: int = 32,
    scale: float | None = None,
    split: int | None = None,
    unpack: int = MASK,
    fold_v: bool = True,
    num_warps: int = 4,
    num_stages: int = 2,
    maxnreg: int | None = None,
    a_exp: int = 8,
    row4: bool = True,
    half: bool = False,
    l2pf: int = 0,
    work: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """q (b, hkv, gqa, d) fp16; keys = KIVI codes/scale/zero grouped along tokens (b, hkv, d, ...),
    values grouped along channels (b, hkv, t, ...). Returns (b, hkv, gqa, d) fp16."""
    b, hkv, gqa, d = q.shape
    kc, ks, kz = keys
    vc, vs, vz = values
    t = vc.shape[2]
    assert d == NX * group and gqa * NX >= 16 and q.dtype == torch.float16
    assert all(x.is_contiguous() for x in (q, kc, ks, kz, vc, vs, vz))
    split = split or default_split(t, b * hkv)
    assert t % split == 0 and split % (NX * group) == 0, (t, split)
    n_splits = t // split
    scale = d**-0.5 if scale is None else scale
    rows, ngb = NX * gqa, max(16, split // group)
    work = {} if work is None else work
    key = (b * hkv, n_splits, gqa, d, rows * ngb)
    if work.get("key") != key:
        work.clear()
        work["key"] = key  # type: ignore[assignment]
        work["zb"] = torch.empty((b * hkv, n_splits, rows * ngb), dtype=torch.float32, device=q.device)
        work["parts"] = torch.empty((b * hkv, n_splits, gqa, d), dtype=torch.float32, device=q.device)
        work["ml"] = torch.empty((b * hkv, n_splits, gqa, 2), dtype=torch.float32, device=q.device)
    compiled = _fold_split_kernel[(n_splits, b * hkv)](
        q, kc, ks, kz, vc, vs, vz, work["zb"], work["parts"], work["ml"], t, n_splits, scale * LOG2E,
        GQA=gqa, D=d, GROUP=group, SPLIT=split, K_BITS=k_bits, V_BITS=v_bits, UNPACK=unpack, FOLD_V=fold_v,
        A_EXP=a_exp, ROW4=row4, HALF=half, L2PF=l2pf, num_warps=num_warps, num_stages=num_stages,
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )  # fmt: skip
    last_compiled[:] = [compiled]
    out = torch.empty_like(q)
    block_s = min(64, max(2, triton.next_power_of_2(n_splits)))
    _merge_kernel[(b * hkv * gqa,)](
        work["parts"],
        work["ml"],
        out,
        work["ml"],
        n_splits,
        G=gqa,
        D=d,
        BLOCK_S=block_s,
        LSE=False,
        num_warps=4,
    )
    return out


def make_cache(
    b: int, hkv: int, t: int, d: int, k_bits: int, v_bits: int, group: int, device: str, seed: int = 0
):
    """Random fp16 k, v (b, hkv, t, d) and their KIVI records (keys grouped along tokens)."""
    from headq_kernels import quantize_affine

    gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn((b, hkv, t, d), generator=gen, device=device, dtype=torch.float16)
    v = torch.randn((b, hkv, t, d), generator=gen, device=device, dtype=torch.float16)
    # a few outlier key channels, as real keys have
    k[..., :4] *= 8
    keys = quantize_affine(k.transpose(-1, -2), k_bits, group)
    values = quantize_affine(v, v_bits, group)
    return k, v, tuple(x.contiguous() for x in keys), tuple(x.contiguous() for x in values)


def reference(q, keys, values, k_bits, v_bits, group, scale=None) -> torch.Tensor:
    from headq_kernels import dequantize_affine

    d = q.shape[-1]
    scale = d**-0.5 if scale is None else scale
    k = dequantize_affine(*keys, k_bits, group).transpose(-1, -2).float()  # (b, h, t, d)
    v = dequantize_affine(*values, v_bits, group).float()
    logits = (q.float() @ k.transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1) @ v


# --------------------------------------------------------------------------------------------
# CPU check (Triton interpreter)


def check(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    b, hkv, gqa, d, group = 2, 2, 4, 128, 32
    worst = 0.0
    cases = [
        (2, 2, 512, 256, MASK, True),
        (4, 4, 512, 256, MASK, True),
        (2, 2, 512, 256, SHIFT, True),
        (4, 4, 256, 128, SHIFT, True),
        (2, 4, 256, 128, I2F, True),
        (2, 2, 256, 128, SHIFT, False),
        (4, 4, 256, 128, I2F, False),
        (2, 2, 384, 128, MASK, True),
    ]
    runs = [(*case, True, False) for case in cases] + [(*cases[-1], False, False)]
    runs += [(*cases[0], True, True), (*cases[1], True, True), (*cases[3], True, True)]
    if args.quick:
        runs = runs[:1]
    for k_bits, v_bits, t, split, unpack, fold_v, row4, half in runs:
        _, _, keys, values = make_cache(b, hkv, t, d, k_bits, v_bits, group, "cpu", seed=t + k_bits)
        q = (torch.randn((b, hkv, gqa, d)) * 1.5).half()
        ref = reference(q, keys, values, k_bits, v_bits, group)
        t0 = time.time()
        got = fold_attend(q, keys, values, k_bits=k_bits, v_bits=v_bits, group=group, split=split,
                          unpack=unpack, fold_v=fold_v, row4=row4, half=half).float()  # fmt: skip
        err = float((got - ref).norm() / ref.norm())
        worst = max(worst, err)
        name = {I2F: "i2f", SHIFT: "shift", MASK: "mask"}[unpack]
        print(f"bits K{k_bits}/V{v_bits} t={t} split={split} unpack={name} fold_v={fold_v} row4={row4} half={half}: "
              f"rel err {err:.2e} ({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
    print(f"worst rel err {worst:.2e} ({'PASS' if worst < 4e-3 else 'FAIL'}, tolerance 4e-3)")
    if worst >= 4e-3:
        sys.exit(1)


# --------------------------------------------------------------------------------------------
# GPU benchmark


def bench(fn: Any) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def current_kernel(keys, values, b, hkv, t, k_bits, v_bits, group):
    """A plan over one AffineTokens / AffineChannels segment and the repo's attend (block_n=128)."""
    from headq_kernels import decode_plan, triton_decode

    k_seg = decode_plan.AffineTokens(codes=keys[0], scale=keys[1], zero=keys[2], tokens=t)
    v_seg = decode_plan.AffineChannels(codes=values[0], scale=values[1], zero=values[2], tokens=t)
    plan = decode_plan.plan(
        [k_seg], [v_seg], batch_heads=b * hkv, key_bits=k_bits, key_group=group, value_bits=v_bits,
        value_group=group, block_n=128,
    )  # fmt: skip
    return lambda q: triton_decode.attend(q, plan, scale=q.shape[-1] ** -0.5)


def report(compiled: Any) -> str:
    try:
        ttgir = compiled.asm.get("ttgir", "")
        return (f"regs {compiled.n_regs} spills {compiled.n_spills} smem {compiled.metadata.shared} "
                f"convert_layout {ttgir.count('convert_layout')}")  # fmt: skip
    except Exception as err:  # pragma: no cover
        return f"(no report: {err})"


def gpu(args: argparse.Namespace) -> None:
    import torch.nn.functional as F

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    hkv, gqa, d, group = 8, 4, 128, 32
    names = [DEFAULT] if args.variants is None else (args.variants or list(VARIANTS))
    shapes = (
        [(8, 131072), (1, 32768)] if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes]
    )
    rows = []
    for b, t in shapes:
        q = torch.randn((b, hkv, gqa, d), device="cuda", dtype=torch.float16)
        # fp16 SDPA over a cache of the same shape (GQA folded into the query rows)
        k = torch.randn((b, hkv, t, d), device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        t_sdpa = bench(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        del k, v
        for bits in args.bits:
            torch.cuda.empty_cache()
            _, _, keys, values = make_cache(b, hkv, t, d, bits, bits, group, "cuda")
            nbytes = sum(x.numel() * x.element_size() for x in (*keys, *values))
            ref = reference(
                q[:1], tuple(x[:1] for x in keys), tuple(x[:1] for x in values), bits, bits, group
            )
            line = {"b": b, "t": t, "bits": bits, "sdpa_us": 1e3 * t_sdpa, "bytes": nbytes}
            try:
                cur = current_kernel(keys, values, b, hkv, t, bits, bits, group)
                got = cur(q)
                line["current_err"] = float((got[:1].float() - ref).norm() / ref.norm())
                line["current_us"] = 1e3 * bench(lambda cur=cur, q=q: cur(q))
            except Exception as err:
                print(f"current kernel failed: {type(err).__name__}: {err}", flush=True)
                line["current_us"] = float("nan")
            print(f"\nb={b} t={t} KIVI-{bits}: cache {nbytes / 1e9:.3f} GB; fp16 SDPA {line['sdpa_us']:.0f} us; "
                  f"current attend {line['current_us']:.0f} us ({line['sdpa_us'] / line['current_us']:.2f}x SDPA, "
                  f"err {line.get('current_err', float('nan')):.1e})", flush=True)  # fmt: skip
            for name in names:
                opts = dict(VARIANTS[name])
                unpack, fold_v = opts.pop("unpack"), opts.pop("fold_v")
                work: dict[str, torch.Tensor] = {}
                for split in args.splits or [None]:
                    kw = dict(k_bits=bits, v_bits=bits, group=group, unpack=unpack, fold_v=fold_v, work=work,
                              split=split, **opts)  # fmt: skip
                    try:
                        got = fold_attend(q, keys, values, **kw)
                        err = float((got[:1].float() - ref).norm() / ref.norm())
                        us = 1e3 * bench(lambda kw=kw, q=q, ks=keys, vs=values: fold_attend(q, ks, vs, **kw))
                    except Exception as e:
                        print(f"  {name:24s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                        continue
                    sp = split or default_split(t, b * hkv)
                    bw = nbytes / (us * 1e-6) / 1e12
                    print(f"  {name:24s} split {sp:5d}: {us:7.0f} us  {line['sdpa_us'] / us:5.2f}x SDPA  "
                          f"{line['current_us'] / us:5.2f}x current  {bw:5.2f} TB/s read  err {err:.1e}  "
                          f"[{report(last_compiled[0])}]", flush=True)  # fmt: skip
                    rows.append({**line, "variant": name, "split": sp, "us": us, "err": err})
            del keys, values
    print("\n| b | t | bits | variant | split | us | vs SDPA | vs current | err |")
    print("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['b']} | {r['t']} | {r['bits']} | {r['variant']} | {r['split']} | {r['us']:.0f} | "
              f"{r['sdpa_us'] / r['us']:.2f}x | {r['current_us'] / r['us']:.2f}x | {r['err']:.1e} |")  # fmt: skip


def profile(args: argparse.Namespace) -> None:
    """A few launches of one variant (the first of --variants, else the default) for ncu, e.g.
    ncu --kernel-name regex:fold_split --launch-skip 2 --launch-count 1 --section SpeedOfLight ..."""
    b, t = (8, 131072) if not args.shapes else tuple(map(int, args.shapes[0].split("x")))
    bits = args.bits[0]
    name = (args.variants or [DEFAULT])[0]
    opts = dict(VARIANTS[name])
    unpack, fold_v = opts.pop("unpack"), opts.pop("fold_v")
    _, _, keys, values = make_cache(b, 8, t, 128, bits, bits, 32, "cuda")
    q = torch.randn((b, 8, 4, 128), device="cuda", dtype=torch.float16)
    work: dict[str, torch.Tensor] = {}
    split = args.splits[0] if args.splits else None
    for _ in range(4):
        fold_attend(q, keys, values, k_bits=bits, v_bits=bits, unpack=unpack, fold_v=fold_v, work=work, split=split,
                    **opts)  # fmt: skip
    torch.cuda.synchronize()
    print(f"profiled {name} b={b} t={t} bits={bits}: {report(last_compiled[0])}")


# --------------------------------------------------------------------------------------------
# offline compile report (no GPU needed): sm_90 registers, spills, SASS of the token loop


def asm(args: argparse.Namespace) -> None:
    import collections
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sig = {k: "*fp16" for k in ("q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr")}
    sig.update(kc_ptr="*i32", vc_ptr="*i32", zb_ptr="*fp32", o_ptr="*fp32", ml_ptr="*fp32")
    sig.update(n_tokens="i32", n_splits="i32", qk_scale="fp32")
    order = ["q_ptr", "kc_ptr", "ks_ptr", "kz_ptr", "vc_ptr", "vs_ptr", "vz_ptr", "zb_ptr", "o_ptr", "ml_ptr",
             "n_tokens", "n_splits", "qk_scale"]  # fmt: skip
    names = [DEFAULT] if args.variants is None else (args.variants or list(VARIANTS))
    for bits in args.bits:
        for name in names:
            opts = VARIANTS[name]
            cst = dict(GQA=4, D=128, GROUP=32, SPLIT=args.asm_split, K_BITS=bits, V_BITS=bits,
                       UNPACK=opts["unpack"], FOLD_V=opts["fold_v"], A_EXP=8,
                       ROW4=opts.get("row4", True), HALF=opts.get("half", False), L2PF=opts.get("l2pf", 0))  # fmt: skip
            s = {k: sig[k] for k in order}
            s.update({k: "constexpr" for k in cst})
            try:
                c = triton.compile(
                    ASTSource(_fold_split_kernel, s, cst), target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 2),
                                 **({"maxnreg": opts["maxnreg"]} if "maxnreg" in opts else {})),
                )  # fmt: skip
            except Exception as err:
                print(f"{name} bits {bits}: compile failed: {type(err).__name__}: {str(err)[:2000]}")
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "k.cubin")
                with open(path, "wb") as f:
                    f.write(c.asm["cubin"])
                res = subprocess.run(
                    [os.path.join(bindir, "cuobjdump"), "-res-usage", path], capture_output=True, text=True
                ).stdout
                sass = subprocess.run(
                    [os.path.join(bindir, "cuobjdump"), "-sass", path], capture_output=True, text=True
                ).stdout
            usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
            ins = [
                (int(m.group(1), 16), m.group(2))
                for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
            ]
            loops = []
            for addr, txt in ins:
                m = re.search(r"BRA\s.*0x([0-9a-f]+)", txt)
                if m and int(m.group(1), 16) < addr:
                    loops.append((int(m.group(1), 16), addr))
            lo, hi = max(loops, key=lambda x: x[1] - x[0]) if loops else (0, 0)
            body = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for a, t in ins if lo <= a <= hi]
            top = collections.Counter(body).most_common(14)
            print(f"{name:22s} K{bits}/V{bits}: REG {usage.group(1)} STACK {usage.group(2)} (spill) "
                  f"smem {c.metadata.shared}, convert_layout {c.asm['ttgir'].count('convert_layout')}, "
                  f"token loop {len(body)} SASS/warp per 128 tokens: {top}", flush=True)  # fmt: skip
            if args.asm_dir:
                os.makedirs(args.asm_dir, exist_ok=True)
                stem = os.path.join(args.asm_dir, f"{name.replace('/', '_')}_b{bits}")
                for ext in ("ttgir", "ptx"):
                    with open(f"{stem}.{ext}", "w") as f:
                        f.write(c.asm[ext])
                with open(f"{stem}.sass", "w") as f:
                    f.write(sass)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="CPU: compare with a float32 torch reference")
    parser.add_argument(
        "--profile", action="store_true", help="GPU: run the first variant a few times (for ncu)"
    )
    parser.add_argument("--quick", action="store_true", help="with --check: one case only")
    parser.add_argument("--asm", action="store_true", help="compile for sm_90 without a GPU: regs, SASS")
    parser.add_argument("--asm-dir", default=None)
    parser.add_argument("--asm-split", type=int, default=2048)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=None,
        help="time these variants (none named: all), not only the default",
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--shapes", nargs="+", default=None, help="BATCHxTOKENS, default 8x131072 1x32768")
    parser.add_argument("--splits", type=int, nargs="+", default=None, help="split lengths to time")
    args = parser.parse_args()
    if args.check:
        check(args)
    elif args.asm:
        asm(args)
    elif args.profile:
        profile(args)
    else:
        gpu(args)


if __name__ == "__main__":
    main()
