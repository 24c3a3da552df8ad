"""An ASHA sweep on the local SLURM cluster: 9 trials, the controller job killed once (it dies
after writing its first decisions, before acting on them), started again by hand, and the sweep
runs to the end with exactly one submission per rung a trial reached; then its chain (export,
then a sample) runs on the winner as SLURM jobs with dependencies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_util import cancel, require_slurm, run

from launch import advance, chain, record
from launch.asha import PROMOTE

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 900.0


def sweep_py(args: list[str], runs: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "RUNS_DIR": str(runs), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
            "PYTHONPATH": str(ROOT), "GPT2_ADVANCE_DELAY_S": "5", **env}
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=300)


def controllers(name: str) -> list[str]:
    return run(["squeue", "-h", "-n", f"{name}-advance", "-o", "%i"]).split()


def wait(what: str, done: object, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not done():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"still waiting after {timeout:.0f} s for {what}"
        time.sleep(2)


def test_asha_sweep_on_slurm_with_the_controller_killed_once(tmp_path: Path, pydoc_shards: Path) -> None:
    require_slurm()
    text = (ROOT / "jobs" / "asha_tiny.yaml").read_text().replace("executor: local", "executor: slurm")
    text = text.replace("dataset: pydoc", f"dataset: pydoc\n  dataset.train_dataset.data_root: {pydoc_shards}\n"
                                          f"  dataset.val_dataset.data_root: {pydoc_shards}")
    exp = tmp_path / "asha_slurm.yaml"
    exp.write_text(text)
    runs = tmp_path / "runs"
    sweep = runs / "asha_slurm"
    try:
        first = sweep_py([str(exp)], runs, **{advance.EXIT_AFTER_DECIDE: "1"})
        assert first.returncode == 0 and "controller: SLURM job" in first.stdout, first.stdout + first.stderr
        # the controller (and the ones it resubmits) carries the hook: the first to decide dies there
        wait("the first decisions", lambda: bool(advance.read_log(sweep).decided))
        wait("the killed controller to leave the queue", lambda: not controllers("asha_slurm"))
        log = advance.read_log(sweep)
        assert log.decided and not log.done
        stalled = sweep_py(["status", str(sweep)], runs).stdout  # what a person sees: nobody drives the sweep
        assert "controller: none queued, so the sweep is not advancing: start it again with" in stalled, stalled
        again = sweep_py(["advance", str(sweep), "--controller"], runs)  # by hand, no hook: acts, then resubmits
        assert again.returncode == 0, again.stdout + again.stderr
        driven = sweep_py(["status", str(sweep)], runs).stdout
        assert "controller: SLURM job" in driven and "(last round" in driven, driven
        wait("the sweep to finish", lambda: advance.read_log(sweep).decided and not controllers("asha_slurm")
             and all(r.state in (record.COMPLETED, record.STOPPED_EARLY, record.FAILED)
                     for r in record.SweepRecord(sweep).read().values()))
        log = advance.read_log(sweep)
        recs = record.SweepRecord(sweep).read()
        assert set(log.done) == set(log.decided)
        for name, rec in recs.items():
            promos = sum(1 for d in log.decided.values() if d.trial == name and d.action == PROMOTE)
            assert rec.submissions == 1 + promos, (name, rec.submissions, promos)
        winners = [n for n, r in recs.items() if advance.target_of(r.overrides) == 36]
        assert winners and all(record.read_state(sweep / n).state == record.COMPLETED for n in winners)
        assert {r.state for n, r in recs.items() if n not in winners} == {record.STOPPED_EARLY}
        outs = "".join(p.read_text() for p in (sweep / "logs").glob("controller-*.out"))
        assert "final ranking" in outs and "chain queued" in outs
        # the chain, queued by the last controller: export, then (afterok) a sample, on the winner
        wait("the chain", lambda: chain.step_state(sweep, "sample").get("state") in (record.COMPLETED, record.FAILED))
        export, sample = chain.step_state(sweep, "export"), chain.step_state(sweep, "sample")
        assert export["state"] == sample["state"] == record.COMPLETED and export["best"] in winners
        assert export["time"] < sample["time"] and (sweep / "export" / "model.safetensors").is_file()
    finally:
        sweep_py(["cancel", str(sweep)], runs)
        cancel(controllers("asha_slurm"))
        cancel(json.loads((sweep / "chain" / "submitted.json").read_text()).values()
               if (sweep / "chain" / "submitted.json").is_file() else [])
