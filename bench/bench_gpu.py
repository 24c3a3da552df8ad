"""MFU of GPT-2 124M and 350M on one GPU: bf16 autocast, torch.compile, flash attention, fused AdamW.

A timed step is what training does: forward + loss under bf16 autocast, backward, gradient
clipping, fused AdamW step, zero_grad, on random tokens at block size 1024. The compiled model
and the same model in eager mode are timed one after the other in this run, so the speed-up is
a side-by-side ratio. MFU = flops_per_token x tokens/s / peak (gpt2.logs.peak_flops; set
GPT2_PEAK_FLOPS for a card it does not know). Without a GPU, `run()` returns one "no GPU" row.

    python -m bench.bench_gpu [--quick]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from dataclasses import asdict
from typing import Any

import torch

from gpt2.backends.base import make_adamw
from gpt2.config import load_config
from gpt2.logs import peak_flops
from gpt2.model import GPT, GPT2Config

# micro-batch per model at T=1024: fits an 80 GB card with room for compile's workspace
MODELS = {"gpt2_124m": 16, "gpt2_350m": 8}


def measure(model_name: str, device: torch.device, batch: int, steps: int, warmup: int, compile: bool,
            bf16: bool = True, seq_len: int | None = None, flash_only: bool = True) -> dict[str, float]:
    """Time `steps` training steps of configs/model/<model_name>.yaml after `warmup` untimed ones.

    Returns tokens_per_s, step_ms, mfu (a fraction), peak_mem_gb (0 off CUDA) and n_params.
    On CUDA with flash_only, attention is pinned to the flash kernel (raises if it cannot run);
    otherwise SDPA picks its kernel."""
    cfg = load_config([f"model={model_name}"])
    torch.manual_seed(0)
    model = GPT(GPT2Config(**asdict(cfg.model.config))).to(device).train()
    T = seq_len or model.config.block_size
    flops_per_token = model.flops_per_token(T)
    opt = make_adamw(model, cfg.trainer.config, device)  # fused on CUDA
    step_model: Any = torch.compile(model) if compile else model
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

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize(device)
    dt = (time.perf_counter() - t0) / steps
    tps = batch * T / dt
    out = {"tokens_per_s": tps, "step_ms": 1000 * dt, "mfu": flops_per_token * tps / peak_flops(device),
           "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
           "n_params": float(model.num_params())}
    return out  # the caller may torch.cuda.empty_cache() once this frame is gone


def run(quick: bool = False) -> list[dict]:
    """One "no GPU" row without CUDA; else, per model, MFU and tokens/s compiled (ratio: over
    eager) and eager. A model that fails (out of memory, say) gets an error row."""
    if not torch.cuda.is_available():
        return [dict(name="GPU MFU (gpt2_124m, gpt2_350m)", value=None, unit="", goal="", ratio=None,
                     note="no GPU")]
    device = torch.device("cuda", 0)
    torch.set_float32_matmul_precision("high")
    warmup, steps = (2, 3) if quick else (3, 10)
    gpu = torch.cuda.get_device_name(device)
    peak = peak_flops(device)
    rows: list[dict] = []
    for name, batch in MODELS.items():
        kernel = "flash"
        try:
            try:
                comp = measure(name, device, batch, steps, warmup, compile=True)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:  # flash kernel refused: measure with SDPA's own choice
                kernel = f"SDPA default (flash refused: {str(exc).splitlines()[0][:80]})"
                comp = measure(name, device, batch, steps, warmup, compile=True, flash_only=False)
            torch.cuda.empty_cache()
            eager = measure(name, device, batch, steps, warmup, compile=False, flash_only=kernel == "flash")
        except Exception as exc:
            rows.append(dict(name=f"{name}: bf16 + compile + flash", value=None, unit="", goal="", ratio=None,
                             error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
            continue
        finally:
            torch.cuda.empty_cache()
        note = (f"{gpu}, batch {batch} x 1024, {comp['step_ms']:.0f} ms/step, "
                f"{comp['peak_mem_gb']:.1f} GB peak, attention: {kernel}")
        rows += [
            dict(name=f"{name} MFU: bf16 + compile + flash + fused AdamW", value=100 * comp["mfu"],
                 unit=f"% of {peak / 1e12:.0f} TFLOP/s", goal="", ratio=None, note=note),
            dict(name=f"{name} step: bf16 + compile + flash", value=comp["tokens_per_s"], unit="tokens/s",
                 goal="> eager", ratio=comp["tokens_per_s"] / eager["tokens_per_s"], note="ratio: over eager"),
            dict(name=f"{name} step: bf16 + flash, eager", value=eager["tokens_per_s"], unit="tokens/s",
                 goal="", ratio=None, note=f"MFU {100 * eager['mfu']:.1f}%"),
        ]
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps")
    for row in run(quick=parser.parse_args().quick):
        print(row)
