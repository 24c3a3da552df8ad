"""Launcher benchmark: submitting a 1,000-job sweep (one array) and `status` over its 1,000 jobs.

Goals (issue 11): submit <= 5 s, status <= 1 s, measured as a user sees them: the wall time of
`python launch/sweep.py ...` in a fresh process (imports included). The sweep is a grid of 1,000
learning rates, so the configuration layer composes once and merges the rest.

SLURM: the real local cluster when it answers (`make slurm-up`; the array is submitted with
array_parallelism 1 and cancelled right after `status`), else the fake commands of
`tests/fake_slurm` (sbatch records the script and queues the array's tasks as PENDING, squeue
prints that queue), so the launcher's own cost is what gets measured. `--fake` forces the fakes.

    python -m bench.bench_launch [--quick] [--fake]     (from the repository root)
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.fake_slurm import install_fake_slurm

ROOT = Path(__file__).resolve().parent.parent

def write_sweep_experiment(path: Path, data_root: Path, n_lr: int = 1000, n_seed: int = 1,
                           parallelism: int = 20) -> Path:
    lrs = ", ".join(f"{(i + 1) * 1e-6:.4g}" for i in range(n_lr))
    seeds = ", ".join(str(s) for s in range(n_seed))
    path.write_text(f"""\
description: benchmark sweep, {n_lr * n_seed} jobs
cluster: local
executor: slurm
overrides:
  model: tiny
  trainer: ddp
  dataset: pydoc
  dataset.train_dataset.data_root: {data_root}
  trainer.config.min_lr: 1.0e-5
sweep:
  grid:
    trainer.config.lr: [{lrs}]
    run.seed: [{seeds}]
resources: {{nodes: 1, gpus_per_node: 0, tasks_per_node: 1, time: 30, array_parallelism: {parallelism}}}
""")
    return path


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command): on a busy shared machine CPU time is what the
    launcher itself costs, and about the wall time it takes on an idle one."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed ({res.returncode}): {res.stderr.strip()[-500:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def real_cluster() -> bool:
    """Whether the local SLURM cluster answers (sinfo and sbatch on PATH, sinfo succeeds)."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30, check=False).returncode == 0


def run(quick: bool = False, fake: bool = False) -> list[dict]:
    """Rows: name, value, unit, goal, ratio (value / goal; <= 1 meets the goal)."""
    reps = 1 if quick else 3
    real = not fake and real_cluster()
    where = "the local SLURM cluster" if real else "fake sbatch"
    py = sys.executable
    submit_times, status_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench_launch_") as tmp:
        base = Path(tmp)
        data = base / "data"
        data.mkdir()
        exp = write_sweep_experiment(base / "bench_sweep.yaml", data, parallelism=1 if real else 20)
        for rep in range(reps):
            work = base / f"rep{rep}"
            env = {**os.environ, "RUNS_DIR": str(work / "runs")}
            if not real:
                env.update(install_fake_slurm(work))
            sweep = work / "runs" / "bench_sweep"
            try:
                submit_times.append(_timed([py, "launch/sweep.py", str(exp), "--executor", "slurm"], env))
                for i, run_dir in enumerate(p for p in sweep.iterdir() if (p / "state.json").exists()):
                    lines = "".join(f'{{"step": {s}, "loss": {5 - s / 100:.3f}, "tokens_per_s": 1000.0}}\n'
                                    for s in range(10, 110 + i % 7, 10))
                    (run_dir / "metrics.jsonl").write_text(lines)
                status_times.append(_timed([py, "launch/sweep.py", "status", str(sweep)], env))
            finally:
                if real and sweep.exists():
                    subprocess.run([py, "launch/sweep.py", "cancel", str(sweep)], cwd=ROOT, env=env,
                                   capture_output=True, check=False)
                shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, goal, times in ((f"submit a 1,000-job sweep as one array ({where})", 5.0, submit_times),
                              (f"status over 1,000 jobs ({where})", 1.0, status_times)):
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        rows.append({"name": f"{name}, wall", "value": round(wall, 3), "unit": "s", "goal": goal,
                     "ratio": round(wall / goal, 3)})
        rows.append({"name": f"{name}, CPU time", "value": round(cpu, 3), "unit": "s", "goal": goal,
                     "ratio": round(cpu / goal, 3)})
    return rows


if __name__ == "__main__":
    from bench.run_all import table

    print(table(run(quick="--quick" in sys.argv, fake="--fake" in sys.argv)))
