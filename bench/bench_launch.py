"""Launcher benchmark: submitting a 100-job sweep (as arrays) and `status` over 100 jobs.

Goals (issue 6): submit <= 5 s, status <= 2 s, measured as a user sees them: the wall time of
`python launch/sweep.py ...` in a fresh process (imports included). SLURM is a set of fake
commands on PATH (`install_fake_slurm`): sbatch records the script and queues the array's tasks
as PENDING, squeue prints that queue, so the launcher's own cost is what gets measured, not a
controller's. The tests use the same fakes.

    python bench/bench_launch.py [--quick]
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

ROOT = Path(__file__).resolve().parent.parent

_SBATCH = r'''
import fcntl, json, os, re, shutil, sys, time
d = os.environ["FAKE_SLURM_DIR"]
script = sys.argv[-1]
text = open(script).read()
with open(os.path.join(d, "lock"), "w") as lk:
    fcntl.flock(lk, fcntl.LOCK_EX)
    path = os.path.join(d, "next")
    n = int(open(path).read()) if os.path.exists(path) else 1000
    open(path, "w").write(str(n + 1))
    m = re.search(r"^#SBATCH --array=(\d+)-(\d+)", text, re.M)
    ids = [f"{n}_{i}" for i in range(int(m[1]), int(m[2]) + 1)] if m else [str(n)]
    with open(os.path.join(d, "queue"), "a") as q:
        q.writelines(f"{i}|PENDING|None\n" for i in ids)
    with open(os.path.join(d, "sbatch.log"), "a") as log:
        log.write(json.dumps({"id": n, "ids": ids, "argv": sys.argv[1:]}) + "\n")
    shutil.copy(script, os.path.join(d, f"script_{n}.sh"))
time.sleep(float(os.environ.get("FAKE_SBATCH_DELAY", "0")))
print(f"Submitted batch job {n}")
'''

_SQUEUE = r'''
import os
path = os.path.join(os.environ["FAKE_SLURM_DIR"], "queue")
if os.path.exists(path):
    print(open(path).read(), end="")
'''

_SCANCEL = r'''
import fcntl, os, sys
d = os.environ["FAKE_SLURM_DIR"]
with open(os.path.join(d, "lock"), "w") as lk:
    fcntl.flock(lk, fcntl.LOCK_EX)
    open(os.path.join(d, "scancel.log"), "a").write(" ".join(sys.argv[1:]) + "\n")
    path = os.path.join(d, "queue")
    if os.path.exists(path):
        keep = [l for l in open(path) if l.split("|")[0] not in sys.argv[1:]]
        open(path, "w").writelines(keep)
'''

_SCONTROL = r'''
import os, sys
d = os.environ["FAKE_SLURM_DIR"]
if sys.argv[1:3] == ["show", "config"]:
    print("MaxArraySize            = " + os.environ.get("FAKE_MAX_ARRAY_SIZE", "1001"))
elif sys.argv[1:2] == ["requeue"]:
    open(os.path.join(d, "requeue.log"), "a").write(" ".join(sys.argv[2:]) + "\n")
else:
    sys.exit("scontrol (fake): unsupported " + " ".join(sys.argv[1:]))
'''

_SACCT = r'''
import sys
sys.exit("sacct: error: Slurm accounting storage is disabled")
'''


def install_fake_slurm(root: Path) -> dict[str, str]:
    """Write fake sbatch/srun/squeue/scancel/scontrol/sacct under root/bin; return the env to use."""
    bin_dir, state = root / "bin", root / "state"
    bin_dir.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    scripts = {"sbatch": _SBATCH, "squeue": _SQUEUE, "scancel": _SCANCEL, "scontrol": _SCONTROL,
               "sacct": _SACCT, "srun": "import sys\nsys.exit(0)\n"}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SLURM_DIR": str(state)}


def write_sweep_experiment(path: Path, data_root: Path, n_lr: int = 10, n_seed: int = 10) -> Path:
    lrs = ", ".join(f"{(i + 1) * 1e-4:.1e}" for i in range(n_lr))
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
  dataset.val_dataset.data_root: {data_root}
  trainer.config.min_lr: 1.0e-5
sweep:
  grid:
    trainer.config.lr: [{lrs}]
    run.seed: [{seeds}]
resources: {{nodes: 1, gpus_per_node: 0, tasks_per_node: 2, time: 30, array_parallelism: 20}}
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


def run(quick: bool = False) -> list[dict]:
    """Rows: name, value, unit, goal, ratio (value / goal; <= 1 meets the goal)."""
    reps = 1 if quick else 3
    py = sys.executable
    submit_times, status_times = [], []
    with tempfile.TemporaryDirectory(prefix="bench_launch_") as tmp:
        base = Path(tmp)
        data = base / "data"
        data.mkdir()
        exp = write_sweep_experiment(base / "bench_sweep.yaml", data)
        for rep in range(reps):
            work = base / f"rep{rep}"
            env = {**os.environ, **install_fake_slurm(work), "RUNS_DIR": str(work / "runs")}
            submit_times.append(_timed([py, "launch/sweep.py", str(exp), "--executor", "slurm"], env))
            sweep = work / "runs" / "bench_sweep"
            for i, run_dir in enumerate(p for p in sweep.iterdir() if (p / "state.json").exists()):
                lines = "".join(f'{{"step": {s}, "loss": {5 - s / 100:.3f}, "tokens_per_s": 1000.0}}\n'
                                for s in range(10, 110 + i % 7, 10))
                (run_dir / "metrics.jsonl").write_text(lines)
            status_times.append(_timed([py, "launch/sweep.py", "status", str(sweep)], env))
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for name, goal, times in (("submit a 100-job sweep as arrays (fake sbatch)", 5.0, submit_times),
                              ("status over 100 jobs", 2.0, status_times)):
        wall = statistics.median(t[0] for t in times)
        cpu = statistics.median(t[1] for t in times)
        rows.append({"name": f"{name}, wall", "value": round(wall, 3), "unit": "s", "goal": goal,
                     "ratio": round(wall / goal, 3)})
        rows.append({"name": f"{name}, CPU time", "value": round(cpu, 3), "unit": "s", "goal": goal,
                     "ratio": round(cpu / goal, 3)})
    return rows


if __name__ == "__main__":
    rows = run(quick="--quick" in sys.argv)
    print("| benchmark | value | unit | goal | ratio |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['value']} | {r['unit']} | <= {r['goal']} | {r['ratio']} |")
