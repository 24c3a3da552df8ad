"""Tokens/s of each training backend on 2 CPU processes against one process doing the same work (issue 4).

The model is configs/model/tiny.yaml at sequence length 128, fp32, one thread per process. Each
backend runs on 2 ranks with 4 windows each (global batch 8). Two references do the work of one
rank with a plain training step (forward, backward, clipping, AdamW: what DDP does at world size
1): the *single process* alone (the other rank waits in a barrier), and a *pair* of processes
each doing so at the same time with no communication, which is what perfect scaling onto the
second core gives on this machine (they share caches, memory bandwidth and whatever else runs).
A backend's step time minus the pair's is its own cost: communication and bookkeeping.

All of it runs in one 2-rank process group. Every backend is set up at once and they take turns,
round by round (the order flips every round), so load from elsewhere on the machine falls on all
of them alike. Each figure is the median step. Parameter + optimizer bytes per rank come from
`backend.state_bytes()`.

    python -m bench.bench_backends            # full run, a markdown table on stdout
    python -m bench.bench_backends --quick    # a few steps, for smoke tests
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SEQ, GLOBAL_BATCH, WORLD = 128, 8, 2
BACKENDS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddp": ("ddp", {}),
    "fsdp": ("fsdp", {}),
    **{f"zero{k}": ("deepspeed", {"deepspeed_config": f"deepspeed_configs/zero{k}.json"}) for k in (1, 2, 3)},
}
GOAL_RATIO = 0.8  # of the pair's tokens/s: communication and bookkeeping may cost a fifth
SHARDED_GOAL = 0.55  # FSDP and ZeRO-3 hold about half of DDP's parameter + optimizer bytes on 2 ranks


# ---- the worker: one rank ------------------------------------------------------------------------
def _worker(out: Path, rounds: int, per_round: int) -> None:
    import torch

    from gpt2 import distributed
    from gpt2.backends import make_backend
    from gpt2.backends.base import make_adamw
    from gpt2.compose import load_config
    from gpt2.config import TrainerSettings
    from gpt2.model import GPT, GPT2Config

    torch.set_num_threads(1)
    dist = distributed.init("cpu")
    rank, world = dist.rank, dist.world_size
    cfg = GPT2Config(**asdict(load_config(["model=tiny"]).model.config))
    B = GLOBAL_BATCH // world
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
    y = torch.randint(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ), generator=g)
    xr, yr = x[rank * B:(rank + 1) * B], y[rank * B:(rank + 1) * B]  # this rank's windows

    steps: dict[str, Callable[[], None]] = {}
    held: dict[str, int] = {}
    backends = {}
    for name, (kind, extra) in BACKENDS.items():
        s = TrainerSettings(batch_size=B, warmup_steps=0, **extra)
        torch.manual_seed(0)
        backend = backends[name] = make_backend(kind, s, dist)
        backend.setup(GPT(cfg))

        def step(b: Any = backend) -> None:
            b.forward_backward(xr, yr, last_micro=True)
            b.optimizer_step(1e-4)

        steps[name] = step

    # the references: a plain step on one rank's share of the work, no process group involved
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = make_adamw(model, TrainerSettings(), torch.device("cpu"))

    def plain() -> None:
        _, loss = model(xr, yr)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    steps = {"single": plain, "pair": plain, **steps}
    times: dict[str, list[float]] = {n: [] for n in steps}
    for r in range(rounds + 1):  # round 0 warms up: allocator, optimizer state, DeepSpeed buffers
        names = list(times) if r % 2 == 0 else list(reversed(times))
        for name in names:
            distributed.barrier()
            for _ in range(per_round):
                if name == "single" and not dist.is_main:
                    continue  # rank 1 idles in the barrier below
                t0 = time.perf_counter()
                steps[name]()
                dt = time.perf_counter() - t0
                if r > 0:
                    times[name].append(dt)
            distributed.barrier()
    for name, backend in backends.items():
        held[name] = backend.state_bytes()
    held_all = [None] * world
    torch.distributed.all_gather_object(held_all, held)
    if dist.is_main:
        out.write_text(json.dumps({"times": times, "held": held_all, "n_params": GPT(cfg).num_params(),
                                   "shape": asdict(cfg)}))
    distributed.destroy()


# ---- the driver ----------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, quick: bool) -> dict[str, Any]:
    """Start WORLD ranks of this module (the environment torchrun would give them) and read rank 0's JSON."""
    port = str(_free_port())
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "bench.bench_backends", "--worker", str(out)] + (["--quick"] if quick else [])
        log = open(out.with_suffix(f".rank{rank}.log"), "w")  # noqa: SIM115 - closed below
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for proc, log in procs:
        codes.append(proc.wait())
        log.close()
    if any(codes):
        tail = out.with_suffix(".rank0.log").read_text().splitlines()[-15:]
        raise RuntimeError(f"bench worker exited {codes}:\n" + "\n".join(tail))
    return json.loads(out.read_text())


def run(quick: bool = False) -> list[dict]:
    """Time every backend on 2 ranks against one process and a pair; one row per figure.

    Rows have name, value, unit, goal, ratio and note. Speed rows: tokens/s over all ranks; ratio
    is over the pair's (goal >= GOAL_RATIO; for the pair itself, over WORLD x single: the machine's
    own scaling); the note gives each step time and the overhead against the pair's and the
    single process's step. Memory rows: parameter + optimizer MiB held per rank, ratio over DDP's."""
    with tempfile.TemporaryDirectory() as tmp:
        res = _launch(Path(tmp) / "bench_backends.json", quick)
    B = GLOBAL_BATCH // WORLD
    med = {name: statistics.median(ts) for name, ts in res["times"].items()}
    tps = {name: (B if name == "single" else GLOBAL_BATCH) * SEQ / s for name, s in med.items()}
    rows = [
        dict(name=f"single process: plain step, batch {B}", value=tps["single"], unit="tokens/s",
             goal="reference", ratio=1.0, note=f"{med['single'] * 1e3:.0f} ms/step"),
        dict(name=f"pair: {WORLD} processes, plain step, batch {B} each, no communication", value=tps["pair"],
             unit="tokens/s", goal=f"{WORLD}x single process (perfect scaling)",
             ratio=tps["pair"] / (WORLD * tps["single"]),
             note=f"{med['pair'] * 1e3:.0f} ms/step: the machine's own cost of running {WORLD} at once"),
    ]
    for name in BACKENDS:
        over_pair, over_single = med[name] - med["pair"], med[name] - med["single"]
        rows.append(dict(name=f"{WORLD} ranks: {name}, batch {B} each", value=tps[name], unit="tokens/s",
                         goal=f">= {GOAL_RATIO:.1f}x pair", ratio=tps[name] / tps["pair"],
                         note=f"{med[name] * 1e3:.0f} ms/step: {over_pair * 1e3:+.0f} ms "
                              f"({over_pair / med['pair']:+.0%}) against the pair's step, "
                              f"{over_single * 1e3:+.0f} ms ({over_single / med['single']:+.0%}) against "
                              f"the single process's"))
    held = {name: max(rank[name] for rank in res["held"]) for name in BACKENDS}
    for name in BACKENDS:
        goal = (f"<= {SHARDED_GOAL:.2f}x ddp" if name in ("fsdp", "zero3")
                else "< ddp (optimizer state split)" if name.startswith("zero") else "everything on every rank")
        rows.append(dict(name=f"{WORLD} ranks: {name}, parameter + optimizer state per rank", value=held[name] / 2**20,
                         unit="MiB", goal=goal, ratio=held[name] / held["ddp"], note=""))
    return rows



if __name__ == "__main__":
    from bench.run_all import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps only (smoke test)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run one rank, write here
    args = parser.parse_args()
    if args.worker is not None:
        rounds, per_round = (1, 1) if args.quick else (6, 1)
        _worker(args.worker, rounds, per_round)
    else:
        print(f"model=tiny, seq {SEQ}, global batch {GLOBAL_BATCH}, fp32, CPU, 1 thread per process")
        print(table(run(quick=args.quick)))
