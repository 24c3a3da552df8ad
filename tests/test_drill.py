"""launch/drill.py, the driver: how it reads a run's records and runs SLURM commands (on CPU, in
well under a second), then one real drill on the local SLURM cluster (marked slurm). Its pure half
is tested in tests/test_drill_plan.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gpt2.errors import UserError
from launch import drill as dr
from launch import drill_plan as dp
from launch import record, slurm

ROOT = Path(__file__).resolve().parent.parent

# ---- the driver reads the run's records ------------------------------------------------------


def test_observe_reads_the_records_a_stop_leaves(tmp_path: Path) -> None:
    """A stop at step 20, recorded in state.json 0.23 s after its request, whose save of step 20
    committed (MANIFEST.json `time`) at t=1020.53: the request landed in the save."""
    run_dir = tmp_path / "sweep" / "main"
    run_dir.mkdir(parents=True)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "rank0.log").write_text("no line here is read\n")
    rows = [{"step": s, "loss": 10.0 - s / 10, "restart": 0, "time": 1000.0 + s} for s in range(1, 21)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, commit in ((19, 1019.5), (20, 1020.53)):  # 19 is no interval save: ignored
        d = run_dir / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / dp.CHECKPOINT_MANIFEST).write_text(json.dumps({"step": step, "time": commit}))
    stopped = record.RunState(state=record.REQUEUED, restarts=1, preemptions=1, step=20, reason="USR2",
                              stop_save_s=0.23)
    # what the drill saw when the job was back in the queue; the requeued attempt has since started
    # and replaced state.json (stop_save_s gone), as it can on SLURM before the drill reads again
    record.write_state(run_dir, record.RunState(state=record.RUNNING, restarts=1, preemptions=1))
    run = dr.Run(tmp_path / "sweep", "main", "7", run_dir, run_dir / "checkpoints")
    assert run.last_step() == 20 and dp.resumed_step(run.rows(), 0) == 0 and not run.saving(20)
    (run_dir / "checkpoints" / "step_00000040.tmp").mkdir()
    assert run.saving(40)
    drill = dr.Drill("x.yaml", [], "d", None, ckpt_interval=20, eval_interval=0)
    it = dp.Interruption(1, "usr2", "checkpoint", 20)
    drill.observe(run, it, before=record.RunState(state=record.RUNNING), st=stopped)
    assert (it.stop_step, it.reason, it.save_s, it.recorded, it.hit, it.restart, it.note) == (
        20, "USR2", 0.23, "preemption", "checkpoint", 1, "")
    (run_dir / "checkpoints" / "step_00000020" / dp.CHECKPOINT_MANIFEST).write_text('{"step": 20, "time": 1020.1}')
    drill.observe(run, it, before=record.RunState(state=record.RUNNING), st=stopped)  # request before the save began
    assert it.hit == "train" and "landed in train" in it.note


# ---- the SLURM seam --------------------------------------------------------------------------


def test_slurm_commands_fail_in_one_line() -> None:
    with pytest.raises(slurm.CommandError, match="^no-such-scontrol-xyz: command not found$"):
        slurm.run_cmd(["no-such-scontrol-xyz", "show", "job"], timeout=5)
    # a UserError too: the CLI prints it as one line
    with pytest.raises(UserError, match=r"^sh -c echo boom >&2; exit 3: exit 3: boom$"):
        slurm.run_cmd(["sh", "-c", "echo boom >&2; exit 3"], timeout=5)
    assert slurm.parse_kv("JobId=7 JobState=PENDING Reason=BeginTime JobState=X") == {
        "JobId": "7", "JobState": "PENDING", "Reason": "BeginTime"}


def test_drill_sends_every_slurm_command_through_the_seam() -> None:
    """No module of the drill runs a SLURM command itself (only launch/slurm.py names them) or reads log lines."""
    for path in (ROOT / "launch" / "drill.py", ROOT / "launch" / "drill_plan.py"):
        text = path.read_text()
        for word in ('"scontrol"', '"scancel"', '"sbatch"', '"squeue"', '"sacct"', "run_cmd",
                     "| stopping at", "| resumed from"):  # nor the trainer's log lines
            assert word not in text, f"{path.name} uses {word}"
    assert "subprocess" not in (ROOT / "launch" / "drill_plan.py").read_text()


# ---- command line ----------------------------------------------------------------------------


def test_bad_input_is_exit_2_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "two.yaml"
    exp.write_text("cluster: local\noverrides: {model: tiny}\nsweep: {grid: {trainer.config.lr: [1.0e-3, 2.0e-3]}}\n")
    assert dr.main([str(exp)]) == 2
    assert "expands into 2 jobs" in capsys.readouterr().err
    assert dr.main([str(exp), "trainer.config.lr=1e-3", "-k", "0"]) == 2
    assert dr.main([str(exp), "--kinds", "usr2,sigkill"]) == 2
    assert "--kinds" in capsys.readouterr().err


# ---- one real drill ------------------------------------------------------------------------------


def _tiny_drill(tmp_path: Path, pydoc_shards: Path, **changes: object) -> tuple[Path, dict[str, str]]:
    """The tiny experiment a real drill runs on the local cluster, and the environment to run it."""
    overrides = {
        "model": "tiny", "model.config.n_layer": 2, "model.config.n_embd": 64, "model.config.n_head": 2,
        "model.config.block_size": 64, "dataset.seq_len": 32, "trainer.config.batch_size": 2,
        "trainer.config.warmup_steps": 5, "trainer.config.max_steps": 60, "trainer.config.eval_interval": 25,
        "trainer.config.checkpoint_strategy.config.interval": 20,
        "wandb.mode": "disabled", "dataset.train_dataset.data_root": str(pydoc_shards),
        "dataset.val_dataset.data_root": str(pydoc_shards), **changes,
    }
    exp = tmp_path / "drilled.yaml"
    # all 4 CPUs of a node: the preempting job (which takes whole nodes) preempts nothing else
    exp.write_text(yaml.safe_dump({"cluster": "local", "executor": "slurm", "overrides": overrides,
                                   "resources": {"time": 20, "cpus_per_task": 4}}, sort_keys=False))
    return exp, {**os.environ, "RUNS_DIR": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}


def _run_drill(exp: Path, env: dict[str, str], *args: str) -> str:
    """`launch/drill.py EXP ARGS` on the local cluster: its output, once it exited 0 with a PASS.
    Every job it submitted is cancelled afterwards, passed or not (the drill cleans up after
    itself; this is for a drill that crashed)."""
    from slurm_util import cancel, require_slurm

    require_slurm()
    runs = Path(env["RUNS_DIR"])
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "drill.py"), str(exp), *args, "--name", "drill",
                               "--timeout", "600"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=1200)
        out = proc.stdout
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
        assert out.splitlines()[-1].startswith("PASS"), out
        return out
    finally:
        ids = []
        for m in runs.glob(f"*/{record.RECORD}"):
            subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "cancel", str(m.parent)],
                           cwd=ROOT, env=env, capture_output=True, timeout=120)
            ids += [r.job_id for r in record.SweepRecord(m.parent).read().values() if r.job_id]
        for _ in range(3 if ids else 0):  # a job that requeued itself anyway is cancelled while it waits
            cancel(ids)
            time.sleep(2)


@pytest.mark.slurm
@pytest.mark.slow
def test_real_drill_on_the_local_cluster(tmp_path: Path, pydoc_shards: Path) -> None:
    """Two interruptions, one of each kind, aimed at a checkpoint write and an eval; exit 0 only
    when the interrupted run matches the reference step for step."""
    # an eval long enough (6-12 s, measured on our machines) for the preemption to arrive during it: SLURM decides to
    # preempt in a scheduling pass, measured 0.1-1.7 s after the blocker's submission and at most
    # one sched_interval (5 s, slurm.conf.in); with a 0.3 s eval the run sometimes finished first
    # and the preemption stopped nothing. One eval in the run (step 50) besides the last one: each
    # costs seconds in the reference and in the drilled run alike
    exp, env = _tiny_drill(tmp_path, pydoc_shards, **{"trainer.config.eval_steps": 600,
                                                      "trainer.config.eval_interval": 50})
    out = _run_drill(exp, env, "-k", "2", "--seed", "1")
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("#  KIND"))
    rows = [line.split() for line in lines[head + 1:head + 3]]
    assert sorted(r[1] for r in rows) == ["preempt", "usr2"] and sorted(r[2] for r in rows) == ["checkpoint", "eval"], out
    for r in rows:
        assert r[5] == r[11], f"stopped at {r[5]} but resumed at {r[11]}\n{out}"  # RESUMED AT
        # save and detection times came through state.json
        assert "-" not in (r[7], r[8]) and float(r[7]) >= 0 and float(r[8]) >= 0, out
    assert "train loss: 60 steps compared, largest |difference| 0, tolerance 0" in out
    st = record.read_state(Path(env["RUNS_DIR"]) / "drill" / "main")
    assert st is not None and st.state == record.COMPLETED and st.restarts == 2, st


@pytest.mark.slurm
@pytest.mark.slow
def test_a_storm_on_the_local_cluster_matches_step_for_step_and_reports_goodput(tmp_path: Path,
                                                                                pydoc_shards: Path) -> None:
    """A usr2 about every 20 steps through SLURM (`scancel --signal`): every stop requeues the job,
    which resumes where it saved; the per-step losses equal the uninterrupted run's, and the
    ledger counts each attempt, each interruption, and no replayed step."""
    from launch import goodput

    exp, env = _tiny_drill(tmp_path, pydoc_shards, **{"trainer.config.eval_interval": 0})
    out = _run_drill(exp, env, "--storm", "--every", "20", "--seed", "1")
    assert "train loss: 60 steps compared, largest |difference| 0, tolerance 0" in out
    assert "drilled   goodput" in out and "start-up per attempt (3 attempts" in out
    led = goodput.run_ledger(Path(env["RUNS_DIR"]) / "drill" / "main")
    assert led is not None and (led.attempts, led.interruptions, led.replayed) == (3, 2, 0), led
    assert led.queue > 0  # SLURM queued every attempt: the requeues' waits are queue time, not a gap


def test_slurm_commands_outlive_the_steps_sigterm() -> None:
    """A job that requeues itself runs `scontrol update` while SLURM ends its step with SIGTERM to
    every process of the task: the command must finish, not die with the step."""
    assert slurm.run_cmd(["sh", "-c", "kill -TERM $$; echo done"], timeout=10) == "done\n"
