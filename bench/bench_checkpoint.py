"""Checkpoint save/load throughput against the disk, time blocked by saves, and signal to commit (issues 5, 14).

- Disk: `dd if=/dev/zero bs=4M conv=fsync` of the same size as the state, in the same directory,
  right after each save (this VM's disk speed moves between about 400 and 1,000 MB/s from one
  minute to the next), medians of both (FACTS.md measured about 410 MB/s on this machine).
- Save: a synchronous `CheckpointManager.save` of the ~462 MB DDP state (model + AdamW moments +
  RNG; 4 layers x 512 wide, vocab 50304) on one process: torch.save hashed as it writes, fsync,
  manifest, rename. Goal (issue 14): >= 80% of dd, in both modes.
- Blocked: seconds one save blocks training, asynchronous (the save call, plus the wait at the next
  optimizer step for the host copy that runs during its forward and backward) against synchronous
  (the whole save), for the tiny model's state and a gpt2_124m-shaped one (~1.5 GB with AdamW),
  after a first save (which allocates the host buffers). Goal: async <= 10% of sync.
- Overhead: the same training loop (real forward, backward, AdamW steps of the tiny model, poll
  every step as train.py does) with an asynchronous save every 10 steps and without saves,
  alternated, fastest of each. Goal: within 5%.
- Load: `find_latest` (verify: sizes and sha256) + `backend.load` + RNG restore, and the same with
  sizes only (`verify_checksums=false`). The files were just written, so the page cache is warm:
  this is the figure of a requeue on the same node, not a cold read. Goal: >= 50% of dd.
- Signal to commit: `main.py` trains the same model in a child process; once it has logged two
  steps, SIGUSR2 is sent from outside (as SLURM does) at a random point of a step, and the time
  until the `latest` pointer of the committed checkpoint is written is compared with one step
  (median step time) plus one save (as measured above). Goal: ratio <= 1.

    python -m bench.bench_checkpoint            # five rounds of save/dd, three of blocked, a 50-step loop x 5
    python -m bench.bench_checkpoint --quick    # three rounds of save/dd, one of blocked, a 30-step loop x 3
    python -m bench.bench_checkpoint --dir /path/on/the/shared/fs   # where to write (default: a temp dir)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from gpt2.metrics_file import json_rows

ROOT = Path(__file__).resolve().parent.parent
FULL = dict(n_layer=4, n_head=8, n_embd=512, block_size=256)  # the ~462 MB DDP state of issue 14
QUICK = dict(n_layer=2, n_head=2, n_embd=128, block_size=64)  # the signal test's model in quick mode
TINY = dict(n_layer=4, n_head=4, n_embd=128, block_size=256)  # configs/model/tiny.yaml
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)  # configs/model/gpt2_124m.yaml
GOAL_FRACTION = 0.5  # loads: of the disk's sequential write speed
GOAL_SAVE = 0.8  # saves: of dd with fsync (issue 14)
GOAL_BLOCKED = 0.10  # async blocked time over sync
GOAL_OVERHEAD = 0.05


def _overrides(shape: dict[str, int], run_dir: Path, data: Path | None = None) -> list[str]:
    out = [f"model.config.{k}={v}" for k, v in shape.items()]
    out += [f"run.dir={run_dir}", "run.device=cpu", "wandb.mode=disabled", "trainer.config.batch_size=1",
            "dataset.seq_len=64", "trainer.config.eval_interval=0", "trainer.config.max_steps=100000",
            "trainer.config.checkpoint_strategy.config.interval=0"]
    if data is not None:
        out += [f"dataset.train_dataset.data_root={data}", f"dataset.val_dataset.data_root={data}"]
    return out


def disk_write_mb_s(directory: Path, size_bytes: int) -> float:
    """Sequential write with fsync of `size_bytes` (rounded to 4 MiB) by dd, in MB/s."""
    count = max(1, size_bytes // (4 << 20))
    target = directory / "dd.bin"
    t0 = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={count}", "conv=fsync", "status=none"],
                   check=True)
    dt = time.perf_counter() - t0
    target.unlink()
    return count * (4 << 20) / 1e6 / dt


def _ddp_backend(directory: Path, shape: dict[str, int]) -> tuple[Any, Any]:
    """(config, DDP backend of this shape after one AdamW step) on one process (the group must exist)."""
    from gpt2.backends import make_backend
    from gpt2.compose import load_config
    from gpt2.distributed import init
    from gpt2.train import build_model

    cfg = load_config(_overrides(shape, directory / "run"))
    backend = make_backend("ddp", cfg.trainer.config, init("cpu"))
    backend.setup(build_model(cfg, 0))
    assert backend.raw_model is not None and backend.optimizer is not None
    for p in backend.raw_model.parameters():  # one step, so the AdamW moments exist
        p.grad = torch.randn_like(p) * 1e-3
    backend.optimizer.step()
    backend.optimizer.zero_grad(set_to_none=True)
    return cfg, backend


def _state(step: int) -> dict[str, Any]:
    return {"step": step, "tokens": 0, "data": {}}


def save_load(directory: Path, shape: dict[str, int], rounds: int) -> dict[str, float]:
    """Median synchronous save and load figures of a DDP state of this shape, on one process, and
    the median dd of the same size, each dd right after a save (this machine's disk speed varies
    from minute to minute: the two are compared round by round)."""
    from gpt2 import distributed
    from gpt2.checkpoint.manager import CheckpointManager

    dist = distributed.init("cpu")
    try:
        cfg, backend = _ddp_backend(directory, shape)
        root = directory / "checkpoints"
        settings = cfg.trainer.config.checkpoint_strategy.config
        mgr = CheckpointManager(root, settings, dist)
        meta = {"config": {}, "wandb_id": None}
        saves, loads, loads_sizes, disk = [], [], [], []
        size = 0
        for step in range(1, rounds + 1):
            mgr.save(step, backend, meta=meta, trainer_state=_state(step), background=False)
            saves.append(mgr.last_save_s)
            size = mgr.last_save_bytes
            disk.append(disk_write_mb_s(directory, size))
            for checksums, out in ((True, loads), (False, loads_sizes)):
                settings.verify_checksums = checksums
                t0 = time.perf_counter()
                resume = mgr.find_latest()
                assert resume is not None and resume.step == step
                backend.load(resume.path)
                mgr.restore_rng(resume)
                out.append(time.perf_counter() - t0)
        shutil.rmtree(root)
        del backend  # it holds the process group
    finally:
        distributed.destroy()
    return {"bytes": size, "save_s": statistics.median(saves), "load_s": statistics.median(loads),
            "load_sizes_s": statistics.median(loads_sizes), "disk_mb_s": statistics.median(disk)}


def blocked(directory: Path, shape: dict[str, int], rounds: int) -> dict[str, float]:
    """Median seconds a save blocks training, synchronous and asynchronous, for a DDP state of this shape.

    Asynchronous: the save call plus the wait at the next optimizer step for the host copy, which
    runs during that step's forward and backward (one batch of 4 x 128 tokens here). A first
    asynchronous save (not counted) allocates the host buffers, as a run's first save does."""
    from gpt2 import distributed
    from gpt2.checkpoint.manager import CheckpointManager

    dist = distributed.init("cpu")
    try:
        cfg, backend = _ddp_backend(directory, shape)
        mgr = CheckpointManager(directory / "blocked", cfg.trainer.config.checkpoint_strategy.config, dist)
        meta = {"config": {}, "wandb_id": None}
        x = torch.randint(0, cfg.model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
        mgr.save(1, backend, meta=meta, trainer_state=_state(1), background=True)
        mgr.wait()
        sync, asyn = [], []
        for r in range(rounds):
            mgr.save(2 + 2 * r, backend, meta=meta, trainer_state=_state(2 + 2 * r), background=False)
            sync.append(mgr.last_blocked_s)
            size = mgr.last_save_bytes
            mgr.save(3 + 2 * r, backend, meta=meta, trainer_state=_state(3 + 2 * r), background=True)
            call_s = mgr.last_blocked_s
            backend.forward_backward(x, x, last_micro=True)  # the next step, while the copy runs
            t0 = time.perf_counter()
            backend.stager.fence()  # what optimizer_step waits for
            asyn.append(call_s + time.perf_counter() - t0)
            backend.optimizer_step(1e-4)
            mgr.wait()  # in a run this overlaps the next steps; here the next round would wait for it anyway
        shutil.rmtree(directory / "blocked")
        del backend
    finally:
        distributed.destroy()
    return {"bytes": size, "sync_s": statistics.median(sync), "async_s": statistics.median(asyn)}


def overhead(directory: Path, shape: dict[str, int], steps: int, every: int, repeats: int) -> dict[str, float]:
    """Seconds of `steps` training steps (real forward, backward, AdamW; poll each step like train.py)
    with an asynchronous save every `every` steps and without; alternated, fastest of `repeats` each."""
    from gpt2 import distributed
    from gpt2.checkpoint.manager import CheckpointManager

    dist = distributed.init("cpu")
    try:
        cfg, backend = _ddp_backend(directory, shape)
        mgr = CheckpointManager(directory / "overhead", cfg.trainer.config.checkpoint_strategy.config, dist)
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, cfg.model.config.vocab_size, (4, 64), generator=g) for _ in range(2))
        meta = {"config": {}, "wandb_id": None}

        first = 0  # step numbers go on from loop to loop (retention drops "newer" steps otherwise)

        def loop(saving: bool, steps: int = steps, backend: Any = backend) -> float:
            nonlocal first
            t0 = time.perf_counter()
            for step in range(first + 1, first + steps + 1):
                backend.forward_backward(x, y, last_micro=True)
                backend.optimizer_step(1e-4)
                if saving and (step - first) % every == 0:
                    mgr.save(step, backend, meta=meta, trainer_state=_state(step), background=True)
                mgr.poll()
            mgr.wait()  # the end of a run waits for the last save
            first += steps
            return time.perf_counter() - t0

        loop(False, 2)  # warm-up: allocator, first AdamW step
        plain, saving = [], []
        for _ in range(repeats):
            plain.append(loop(False))
            saving.append(loop(True))
        shutil.rmtree(directory / "overhead", ignore_errors=True)
        del loop, backend  # they hold the process group
    finally:
        distributed.destroy()
    return {"plain_s": min(plain), "saving_s": min(saving), "steps": steps, "every": every}


def signal_to_commit(directory: Path, shape: dict[str, int]) -> dict[str, float]:
    """Train in a child process, send SIGUSR2 mid-step, time until the checkpoint is committed."""
    from data_prep.download import prepare

    data = directory / "shards"
    prepare(dataset="pydoc", out_dir=data, shard_size=20_000, num_shards=None)
    run = directory / "sigrun"
    env = {**os.environ, "GPT2_LOG_LEVEL": "WARNING", "WANDB_MODE": "disabled"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = directory / "sigrun.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "main.py", *_overrides(shape, run, data)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 600
        rows: list[dict[str, Any]] = []
        while len(rows) < 2:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"training never logged 2 steps: {log.read_text()[-2000:]}")
            time.sleep(0.05)
            rows = _step_rows(metrics)
        step_s = statistics.median(r["step_time"] for r in rows)
        time.sleep(random.uniform(0.1, 0.9) * step_s)  # land somewhere inside a step
        sent = time.time()
        proc.send_signal(signal.SIGUSR2)
        rc = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    if rc != 75:
        raise RuntimeError(f"main.py exited {rc}, expected 75: {log.read_text()[-2000:]}")
    committed = (run / "checkpoints" / "latest").stat().st_mtime
    return {"latency_s": committed - sent, "step_s": statistics.median(r["step_time"] for r in _step_rows(metrics))}


def _step_rows(metrics: Path) -> list[dict[str, Any]]:
    """The train rows of a metrics.jsonl (not its start/end event rows, nor a line being written)."""
    return [r for r in json_rows(metrics.read_text()) if "step_time" in r] if metrics.is_file() else []


def run(quick: bool = False, directory: str | Path | None = None) -> list[dict]:
    """Rows (name, value, unit, goal, ratio). Throughput ratios are over dd; blocked and overhead
    ratios are async over sync and saving over plain; the signal row's ratio is latency over one
    step + one save (goal <= 1)."""
    rounds = 3 if quick else 5
    base = Path(tempfile.mkdtemp(prefix="bench_ckpt_", dir=directory))
    try:
        sl = save_load(base, FULL, rounds)
        mb = sl["bytes"] / 1e6
        disk = sl["disk_mb_s"]
        blocks = {name: blocked(base, shape, 1 if quick else 3) for name, shape in
                  (("tiny", TINY), ("gpt2_124m-shaped", GPT2_124M))}
        ov = overhead(base, TINY, 30 if quick else 50, 10, 3 if quick else 5)
        sig = signal_to_commit(base, QUICK if quick else FULL)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    goal_tp = f">= {GOAL_FRACTION:.0%} of dd"
    budget = sig["step_s"] + sl["save_s"]
    rows = [
        {"name": f"disk sequential write (dd, fsync, {mb:.0f} MB)", "value": round(disk, 1), "unit": "MB/s",
         "goal": "reference (FACTS.md: ~410)", "ratio": None},
        {"name": f"checkpoint save ({mb:.0f} MB DDP state: write hashed, fsync, commit)",
         "value": round(mb / sl["save_s"], 1), "unit": "MB/s", "goal": f">= {GOAL_SAVE:.0%} of dd",
         "ratio": mb / sl["save_s"] / disk},
        {"name": "checkpoint load (verify sha256 + load + RNG, warm cache)", "value": round(mb / sl["load_s"], 1),
         "unit": "MB/s", "goal": goal_tp, "ratio": mb / sl["load_s"] / disk},
        {"name": "checkpoint load (verify sizes only + load + RNG, warm cache)",
         "value": round(mb / sl["load_sizes_s"], 1), "unit": "MB/s", "goal": goal_tp,
         "ratio": mb / sl["load_sizes_s"] / disk},
        {"name": "save time", "value": round(sl["save_s"], 3), "unit": "s", "goal": "", "ratio": None},
    ]
    for name, b in blocks.items():
        state = f"{name} DDP state, {b['bytes'] / 1e6:.0f} MB"
        rows += [
            {"name": f"training blocked per save, synchronous ({state})", "value": round(b["sync_s"], 3),
             "unit": "s", "goal": "reference", "ratio": None},
            {"name": f"training blocked per save, asynchronous ({state})", "value": round(b["async_s"], 3),
             "unit": "s", "goal": f"<= {GOAL_BLOCKED:.0%} of synchronous", "ratio": b["async_s"] / b["sync_s"]},
        ]
    rows += [
        {"name": f"{ov['steps']} tiny-model steps (batch 4 x 64), no saves", "value": round(ov["plain_s"], 2), "unit": "s",
         "goal": "reference", "ratio": None},
        {"name": f"{ov['steps']} tiny-model steps, an asynchronous save every {ov['every']}",
         "value": round(ov["saving_s"], 2), "unit": "s", "goal": f"<= {1 + GOAL_OVERHEAD:.2f}x no saves",
         "ratio": ov["saving_s"] / ov["plain_s"]},
        {"name": "step time (median, same model, batch 1 x 64)", "value": round(sig["step_s"], 3), "unit": "s",
         "goal": "", "ratio": None},
        {"name": "USR2 -> committed checkpoint", "value": round(sig["latency_s"], 3), "unit": "s",
         "goal": f"<= step + save = {budget:.2f} s", "ratio": sig["latency_s"] / budget},
    ]
    return rows



if __name__ == "__main__":
    from bench.run_all import table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small state and one round (smoke test)")
    parser.add_argument("--dir", default=None, help="directory to write in (default: a temp dir)")
    args = parser.parse_args()
    print(table(run(quick=args.quick, directory=args.dir)))
