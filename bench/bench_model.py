"""Training-step speed of gpt2.model.GPT against a plain PyTorch GPT, on one process (issues 4, 12).

Ours is GPT-2 as configured (vocab 50257 padded to 50304); the baseline is written the way nanoGPT
writes its GPT (plain modules, vocab 50304, a tied head, F.cross_entropy over all columns).

The reference: nanoGPT's model trained at about 1,260 tokens/s (fp32) and 2,000 tokens/s (bf16
autocast) on this project's 2-core machine, for 4 layers x 256 wide, 4 heads, block 256, vocab
50304, batch 8. The goal is that our step is at least as fast as a plain-PyTorch GPT of the same
shape, timed in the same run so the machine's load cancels out of the ratio.

A step is forward + loss + backward + AdamW step + zero_grad. Ours and the baseline alternate one
step at a time (the order flips every round); tokens/s is each side's median step, and the ratio is
the median of the per-round ratios, with their quartiles (a shared 2-core machine moves a few
percent from minute to minute: a ratio without its spread would claim more than was measured).
MFU is taken against the matmul throughput measured here (the better of a measurement before
and after the steps), since a CPU has no published peak that the benchmark could trust; on a
busy machine it is a rough figure, while the interleaved ratio stays meaningful.

bf16 is timed only where the CPU multiplies bf16 at least half as fast as fp32 (`--bf16 auto`).
On an AVX2-only CPU (no avx512_bf16/AMX) PyTorch emulates bf16 GEMMs many times slower than
fp32, so one bf16 step of this model takes minutes; the table then shows the two matmul rates.

    python -m bench.bench_model               # full run, a markdown table on stdout
    python -m bench.bench_model --quick       # a few steps, for CI smoke tests
    python -m bench.bench_model --bf16 on     # time bf16 autocast even where it is emulated
    python -m bench.bench_model --compile on  # also compile=true (the full run does by default)

With compile, it also times what a requeued attempt pays to compile: the first compiled step in a
new process with an empty compile cache, then in another with the cache the first one filled (the
sweep's shared folder, which launch/job.py points torch.compile at; /tmp is per node).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2.model import GPT, GPT2Config

SHAPE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50304)
BATCH = 8
NANOGPT_TOKENS_PER_S = {"fp32": 1260.0, "bf16": 2000.0}  # measured on the project's 2 cores
GOAL_RATIO = 1.0
ROOT = Path(__file__).resolve().parent.parent


# ---- the baseline: a plain GPT written for this benchmark only -------------------------------


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, D // self.heads)  # (B, T, 3, h, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, h, T, d)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU("tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class BaselineGPT(nn.Module):
    """A pre-norm GPT with a tied output head: the same arithmetic as GPT-2, nothing else."""

    def __init__(self, n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, n_embd)
        self.positions = nn.Parameter(torch.randn(block_size, n_embd) * 0.02)
        self.layers = nn.ModuleList(_Layer(n_embd, n_head) for _ in range(n_layer))
        self.norm = nn.LayerNorm(n_embd)
        nn.init.normal_(self.tokens.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """idx, targets (B, T) -> mean cross-entropy of the next-token predictions."""
        x = self.tokens(idx) + self.positions[: idx.shape[1]]  # (B, T, D)
        for layer in self.layers:
            x = layer(x)
        logits = F.linear(self.norm(x), self.tokens.weight)  # (B, T, V), head tied to the embedding
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# ---- timing -----------------------------------------------------------------------------------


def _train_step(
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: list[nn.Parameter],
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
) -> Callable[[], None]:
    """One closure per model: forward (autocast if bf16), backward, AdamW step, zero_grad."""
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def step() -> None:
        with ctx():
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_interleaved(steps: dict[str, Callable[[], None]], rounds: int, per_round: int) -> dict[str, list[float]]:
    """Seconds per step for each named step function, run in alternating blocks of `per_round`."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            for _ in range(per_round):
                t0 = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], ours: str, base: str) -> tuple[float, str]:
    """How much faster `ours` is than `base` (tokens/s over tokens/s): the median of the per-round
    ratios, each taken from two steps run next to each other (per_round=1), so that a slow spell of a
    shared machine slows both sides of a pair; and the quartiles of those ratios, to say how sure."""
    ratios = sorted(b / o for o, b in zip(times[ours], times[base], strict=True))
    if len(ratios) < 4:
        return statistics.median(ratios), f"paired over {len(ratios)} rounds"
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), f"paired over {len(ratios)} rounds, quartiles {q1:.2f}x-{q3:.2f}x"


def matmul_flops(dtype: torch.dtype, n: int = 1024, seconds: float = 1.0) -> float:
    """Measured FLOP/s of an n x n matmul in `dtype` (the best of repeated calls)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b  # warm-up
    best, deadline = math.inf, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def compiled_step(cfg: GPT2Config, x: torch.Tensor, y: torch.Tensor) -> tuple[Callable[[], None], float]:
    """A training step of ours under torch.compile (trainer.config.compile=true), fp32, and the wall
    time of its first call (the compilation itself, or the loading of what a cache holds)."""
    torch.manual_seed(0)
    model = GPT(cfg).train()
    compiled = torch.compile(model)

    def loss_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss = compiled(a, b)[1]
        assert loss is not None
        return loss

    step = _train_step(loss_of, list(model.parameters()), x, y, False)
    t0 = time.perf_counter()
    step()  # compiles forward and backward
    return step, time.perf_counter() - t0


def compiled_rows(cfg: GPT2Config, x: torch.Tensor, y: torch.Tensor, base_step: Callable[[], None],
                  rounds: int) -> list[dict]:
    """Ours compiled against the eager baseline, fp32, and the first compiled step's wall time."""
    step, first = compiled_step(cfg, x, y)
    times = time_interleaved({"compiled": step, "baseline": base_step}, rounds=rounds, per_round=1)
    tps = {name: BATCH * cfg.block_size / statistics.median(ts) for name, ts in times.items()}
    ratio, spread = paired_ratio(times, "compiled", "baseline")
    return [
        dict(name="train step fp32: ours, compile=true", value=tps["compiled"], unit="tokens/s",
             goal="eager baseline (beside it)", ratio=ratio, note=spread),
        dict(name="first compiled step (compilation included)", value=first, unit="s", goal="", ratio=None),
    ]


def restart_rows() -> list[dict]:
    """What a requeued attempt pays to compile, in two new processes one after the other sharing one
    compile cache: the first finds it empty (a node whose /tmp never saw this model), the second finds
    what the first left (the sweep's folder, launch/rank_env.share_compile_cache)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor", "TRITON_CACHE_DIR": f"{cache}/triton"}
        cold, warm = (float(subprocess.run([sys.executable, "-m", "bench.bench_model", "--first-compiled-step"],
                                           cwd=ROOT, env=env, capture_output=True, text=True, check=True,
                                           timeout=1800).stdout.split()[-1]) for _ in range(2))
    return [
        dict(name="first compiled step, new process, empty compile cache", value=cold, unit="s", goal="", ratio=None),
        dict(name="first compiled step, new process, the sweep's compile cache", value=warm, unit="s",
             goal="< empty cache", ratio=cold / warm, note="ratio: empty-cache time over this"),
    ]


def first_step_here() -> float:
    """The first compiled step's seconds in this process (the child of restart_rows)."""
    cfg = GPT2Config(**{**SHAPE, "vocab_size": 50257}, dropout=0.0, bias=True, flash=True)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size), generator=g) for _ in range(2))
    return compiled_step(cfg, x, y)[1]


def run(quick: bool = False, bf16: str = "auto", compile: bool | None = None) -> list[dict]:
    """Time ours against the baseline in fp32 and bf16 autocast; one row per figure.

    Each row has name, value, unit, goal and ratio. For a step row the ratio is ours over the
    baseline (goal >= 1.0); for the baseline row it is the baseline over nanoGPT's figure from
    the project's machine; MFU rows have no ratio (None).

    bf16: "on", "off", or "auto": time bf16 only where a bf16 matmul runs at least half as
    fast as fp32 (and not in the quick run). A CPU without native bf16 (AVX2 only) emulates it many times slower than
    fp32, and a bf16 step of this model would take minutes; "auto" then reports the two
    matmul rates in one row instead."""
    if bf16 not in ("auto", "on", "off"):
        raise ValueError(f"bf16 must be auto, on or off (got {bf16!r})")
    rounds, peak_s = (3, 0.3) if quick else (12, 1.0)  # pairs of steps: the machine's noise is a few %
    cfg = GPT2Config(**{**SHAPE, "vocab_size": 50257}, dropout=0.0, bias=True, flash=True)  # padded to 50304
    T = cfg.block_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (BATCH, T), generator=g)  # GPT-2's ids (< 50257) for both
    y = torch.randint(0, cfg.vocab_size, (BATCH, T), generator=g)
    torch.manual_seed(0)
    ours = GPT(cfg).train()
    base = BaselineGPT(**SHAPE).train()
    flops_per_token = ours.flops_per_token(T)

    def ours_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        loss = ours(a, b)[1]
        assert loss is not None
        return loss

    peaks = {"fp32": matmul_flops(torch.float32, seconds=peak_s)}
    precisions = ["fp32"]
    if bf16 == "on" or (bf16 == "auto" and not quick):  # the quick smoke run: fp32 only, unless asked
        peaks["bf16"] = matmul_flops(torch.bfloat16, seconds=peak_s)
        if bf16 == "on" or peaks["bf16"] >= 0.5 * peaks["fp32"]:
            precisions.append("bf16")

    rows: list[dict] = []
    for precision in precisions:
        half = precision == "bf16"
        steps = {
            "ours": _train_step(ours_loss, list(ours.parameters()), x, y, half),
            "baseline": _train_step(base, list(base.parameters()), x, y, half),
        }
        time_interleaved(steps, rounds=1, per_round=1)  # warm-up: allocator, optimizer state
        times = time_interleaved(steps, rounds=rounds, per_round=1)
        tps = {name: BATCH * T / statistics.median(ts) for name, ts in times.items()}
        ratio, spread = paired_ratio(times, "ours", "baseline")
        # The matmul rate again after the steps: on a shared machine the better of the two
        # is the nearer estimate of what the cores can do.
        peak = max(peaks[precision], matmul_flops(torch.bfloat16 if half else torch.float32, seconds=peak_s))
        rows += [
            dict(name=f"train step {precision}: ours", value=tps["ours"], unit="tokens/s",
                 goal=f">= {GOAL_RATIO:.1f}x baseline", ratio=ratio, note=spread),
            dict(name=f"train step {precision}: plain PyTorch baseline", value=tps["baseline"],
                 unit="tokens/s", goal=f"nanoGPT measured {NANOGPT_TOKENS_PER_S[precision]:,.0f}",
                 ratio=tps["baseline"] / NANOGPT_TOKENS_PER_S[precision]),
            dict(name=f"MFU {precision}: ours", value=100 * tps["ours"] * flops_per_token / peak,
                 unit=f"% of measured {precision} matmul ({peak / 1e9:.0f} GFLOP/s)", goal="", ratio=None),
        ]
    if compile if compile is not None else not quick:  # minutes on 2 cores: the full run only
        base_step = _train_step(base, list(base.parameters()), x, y, False)
        rows += compiled_rows(cfg, x, y, base_step, rounds)
        rows += restart_rows()
    if "bf16" in peaks and "bf16" not in precisions:
        rows.append(dict(
            name="train step bf16: skipped, no native bf16 matmul on this CPU", value=peaks["bf16"] / 1e9,
            unit="bf16 matmul GFLOP/s", goal=f"fp32 matmul {peaks['fp32'] / 1e9:.0f} GFLOP/s",
            ratio=peaks["bf16"] / peaks["fp32"],
        ))
    return rows



if __name__ == "__main__":
    from bench.run_all import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="time bf16 autocast (auto: only where this CPU has a fast bf16 matmul, and not with --quick)")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="also time compile=true (auto: in the full run, not with --quick)")
    parser.add_argument("--first-compiled-step", action="store_true", help=argparse.SUPPRESS)  # restart_rows' child
    args = parser.parse_args()
    if args.first_compiled_step:
        print(f"{first_step_here():.3f}")
        raise SystemExit(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, {SHAPE}")
    comp = None if args.compile == "auto" else args.compile == "on"
    print(table(run(quick=args.quick, bf16=args.bf16, compile=comp)))
