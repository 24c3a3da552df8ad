"""launch/drill.py: its pure parts (planning, evidence, comparison, report) on CPU in well under a
second each, then one real drill on the local SLURM cluster (marked slurm)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpt2.errors import UserError
from launch import drill as dr
from launch import record

ROOT = Path(__file__).resolve().parent.parent

# ---- planning --------------------------------------------------------------------------------


def test_plan_is_seeded_aligned_and_spaced() -> None:
    plans = {seed: dr.plan_interruptions(3, seed, max_steps=200, ckpt_interval=25, eval_interval=40, min_gap=10)
             for seed in range(20)}
    assert plans[3] == dr.plan_interruptions(3, 3, max_steps=200, ckpt_interval=25, eval_interval=40, min_gap=10)
    assert len({tuple(i.target for i in p) for p in plans.values()}) > 10  # the seed moves them
    for plan in plans.values():
        targets = [i.target for i in plan]
        assert targets == sorted(targets) and all(b - a >= 10 for a, b in zip(targets, targets[1:]))
        assert sorted(i.aim for i in plan) == ["checkpoint", "eval", "train"]
        for i in plan:
            assert 10 <= i.target < 200  # never the last step: a request there finishes the run instead
            if i.aim == "checkpoint":
                assert i.target % 25 == 0
            elif i.aim == "eval":
                assert i.target % 40 == 0
            else:  # a plain step: not next to a save or an eval
                assert i.target % 25 not in (0, 1) and i.target % 40 not in (0, 39)
        assert [i.index for i in plan] == [1, 2, 3]
        kinds = {i.aim: i.kind for i in plan}  # the quick signal for the short write, preemption for eval
        assert (kinds["checkpoint"], kinds["eval"]) == ("usr2", "preempt")
    kinds = [i.kind for i in dr.plan_interruptions(6, 0, max_steps=300, ckpt_interval=0, eval_interval=0)]
    assert all(a != b for a, b in zip(kinds, kinds[1:]))  # otherwise they alternate


def test_plan_without_saves_or_evals_or_preemption() -> None:
    plan = dr.plan_interruptions(2, 0, max_steps=100, ckpt_interval=0, eval_interval=0, kinds=("usr2",))
    assert [(i.kind, i.aim) for i in plan] == [("usr2", "train"), ("usr2", "train")]
    # one checkpoint step only: the first aim takes it, the rest are plain steps
    plan = dr.plan_interruptions(3, 1, max_steps=60, ckpt_interval=30, eval_interval=0, min_gap=5)
    assert sorted(i.aim for i in plan) == ["checkpoint", "train", "train"]
    assert next(i.target for i in plan if i.aim == "checkpoint") == 30


@pytest.mark.parametrize("kwargs", [
    {"k": 5, "max_steps": 30, "min_gap": 10},  # no room
    {"k": 0},
    {"k": 1, "kinds": ("sigkill",)},
])
def test_plan_refuses_what_cannot_be_done(kwargs: dict[str, Any]) -> None:
    args = {"seed": 0, "max_steps": 200, "ckpt_interval": 20, "eval_interval": 0, **kwargs}
    with pytest.raises(UserError):
        dr.plan_interruptions(**args)


# ---- evidence from the trainer's log and files --------------------------------------------------

LOG = """\
2026-11-25 16:26:29 | INFO    | job 34[-] r0 rank0 | starting fresh: no checkpoint in /r/main/checkpoints
2026-11-25 16:26:37 | INFO    | job 34[-] r0 rank0 | checkpoint step_00000020 committed (39.9 MB, 3 files)
2026-11-25 16:26:37 | WARNING | job 34[-] r0 rank0 | stopping at step 20 (USR2): checkpoint committed 0.23 s after the request, requeue me
2026-11-25 16:27:04 | INFO    | job 34[-] r1 rank0 | resumed from /r/main/checkpoints/step_00000020 at step 20 (1,280 tokens)
2026-11-25 16:27:16 | WARNING | job 34[-] r1 rank0 | stopping at step 50 (SIGTERM): checkpoint committed 1.5 s after the request, requeue me
2026-11-25 16:27:37 | INFO    | job 34[-] r2 rank0 | resumed from /r/main/checkpoints/step_00000050 at step 50 (3,200 tokens)
"""


def test_log_parsing_matches_the_trainers_lines() -> None:
    assert dr.parse_stops(LOG) == [(20, "USR2", 0.23), (50, "SIGTERM", 1.5)]
    assert dr.parse_resumes(LOG) == [20, 50]
    assert dr.parse_stops("garbage | stopping at step x (") == []


def test_hit_phase() -> None:
    windows = {20: (100.0, 100.5)}  # the save of step 20 ran from t=100.0 to its commit at t=100.5
    assert dr.hit_phase(50, 25, val_logged=False, request_time=None, save_windows={}) == "eval"
    assert dr.hit_phase(50, 25, val_logged=True, request_time=None, save_windows={}) == "train"
    for stop in (20, 21):  # a trainer may look for requests before or after the interval save
        assert dr.hit_phase(stop, 0, False, request_time=100.2, save_windows=windows) == "checkpoint"
        assert dr.hit_phase(stop, 0, False, request_time=99.9, save_windows=windows) == "train"
    assert dr.hit_phase(22, 0, False, request_time=100.2, save_windows=windows) == "train"


def test_observe_reads_where_the_request_landed(tmp_path: Path) -> None:
    """A stop at step 20 whose request came 0.3 s before the commit of the save of step 20."""
    run_dir = tmp_path / "sweep" / "main"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "rank0.log").write_text(LOG.splitlines()[2] + "\n")
    rows = [{"step": s, "loss": 10.0 - s / 10, "restart": 0, "time": 1000.0 + s} for s in range(1, 21)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for step, commit in ((19, 1019.5), (20, 1020.53)):  # 19 is no interval save: ignored
        d = run_dir / "checkpoints" / f"step_{step:08d}"
        d.mkdir(parents=True)
        (d / dr.CHECKPOINT_MANIFEST).write_text("{}")
        os.utime(d / dr.CHECKPOINT_MANIFEST, (commit, commit))
    record.write_state(run_dir, record.RunState(state=record.REQUEUED, restarts=1, preemptions=1))
    run = dr.Run(tmp_path / "sweep", "main", "7", run_dir, run_dir / "checkpoints")
    drill = dr.Drill("x.yaml", [], "d", dr.Slurm(), None, ckpt_interval=20, eval_interval=0)
    it = dr.Interruption(1, "usr2", "checkpoint", 20)
    drill.observe(run, it, before=record.RunState(state=record.RUNNING))
    assert (it.stop_step, it.reason, it.save_s, it.recorded, it.hit, it.note) == (
        20, "USR2", 0.23, "preemption", "checkpoint", "")
    os.utime(run_dir / "checkpoints" / "step_00000020" / dr.CHECKPOINT_MANIFEST, (1020.1, 1020.1))
    drill.observe(run, it, before=record.RunState(state=record.RUNNING))  # request before the save began
    assert it.hit == "train" and "landed in train" in it.note


def test_choose_high_partition() -> None:
    text = ("PartitionName=low Default=YES GraceTime=20 PriorityTier=1 PreemptMode=REQUEUE State=UP\n"
            "PartitionName=high Default=NO PriorityTier=10 PreemptMode=OFF State=UP\n"
            "PartitionName=mid Default=NO PriorityTier=5 PreemptMode=OFF State=UP\n")
    assert dr.choose_high_partition(text, "low") == "high"
    assert dr.choose_high_partition(text, "high") is None  # nothing above it
    assert dr.choose_high_partition(text.replace("REQUEUE", "OFF"), "low") is None  # low cannot be preempted
    assert dr.choose_high_partition(text, "nope") is None


# ---- comparison and report -------------------------------------------------------------------


def curve(n: int, val_at: tuple[int, ...] = (), restart_at: int | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for s in range(1, n + 1):
        restart = int(restart_at is not None and s > restart_at)
        rows.append({"step": s, "loss": 11.0 - 0.01 * s, "restart": restart})
        if s in val_at:
            rows.append({"step": s, "val_loss": 10.5 - 0.01 * s, "restart": restart})
    return rows


def test_compare_exact_and_with_tolerance() -> None:
    ref = curve(50, val_at=(25, 50))
    same = dr.compare(ref, curve(50, val_at=(25, 50), restart_at=20))
    assert same.ok and same.steps == 50 and same.max_diff == 0.0 and same.val_steps == 2
    nudged = curve(50, val_at=(25, 50))
    nudged[30]["loss"] = math.nextafter(nudged[30]["loss"], math.inf)  # one ulp
    cmp = dr.compare(ref, nudged)
    assert not cmp.ok and cmp.mismatched == [nudged[30]["step"]] and cmp.worst_step == nudged[30]["step"]
    assert dr.compare(ref, nudged, atol=1e-6).ok


def test_compare_finds_lost_replayed_and_skipped_work() -> None:
    ref = curve(30, val_at=(10, 20))
    lost = [r for r in curve(30, val_at=(10, 20)) if r["step"] != 12]
    assert dr.compare(ref, lost).missing == [12]
    replayed = curve(15) + [r for r in curve(30, val_at=(10, 20)) if r["step"] > 12]  # back to 12
    cmp = dr.compare(ref, replayed)
    assert cmp.replayed == [13, 14, 15] and not cmp.ok
    cut = [r for r in curve(30, val_at=(10, 20)) if not (r["step"] == 20 and "val_loss" in r)]
    cmp = dr.compare(ref, cut)
    assert cmp.ok and cmp.val_missing == [20]  # an eval cut short by a stop is reported, not a mismatch
    nan = curve(30)
    nan[4]["loss"] = float("nan")
    assert dr.compare(ref, nan).mismatched == [5]


def test_table_and_verdict() -> None:
    items = [dr.Interruption(1, "preempt", "checkpoint", 20, fired_step=20, stop_step=20, reason="USR2",
                             save_s=0.23, hit="checkpoint", recorded="preemption", resumed=20),
             dr.Interruption(2, "usr2", "eval", 50, fired_step=49, stop_step=50, reason="USR2", save_s=0.93,
                             hit="train", recorded="preemption", resumed=49,
                             note="aimed at eval, the request landed in train")]
    table = dr.format_table(items).splitlines()
    assert table[0].split() == ["#", "KIND", "AIMED", "AT", "TARGET", "FIRED", "AT", "STOPPED", "AT", "HIT",
                                "SAVE", "S", "RECORDED", "AS", "RESUMED", "AT"]
    assert table[1].split() == ["1", "preempt", "checkpoint", "20", "20", "20", "checkpoint", "0.23",
                                "preemption", "20"]
    assert table[3].strip() == "2: aimed at eval, the request landed in train"
    ref = curve(60, val_at=(25, 50))
    summary = dr.format_summary(items, dr.compare(ref, ref), atol=0.0)
    assert "MISMATCH: interruption 2: stopped and saved at step 50 but resumed at 49" in summary
    assert summary.splitlines()[-1] == "FAIL"
    items[1].resumed = 50
    summary = dr.format_summary(items, dr.compare(ref, ref), atol=0.0)
    assert summary.splitlines()[0] == "train loss: 60 steps compared, largest |difference| 0, tolerance 0"
    assert summary.splitlines()[-1].startswith("PASS")


def test_bad_input_is_exit_2_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exp = tmp_path / "two.yaml"
    exp.write_text("cluster: local\noverrides: {model: tiny}\nsweep: {grid: {trainer.config.lr: [1.0e-3, 2.0e-3]}}\n")
    assert dr.main([str(exp)]) == 2
    assert "expands into 2 jobs" in capsys.readouterr().err
    assert dr.main([str(exp), "trainer.config.lr=1e-3", "-k", "0"]) == 2
    assert dr.main([str(exp), "--kinds", "usr2,sigkill"]) == 2
    assert "--kinds" in capsys.readouterr().err


# ---- one real drill ------------------------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.slow
def test_real_drill_on_the_local_cluster(tmp_path: Path, pydoc_shards: Path) -> None:
    """Two interruptions, one of each kind, aimed at a checkpoint write and an eval; exit 0 only
    when the interrupted run matches the reference step for step."""
    from slurm_util import cancel, require_slurm

    require_slurm()
    overrides = {
        "model": "tiny", "model.config.n_layer": 2, "model.config.n_embd": 64, "model.config.n_head": 2,
        "model.config.block_size": 64, "dataset.seq_len": 32, "trainer.config.batch_size": 2,
        "trainer.config.warmup_steps": 5, "trainer.config.max_steps": 60, "trainer.config.eval_interval": 25,
        "trainer.config.checkpoint_strategy.config.interval": 20,
        "trainer.config.eval_steps": 30,  # an eval long enough for the preemption to arrive during it
        "wandb.mode": "disabled", "dataset.train_dataset.data_root": str(pydoc_shards),
        "dataset.val_dataset.data_root": str(pydoc_shards),
    }
    exp = tmp_path / "drilled.yaml"
    # all 4 CPUs of a node: the preempting job (which takes whole nodes) preempts nothing else
    exp.write_text(yaml.safe_dump({"cluster": "local", "executor": "slurm", "overrides": overrides,
                                   "resources": {"time": 20, "cpus_per_task": 4}}, sort_keys=False))
    runs = tmp_path / "runs"
    env = {**os.environ, "RUNS_DIR": str(runs), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "launch" / "drill.py"), str(exp), "-k", "2", "--seed", "1",
                               "--name", "drill", "--timeout", "600"],
                              cwd=ROOT, env=env, text=True, capture_output=True, timeout=1200)
        out = proc.stdout
        assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{proc.stderr}"
        lines = out.splitlines()
        head = next(i for i, line in enumerate(lines) if line.startswith("#  KIND"))
        rows = [line.split() for line in lines[head + 1:head + 3]]
        assert sorted(r[1] for r in rows) == ["preempt", "usr2"] and sorted(r[2] for r in rows) == ["checkpoint", "eval"]
        for r in rows:
            assert r[5] == r[9], f"stopped at {r[5]} but resumed at {r[9]}"
        assert "train loss: 60 steps compared, largest |difference| 0, tolerance 0" in out
        assert lines[-1].startswith("PASS")
        st = record.read_state(runs / "drill" / "main")
        assert st is not None and st.state == record.COMPLETED and st.restarts == 2, st
    finally:  # the drill cleans up after itself; this is for a drill that crashed
        ids = []
        for m in runs.glob(f"*/{record.RECORD}"):
            subprocess.run([sys.executable, str(ROOT / "launch" / "sweep.py"), "cancel", str(m.parent)],
                           cwd=ROOT, env=env, capture_output=True, timeout=120)
            ids += [r.job_id for r in record.SweepRecord(m.parent).read().values() if r.job_id]
        for _ in range(3 if ids else 0):  # a job that requeued itself anyway is cancelled while it waits
            cancel(ids)
            time.sleep(2)
