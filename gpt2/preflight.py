"""Pre-flight check (`trainer.config.preflight=true`): a few seconds at job start, before any
training state or checkpoint is loaded, that this rank's device computes and its process group
communicates. One all-reduce (every rank must get the world size) and one matmul checked against
the CPU. A problem writes a failure report of kind "preflight" blaming this host (gpt2/watchdog.py),
runs the fatal hook and ends the process with EXIT_FAILURE (76), so the job is retried elsewhere.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from gpt2.errors import EXIT_FAILURE
from gpt2.watchdog import Watchdog, call_hook

MATMUL_N = 256  # matmul size
RTOL = 1e-2  # of the largest entry: bf16/TF32 round-off passes, a wrong unit does not


def problem(device: Any, world_size: int,
            all_reduce: Callable[[list[float]], list[float]] | None = None) -> str | None:
    """One all-reduce and one matmul on `device`; a line saying what is wrong, None when all is well.

    The all-reduce sums (rank-independent) ones: every rank must get world_size. The matmul of two
    seeded random matrices on the device is compared with the same product on the CPU."""
    import torch

    from gpt2 import distributed

    reduce = all_reduce or (lambda v: distributed.all_reduce(v, device=device))
    try:
        got = reduce([1.0, 2.0])
        if got != [float(world_size), 2.0 * world_size]:
            return f"all-reduce of [1, 2] over {world_size} ranks gave {got}, not [{world_size}, {2 * world_size}]"
        g = torch.Generator().manual_seed(1234)
        a, b = (torch.randn(MATMUL_N, MATMUL_N, generator=g, dtype=torch.float32) for _ in range(2))
        want = a.double() @ b.double()
        out = (a.to(device) @ b.to(device)).double().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        err = (out - want).abs().max().item()
        scale = want.abs().max().item()
        if not err <= RTOL * scale:
            return f"matmul on {device} differs from the CPU reference by {err:.3g} (tolerance {RTOL * scale:.3g})"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def run(wd: Watchdog, device: Any) -> float:
    """Run the pre-flight check on this rank and return its seconds; on a problem: report
    "preflight" blaming this host, then the fatal hook and os._exit (EXIT_FAILURE unless the hook
    says otherwise)."""
    t0 = time.perf_counter()
    wd.progress.phase("startup")
    found = problem(device, wd.world_size)
    if found is None:
        return time.perf_counter() - t0
    message = f"pre-flight check failed on {wd.host} ({device}): {found}"
    wd._log(f"rank {wd.rank}: {message}", console=True)
    rep = wd.report("preflight", message, blamed_rank=wd.rank, blamed_host=wd.host,
                    detected_after_s=round(time.perf_counter() - t0, 3))
    wd.stop()
    os._exit(call_hook(rep, wd._log) if rep is not None else EXIT_FAILURE)
