"""Impolite failures: seconds from a hung or killed rank to every rank gone (issue 13).

Two ranks of `main.py` (tiny model, DDP on gloo, CPU) train until step WARM_STEPS has been logged
(so `hang_timeout_s=auto` has a median step time), then one rank fails; the figure is the time
from the failure to the moment no rank process is left. Which rule caught it is read from the
failure reports (gpt2/watchdog.py):
- SIGKILL of rank 1 from outside: the survivor's next gloo read fails (comm_error) or its watchdog
  sees the process gone on this host (peer_lost). Goal <= 10 s.
- SIGSTOP of rank 1 from outside, defaults: the heartbeat rule (peer_lost after
  heartbeat_timeout_s = 10 s); rank 0 then kills the stopped rank (same host). Goal <= 3 steps + 30 s.
- SIGSTOP with the heartbeat rule off (heartbeat_timeout_s=0): only the hang rule (auto) can catch
  it, from the frozen progress record. Goal <= 3 steps + 30 s.
- a hang with every thread alive (GPT2_FAULT=hang@<step>:1, a deadlocked data worker as far as
  anyone can tell): the hang rule on both ranks; the hung rank dumps its own stacks. The failure
  time is the hung rank's last progress (its report's time - detected_after_s). Goal <= 3 steps + 30 s.

    python -m bench.bench_failures            # all four, ~3 minutes on 2 CPU cores
    python -m bench.bench_failures --quick    # the SIGKILL and the default SIGSTOP rows only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARM_STEPS = 20
KILL_GOAL_S = 10.0
HANG_GOAL_STEPS, HANG_GOAL_S = 3, 30.0


def _overrides(run: Path, data: Path, extra: list[str]) -> list[str]:
    return ["model=tiny", "trainer=ddp", "run.device=cpu", f"run.dir={run}", "wandb.mode=disabled",
            f"dataset.train_dataset.data_root={data}", f"dataset.val_dataset.data_root={data}",
            "model.config.n_layer=2", "model.config.n_head=2", "model.config.n_embd=64", "model.config.block_size=64",
            "dataset.seq_len=32", "trainer.config.batch_size=2", "trainer.config.eval_interval=0",
            "trainer.config.max_steps=100000", "trainer.config.checkpoint_strategy.config.interval=0", *extra]


def _start(run: Path, data: Path, extra: list[str], fault: str) -> list[subprocess.Popen[bytes]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "GPT2_", "TORCHELASTIC"))}
        env.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", GPT2_LOG_LEVEL="WARNING", WANDB_MODE="disabled", GPT2_FAULT=fault,
                   PYTHONPATH=str(ROOT))
        with open(run / f"out{r}.txt", "wb") as out:
            procs.append(subprocess.Popen([sys.executable, "main.py", *_overrides(run, data, extra)], cwd=ROOT,
                                          env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def _rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if "step_time" in r]  # train rows: events (start, end) carry none


def scenario(base: Path, data: Path, name: str, extra: list[str], how: str) -> dict[str, Any]:
    """how: "kill" | "stop" (a signal to rank 1 from outside) | "hang" (GPT2_FAULT, threads alive)."""
    from gpt2.watchdog import read_failures

    run = base / name
    procs = _start(run, data, extra, f"hang@{WARM_STEPS + 2}:1" if how == "hang" else "")
    try:
        deadline = time.monotonic() + 600
        while len(_rows(run)) < WARM_STEPS:
            if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
                raise RuntimeError(f"{name}: training never reached step {WARM_STEPS}: "
                                   f"{(run / 'out0.txt').read_text()[-1500:]}")
            time.sleep(0.05)
        step_s = statistics.median(r["step_time"] for r in _rows(run)[1:])
        failed_at = time.time()
        if how != "hang":
            time.sleep(step_s * 0.5)  # land inside a step
            failed_at = time.time()
            procs[1].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        deadline = time.monotonic() + 180  # the slowest rule (hang, auto) needs ~30 s
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                logs = "".join(p.read_text()[-1500:] for p in sorted((run / "logs").glob("rank*.log")))
                raise RuntimeError(f"{name}: ranks still running 180 s after the failure: {logs}")
            time.sleep(0.02)
        gone = time.time()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    reps = read_failures(run, 0)
    if how == "hang":
        own = [r for r in reps if r["rank"] == 1]
        if own:
            failed_at = own[0]["time"] - (own[0]["detected_after_s"] or 0)
    first = reps[0] if reps else {}
    caught = ", ".join(f"rank {r['rank']}: {r['kind']} (blames {r['blamed_rank']})" for r in reps) or "no report"
    return {"seconds": gone - failed_at, "step_s": step_s, "codes": [p.returncode for p in procs],
            "caught": caught, "first": first.get("message", "")[:90]}


SCENARIOS = [  # name, overrides, how, goal kind
    ("sigkill", [], "kill", "kill"),
    ("sigstop_heartbeat", [], "stop", "hang"),
    ("sigstop_hang_rule", ["trainer.config.heartbeat_timeout_s=0"], "stop", "hang"),
    ("hang_threads_alive", [], "hang", "hang"),
]


def run(quick: bool = False, directory: str | Path | None = None) -> list[dict]:
    from data_prep.download import prepare

    base = Path(tempfile.mkdtemp(prefix="bench_failures_", dir=directory))
    rows = []
    try:
        data = base / "shards"
        prepare(dataset="pydoc", out_dir=data, shard_size=20_000, num_shards=None)
        for name, extra, how, goal_kind in SCENARIOS[:2] if quick else SCENARIOS:
            r = scenario(base, data, name, extra, how)
            goal = KILL_GOAL_S if goal_kind == "kill" else HANG_GOAL_STEPS * r["step_s"] + HANG_GOAL_S
            label = {"kill": "SIGKILL rank 1 -> every rank gone",
                     "stop": f"SIGSTOP rank 1 ({' '.join(extra) or 'defaults'}) -> every rank gone",
                     "hang": "hang, threads alive (GPT2_FAULT=hang) -> every rank gone"}[how]
            rows.append({"name": label, "value": round(r["seconds"], 2), "unit": "s",
                         "goal": f"<= {goal:.1f} s", "ratio": r["seconds"] / goal,
                         "note": f"exit codes {r['codes']}; {r['caught']}; step {r['step_s'] * 1000:.0f} ms"})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return rows



if __name__ == "__main__":
    from bench.run_all import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the SIGKILL and default SIGSTOP rows only")
    parser.add_argument("--dir", default=None, help="directory to write in (default: a temp dir)")
    args = parser.parse_args()
    print(table(run(quick=args.quick, directory=args.dir)))
