"""MFU of GPT-2 124M and 350M on one GPU: bf16 autocast, torch.compile, flash attention, fused AdamW.

A timed step is what training does: forward + loss under bf16 autocast, backward, gradient
clipping, fused AdamW step, zero_grad, on random tokens at block size 1024, with the largest
micro-batch that fits (from llm.c's 64 for 124M, 32 for 350M, halved on out-of-memory). The compiled model
and the same model in eager mode are timed one after the other in this run, so the speed-up is
a side-by-side ratio (eager first, so a deadline during compilation keeps the eager numbers).
MFU = flops_per_token x tokens/s / peak, stated against two peaks: the listed one
(gpt2.logs.peak_flops; set GPT2_PEAK_FLOPS for a card it does not know) and a bf16 8192^3 matmul
measured at the start of the same run. Whether the flash kernel runs is checked once, eagerly; if it
is refused, SDPA picks its kernel and the rows say so. Without a GPU, `run()` returns one "no GPU" row;
`dry=True` (the GPU check's dry mode) runs every row on the CPU instead, with the tiny model at
block size 64 and torch.compile's aot_eager backend (dynamo and AOTAutograd trace the step as on
the GPU; inductor's code generation, minutes on a small CPU, is left to the GPU): the same code,
figures that mean nothing.

    python -m bench.bench_gpu [--quick] [--dry] [--jsonl rows.jsonl]    # bench/gpu_check.py runs it so
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gpt2.backends.base import make_adamw
from gpt2.compose import load_config
from gpt2.logs import peak_flops
from gpt2.model import GPT, GPT2Config

# the largest micro-batch tried per model at T=1024 (llm.c's for 124M); halved on out-of-memory
MODELS = {"gpt2_124m": 64, "gpt2_350m": 32}
MIN_BATCH = 4
DRY_MODELS, DRY_SEQ_LEN = {"tiny": 2}, 64  # dry mode, on the CPU


def measure(model_name: str, device: torch.device, batch: int, steps: int, warmup: int, compile: bool,
            bf16: bool = True, seq_len: int | None = None, flash_only: bool = True,
            compile_backend: str = "inductor") -> dict[str, float]:
    """Time `steps` training steps of configs/model/<model_name>.yaml after `warmup` untimed ones.

    Returns tokens_per_s, step_ms, mfu (a fraction), peak_mem_gb (0 off CUDA), n_params and first_step_s
    (the first warm-up step's wall time: with compile, the compilation; nan without warm-up).
    On CUDA with flash_only, attention is pinned to the flash kernel (raises if it cannot run);
    otherwise SDPA picks its kernel."""
    cfg = load_config([f"model={model_name}"])
    torch.manual_seed(0)
    model = GPT(GPT2Config(**asdict(cfg.model.config))).to(device).train()
    T = seq_len or model.config.block_size
    flops_per_token = model.flops_per_token(T)
    opt = make_adamw(model, cfg.trainer.config, device)  # fused on CUDA
    step_model: Any = torch.compile(model, backend=compile_backend) if compile else model
    x = torch.randint(0, model.config.vocab_size, (batch, T), device=device)
    y = torch.randint(0, model.config.vocab_size, (batch, T), device=device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def attention() -> Any:
        if not (cuda and flash_only):
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.FLASH_ATTENTION])  # single-use: a fresh one per step

    def step() -> None:
        with attention(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = step_model(x, y)
        assert loss is not None
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0, first_s = time.perf_counter(), float("nan")
    for i in range(warmup):
        step()
        if i == 0:
            _sync(device)
            first_s = time.perf_counter() - t0  # compiled: the compilation (or its cache's loading)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    dt = (time.perf_counter() - t0) / steps
    tps = batch * T / dt
    out = {"tokens_per_s": tps, "step_ms": 1000 * dt, "mfu": flops_per_token * tps / peak_flops(device),
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
           "n_params": float(model.num_params()), "first_step_s": first_s}
    return out  # the caller may torch.cuda.empty_cache() once this frame is gone


def matmul_tflops(device: torch.device, n: int = 8192, warmup: int = 3, iters: int = 10) -> float:
    """Measured dense bf16 peak: TFLOP/s of an n x n x n matmul on random data (mean of `iters`)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(warmup):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flash_refusal(device: torch.device) -> str | None:
    """None when SDPA's flash kernel runs a (B, nh, T, hs) = (2, 12, 1024, 64) bf16 causal attention
    here; else the first line of why not. Checked eagerly, so a compile error is never taken for it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(2, 12, 1024, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError as exc:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:100]
    return None


def _release() -> None:
    """Drop compiled graphs (they hold the last model alive) and cached blocks between measurements."""
    import torch._dynamo

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fitting(measure_at: Callable[[int], dict[str, float]], batch: int) -> tuple[dict[str, float], int]:
    """`measure_at(batch)`, the batch halved after each out-of-memory down to MIN_BATCH; the result and
    the batch it ran at (compiled rows start at the batch eager fitted, so both time the same shapes)."""
    while True:
        try:
            return measure_at(batch), batch
        except torch.OutOfMemoryError:
            if batch // 2 < MIN_BATCH:
                raise
        finally:
            _release()  # after the handler: the failed attempt's tensors are unreachable by now
        batch //= 2


def rows(quick: bool = False, dry: bool = False) -> Iterator[dict]:
    """The rows of `run`, one at a time as measured (a caller with a deadline keeps what came).
    dry: on the CPU with the tiny model, whether or not there is a GPU."""
    if not dry and not torch.cuda.is_available():
        yield dict(name="GPU MFU (gpt2_124m, gpt2_350m)", value=None, unit="", goal="", ratio=None, note="no GPU")
        return
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    torch.set_float32_matmul_precision("high")
    warmup, steps = (1, 2) if dry else (2, 3) if quick else (3, 10)
    gpu = "CPU (dry run)" if dry else torch.cuda.get_device_name(device)
    listed = peak_flops(device)
    n = 512 if dry else 8192
    measured = matmul_tflops(device, n=n) * 1e12
    yield dict(name=f"bf16 matmul {n}^3 (measured peak)", value=measured / 1e12, unit="TFLOP/s", goal="",
               ratio=measured / listed, note=f"{gpu}; ratio: over the listed {listed / 1e12:.3g} TFLOP/s")
    refused = "a dry run on the CPU" if dry else flash_refusal(device)
    kernel = "flash" if refused is None else f"SDPA default (flash refused: {refused})"
    seq_len = DRY_SEQ_LEN if dry else None
    for name, batch in (DRY_MODELS if dry else MODELS).items():
        eager: dict[str, float] | None = None
        for compile in (False, True):  # eager first: a deadline during compilation keeps its numbers
            how = ("compile (aot_eager) + " if dry else "compile + ") if compile else ""
            label = f"{name} step: bf16 + {how}{kernel.split(' ')[0]}"
            try:
                r, batch = fitting(lambda b: measure(name, device, b, steps, warmup, compile=compile,  # noqa: B023
                                                     seq_len=seq_len, flash_only=refused is None,
                                                     compile_backend="aot_eager" if dry else "inductor"), batch)
            except Exception as exc:  # a compile error, out of memory at the smallest batch: this row fails
                yield dict(name=label, value=None, unit="", goal="", ratio=None,
                           error=f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}")
                continue
            note = (f"batch {batch} x {seq_len or 1024}, {r['step_ms']:.0f} ms/step, {r['peak_mem_gb']:.1f} GB peak, "
                    f"first step {r['first_step_s']:.1f} s, attention: {kernel}")
            yield dict(name=label, value=r["tokens_per_s"], unit="tokens/s", goal="> eager" if compile else "",
                       ratio=r["tokens_per_s"] / eager["tokens_per_s"] if compile and eager else None,
                       note=note + ("; ratio: over eager" if compile and eager else ""))
            mfu = r["mfu"]  # against the listed peak (measure() divides by peak_flops)
            yield dict(name=f"{name} MFU{' (compiled)' if compile else ' (eager)'}", value=100 * mfu,
                       unit=f"% of listed {listed / 1e12:.3g} TFLOP/s", goal="", ratio=None,
                       note=f"{100 * mfu * listed / measured:.1f}% of the measured {measured / 1e12:.3g} TFLOP/s")
            if not compile:
                eager = r


def run(quick: bool = False, dry: bool = False) -> list[dict]:
    """One "no GPU" row without CUDA (unless dry); else the measured matmul peak, then per model tokens/s
    and MFU eager and compiled (ratio: compiled over eager), MFU against the listed and the measured
    peak. A measurement that fails (out of memory, say) gets an error row and the others still run."""
    return list(rows(quick, dry))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    parser.add_argument("--dry", action="store_true", help="on the CPU with the tiny model (the GPU check's dry mode)")
    parser.add_argument("--jsonl", type=Path, default=None, help="also append each row to this file as it comes")
    args = parser.parse_args()
    for row in rows(quick=args.quick, dry=args.dry):
        print(row, flush=True)
        if args.jsonl is not None:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
