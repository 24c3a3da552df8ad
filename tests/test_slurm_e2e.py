"""End to end on the local SLURM cluster, everything through `launch/sweep.py --executor slurm`.

What each test proves (issue 7):

1. a 2-job sweep runs as one array to COMPLETED; sweep record, `status`, `logs`, checkpoints and
   metrics agree, and submitting the sweep again submits nothing; its first launcher is killed
   between sbatch and the record, and the next submission adopts the array (launch/intent.py);
2. a 2-node job (one task per node) trains with DDP over gloo, and its per-step losses equal a
   2-process run on one machine (so the ranks really averaged their gradients);
3. a real time-out: a job with a 1-minute limit gets SLURM's USR2 while training, saves,
   requeues itself and resumes at the step it saved; per-step losses equal an uninterrupted local
   run of the same config (both are cancelled a few steps after the resume: 4. runs to the end);
4. real preemption: a job sent to the `high` partition preempts a training job, which saves
   within GraceTime, requeues, resumes at the step it saved and finishes with the same losses;
5. `cancel` stops a job for good (saved, not requeued), and `resubmit --failed` brings back a
   job killed with SIGKILL from its last periodic checkpoint, leaving the cancelled one alone;
   the steps it recomputes reproduce the losses it had logged before the kill;
6. a dead node (issue 13): n2 set DOWN under a 2-node job; SLURM requeues it (NODE_FAIL, no signal),
   `status` never says FAILED while it waits, the node comes back, the job resumes from its last
   checkpoint with the losses of an uninterrupted run, and the failure is counted and blamed;
7. exclusion: a node blamed twice is excluded from the sweep's submission (sbatch --exclude) and
   from a requeue (scontrol update ExcNodeList), and the job runs on the other node.

References run with the local executor in the background while the SLURM jobs run. Every job a
test submits is cancelled when the test ends, passed or not. OMP_NUM_THREADS=1 everywhere, so
losses can be compared bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from slurm_runs import (
    DRILL,
    LONG,
    PAIR,
    ROOT,
    SHORT,
    WAIT_S,
    Launcher,
    LocalReference,
    assert_resumed_exactly,
    diagnostics,
    job_id,
    kill_ranks,
    last_step,
    losses,
    rank0_log,
    ref_job,
    resumes,
    rows,
    sacct_attempts,
    stops,
    wait_for_requeue,
    wait_for_run,
    wait_for_sacct,
    wait_for_status,
    wait_for_step,
    write_experiment,
)
from slurm_util import bring_back, job_info, require_slurm, run, sbatch, start_now

from launch import intent, record

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def data(pydoc_shards: Path) -> Path:
    require_slurm()
    return pydoc_shards


@pytest.fixture
def launcher(tmp_path: Path, data: Path) -> Iterator[Launcher]:
    """A runs root for this test; every SLURM job found in its sweep records is cancelled afterwards."""
    lc = Launcher(tmp_path / "runs", data)
    try:
        yield lc
    finally:
        lc.cleanup()


# ---- uninterrupted references, with the local executor ----------------------------------------


def _reference(tmp_path_factory: pytest.TempPathFactory, data: Path, name: str, overrides: dict[str, Any],
               resources: dict[str, Any], points: list[dict[str, Any]] | None = None) -> Iterator[LocalReference]:
    tmp = tmp_path_factory.mktemp(name)
    lc = Launcher(tmp / "runs", data)
    ref = LocalReference(lc, write_experiment(tmp / f"{name}.yaml", lc.overrides(overrides), resources, points=points))
    try:
        yield ref
    finally:
        ref.stop()


@pytest.fixture(scope="module")
def reference_w1(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[LocalReference]:
    """World size 1, job SHORT (named by `ref_job`). Started on first use, it trains on the spare
    core while the SLURM test that asked for it waits on the cluster."""
    yield from _reference(tmp_path_factory, data, "ref-w1", {}, {"tasks_per_node": 1}, points=[SHORT])


@pytest.fixture
def reference_long(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[LocalReference]:
    """World size 1, job "main" with LONG; cancelled when the test that asked for it ends."""
    yield from _reference(tmp_path_factory, data, "ref-long", LONG, {"tasks_per_node": 1})


@pytest.fixture(scope="module")
def reference_w2(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[LocalReference]:
    """World size 2 (two processes on this machine), job "main" with PAIR."""
    yield from _reference(tmp_path_factory, data, "ref-w2", PAIR, {"tasks_per_node": 2})


@pytest.fixture(scope="module")
def reference_w2_drill(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[LocalReference]:
    """World size 2, job "main" with DRILL: the node-failure drill's uninterrupted twin."""
    yield from _reference(tmp_path_factory, data, "ref-w2-drill", DRILL, {"tasks_per_node": 2})


# ---- 1. a sweep ----------------------------------------------------------------------------------


def test_two_job_sweep_completes_and_is_recorded(launcher: Launcher, tmp_path: Path) -> None:
    exp = write_experiment(tmp_path / "pair_sweep.yaml", launcher.overrides(PAIR), {"tasks_per_node": 1},
                           grid={"trainer.config.lr": [1.0e-3, 2.0e-3]})
    # the first launcher dies once sbatch has accepted the array, before the record names it
    killed = subprocess.run([sys.executable, "launch/sweep.py", str(exp)], cwd=ROOT, text=True, capture_output=True,
                            env={**launcher.env, intent.EXIT_AFTER_SUBMIT: "1"}, timeout=300)
    sweep = tmp_path / "runs" / exp.stem
    assert killed.returncode == 9 and (sweep / intent.INTENT).is_file(), killed.stdout + killed.stderr
    token = intent.read(sweep)[0].token
    tagged = run(["squeue", "-h", "-r", "-n", exp.stem, "-o", "%i %k"]).splitlines()
    assert [t.split()[1] for t in tagged] == [f"gpt2-submission:{token}:0"] * 2, tagged
    adopting = launcher.sweep_py(str(exp))  # the next submission adopts them instead of submitting again
    assert "adopted them (lr=0.001, lr=0.002)" in adopting.stderr, adopting.stdout + adopting.stderr
    names = ["lr=0.001", "lr=0.002"]
    ids = [job_id(sweep, n) for n in names]
    assert sorted(ids) == sorted(t.split()[0] for t in tagged)  # the jobs the dead launcher submitted, once
    assert len({i.split("_")[0] for i in ids}) == 1, f"not one array: {ids}"
    for name in names:
        wait_for_run(sweep, name, {record.COMPLETED})

    status = launcher.status(sweep)
    table = launcher.sweep_py("status", str(sweep)).stdout
    assert "2 COMPLETED" in table.splitlines()[0], table
    recs = record.SweepRecord(sweep).read()
    for name in names:
        assert status[name]["state"] == recs[name].state == record.COMPLETED
        assert status[name]["last_step"] == 10 and status[name]["restarts"] == 0
        assert status[name]["checkpoint"] == "step_00000010"
        run_dir = sweep / name
        assert sorted(losses(run_dir)) == list(range(1, 11))
        assert (run_dir / "checkpoints" / "step_00000010" / "MANIFEST.json").is_file()
        assert (run_dir / "checkpoints" / "step_00000005" / "MANIFEST.json").is_file()
        assert (run_dir / "config.yaml").is_file()
    assert losses(sweep / names[0]) != losses(sweep / names[1])  # the axis reached the trainer
    for i in ids:
        assert wait_for_sacct(i, "COMPLETED")[-1]["id"] == i

    assert "done at step 10" in launcher.sweep_py("logs", str(sweep), "0", "--err", "-n", "0").stdout
    again = launcher.sweep_py(str(exp)).stdout
    assert "nothing to submit" in again and "2 COMPLETED" in again, again
    assert all(r.submissions == 1 for r in record.SweepRecord(sweep).read().values())


# ---- 2. two nodes ----------------------------------------------------------------------------


def test_two_node_job_trains_ddp_over_gloo(launcher: Launcher, tmp_path: Path,
                                           reference_w2: LocalReference) -> None:
    exp = write_experiment(tmp_path / "two_nodes.yaml", launcher.overrides(PAIR),
                           {"nodes": 2, "tasks_per_node": 1})
    sweep = launcher.submit(exp)
    jid = job_id(sweep, "main")
    wait_for_run(sweep, "main", {record.COMPLETED})

    attempt = wait_for_sacct(jid, "COMPLETED")[-1]
    assert attempt["nnodes"] == "2" and attempt["nodes"] == "n[1-2]", attempt
    run_dir = sweep / "main"
    manifest = json.loads((run_dir / "checkpoints" / "step_00000010" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == "ddp"
    assert (run_dir / "logs" / "rank1.log").is_file()
    assert sorted(p.name for p in (sweep / "logs" / jid).glob("*_log.out")) == [f"{jid}_0_log.out", f"{jid}_1_log.out"]
    assert "world 2" in rank0_log(run_dir)
    # Two ranks that did not average gradients would drift apart from a real 2-process run.
    assert losses(run_dir) == reference_w2.losses("main")


# ---- 3. time-out --------------------------------------------------------------------------------
AFTER = 20  # steps the time-out test lets the resumed attempt train before it cancels it


def test_time_out_saves_requeues_and_resumes_exactly(launcher: Launcher, tmp_path: Path,
                                                     reference_long: LocalReference) -> None:
    """`--time=1` and USR2 20 s before the limit. slurmctld checks time limits every 30 s and sends
    the warning up to 30 s early, so it arrives 10-40 s after the start: LONG still trains then.

    Once a stop during training has been seen, the requeued job gets a longer limit, so the rest
    of the run is one attempt instead of one per minute; `cancel` ends it AFTER steps past the
    resume, and the comparison stops at its last step (running to LONG's end would only repeat what the
    preemption test shows, at a minute of CPU for each of the two runs).
    """
    exp = write_experiment(tmp_path / "timeout.yaml", launcher.overrides(LONG),
                           {"tasks_per_node": 1, "time": 1, "signal_lead_s": 20, "max_timeouts": 5})
    sweep = launcher.submit(exp)
    run_dir = sweep / "main"
    jid = job_id(sweep, "main")
    assert job_info(jid).get("TimeLimit") == "00:01:00"

    deadline = time.monotonic() + WAIT_S
    while True:  # each requeue: release it; after a stop in training, also lift the limit
        st = record.read_state(run_dir)
        if st is not None and st.state in record.FINAL:
            pytest.fail(f"ended {st.state} before a time-out stopped training: raise LONG's max_steps\n"
                        f"{diagnostics(sweep, 'main')}")
        info = job_info(jid)
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            trained = bool(stops(run_dir))
            start_now(jid, *(["TimeLimit=10"] if trained else []))
            if trained:
                break
        assert time.monotonic() < deadline, f"no time-out after {WAIT_S:.0f} s\n{diagnostics(sweep, 'main')}"
        time.sleep(0.3)
    stop_step, reason, save_s = stops(run_dir)[0]
    wait_for_step(sweep, "main", stop_step + AFTER)
    launcher.sweep_py("cancel", str(sweep))
    wait_for_run(sweep, "main", {record.CANCELLED})

    assert reason == "USR2" and save_s < 20, stops(run_dir)  # saved well before SLURM's kill
    assert f"checkpoint step_{stop_step:08d} committed" in rank0_log(run_dir)
    assert_resumed_exactly(run_dir, stop_step)
    st = record.read_state(run_dir)
    assert st is not None and st.restarts >= 1 and st.timeouts + st.preemptions == st.restarts, st
    rec = launcher.status(sweep)["main"]
    assert rec["state"] == record.CANCELLED and rec["restarts"] == st.restarts, rec
    attempts = wait_for_sacct(jid, "CANCELLED")
    assert len(attempts) >= 2 and attempts[0]["state"] == "REQUEUED" and attempts[0]["timelimit"] == "00:01:00", attempts
    got = losses(run_dir)
    assert max(got) >= stop_step + AFTER and got == reference_long.losses_through("main", max(got))


# ---- 4. preemption ------------------------------------------------------------------------------


def test_preemption_saves_within_grace_time_and_resumes_exactly(launcher: Launcher, tmp_path: Path,
                                                                reference_w1: LocalReference) -> None:
    """The training job holds all 4 CPUs of its node, so a 1-CPU job in `high` on that node can
    only start by preempting it (and nothing else)."""
    exp = write_experiment(tmp_path / "preempt.yaml", launcher.overrides(SHORT),
                           {"tasks_per_node": 1, "cpus_per_task": 4})
    sweep = launcher.submit(exp)
    run_dir = sweep / "main"
    jid = job_id(sweep, "main")
    wait_for_step(sweep, "main", 5)
    node = job_info(jid)["NodeList"]
    blocker = sbatch(["-p", "high", "-w", node, "-n1", "--mem=64M", "--time=1", "--job-name=e2e-blocker",
                      "--output=/dev/null"], script="#!/bin/bash\nsleep 3\n", cwd=tmp_path)
    launcher.extra_ids.append(blocker)

    wait_for_requeue(jid)
    st = record.read_state(run_dir)
    assert st is not None and st.state == record.REQUEUED and st.preemptions == 1 and st.timeouts == 0, st
    rec = launcher.status(sweep)["main"]
    assert (rec["state"], rec["restarts"]) == (record.REQUEUED, 1), rec  # what a user sees while it waits
    start_now(jid)
    wait_for_run(sweep, "main", {record.COMPLETED})

    [(stop_step, reason, save_s)] = stops(run_dir)
    assert reason == "USR2" and save_s < 20, (reason, save_s)  # GraceTime=20 before SIGTERM
    assert_resumed_exactly(run_dir, stop_step)
    assert launcher.status(sweep)["main"]["state"] == record.COMPLETED
    attempts = wait_for_sacct(jid, "COMPLETED")
    assert attempts[0]["state"] in ("PREEMPTED", "REQUEUED"), attempts
    assert wait_for_sacct(blocker, "COMPLETED")[-1]["nodes"] == node
    assert losses(run_dir) == reference_w1.losses(ref_job(SHORT))


# ---- 5. cancel and resubmit --------------------------------------------------------------------


def test_cancel_then_resubmit_failed(launcher: Launcher, tmp_path: Path,
                                     reference_w1: LocalReference) -> None:
    exp = write_experiment(tmp_path / "ops.yaml", launcher.overrides(SHORT), {"tasks_per_node": 1},
                           grid={"trainer.config.lr": [1.0e-3, 2.0e-3]})
    sweep = launcher.submit(exp)
    killed, cancelled = "lr=0.001", "lr=0.002"  # `killed` has SHORT's exact config
    kid, cid = job_id(sweep, killed), job_id(sweep, cancelled)
    wait_for_step(sweep, killed, 25)  # past the checkpoint at step 20
    wait_for_step(sweep, cancelled, 3)

    out = launcher.sweep_py("cancel", str(sweep), cancelled).stdout
    assert f"cancelled 1 job(s) of {sweep}: {cancelled}" in out, out
    kill_ranks(kid)  # no save, no requeue: like the OOM killer or a node failure
    wait_for_sacct(kid, "FAILED")
    wait_for_sacct(cid, "CANCELLED")
    killed_at = last_step(sweep / killed)
    ckpt = record.latest_checkpoint(sweep / killed / "checkpoints")
    assert ckpt is not None
    ckpt_step = int(ckpt.split("_")[1])

    status = wait_for_status(launcher, sweep, killed, record.FAILED)  # SLURM lists it COMPLETING for a moment
    assert status[cancelled]["state"] == record.CANCELLED, status
    # cancel let the job save (SIGTERM) and did not requeue it
    [(c_step, c_reason, _)] = stops(sweep / cancelled)
    assert c_reason == "SIGTERM" and record.latest_checkpoint(sweep / cancelled / "checkpoints") == f"step_{c_step:08d}"
    assert len(sacct_attempts(cid)) == 1

    out = launcher.sweep_py("resubmit", str(sweep), "--failed").stdout
    assert "submitted 1 job(s)" in out and "not submitted again: 1 job(s) (1 CANCELLED)" in out, out
    wait_for_run(sweep, killed, {record.COMPLETED})
    records = record.SweepRecord(sweep).read()
    assert records[killed].submissions == 2 and records[killed].job_id != kid
    assert records[cancelled].submissions == 1 and records[cancelled].job_id == cid
    assert launcher.status(sweep)[cancelled]["state"] == record.CANCELLED

    assert resumes(sweep / killed) == [ckpt_step]
    # one row per step (gpt2/metrics_file.py): the steps after the checkpoint that the kill threw
    # away were trained again and replaced; a "discarded" row says which
    train = [r for r in rows(sweep / killed) if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 61))
    discarded = [r["steps"] for r in rows(sweep / killed) if r.get("event") == "discarded"]
    assert discarded == ([[ckpt_step + 1, killed_at]] if killed_at > ckpt_step else []), discarded
    assert losses(sweep / killed) == reference_w1.losses(ref_job(SHORT))


# ---- 6. a dead node ------------------------------------------------------------------------------


def test_dead_node_is_requeued_by_slurm_never_shown_failed_and_resumes(
        launcher: Launcher, tmp_path: Path, reference_w2_drill: LocalReference) -> None:
    exp = write_experiment(tmp_path / "drill.yaml", launcher.overrides(DRILL), {"nodes": 2, "tasks_per_node": 1})
    sweep = launcher.submit(exp)
    run_dir = sweep / "main"
    jid = job_id(sweep, "main")
    wait_for_step(sweep, "main", 25)  # past the checkpoint at step 20
    try:
        run(["scontrol", "update", "nodename=n2", "state=down", "reason=drill"])
        deadline = time.monotonic() + 120
        while job_info(jid).get("JobState") != "PENDING":
            assert time.monotonic() < deadline, f"not requeued: {job_info(jid)}\n{diagnostics(sweep, 'main')}"
            time.sleep(0.3)
        for _ in range(3):  # the survivor's lost connection must never make it FAILED while it waits
            rec = launcher.status(sweep)["main"]
            assert rec["state"] == record.REQUEUED, f"{rec}\n{diagnostics(sweep, 'main')}"
            time.sleep(1)
    finally:
        bring_back("n2")
    deadline = time.monotonic() + WAIT_S
    while (info := job_info(jid)).get("JobState") == "PENDING":
        if info.get("Reason") == "BeginTime":
            start_now(jid)
        assert time.monotonic() < deadline, f"never started again: {info}"
        time.sleep(0.5)
    wait_for_run(sweep, "main", {record.COMPLETED})

    attempts = wait_for_sacct(jid, "COMPLETED")
    assert attempts[0]["state"] == "NODE_FAIL" and attempts[-1]["nnodes"] == "2", attempts
    # from the newest commit: the periodic one at step 20, or the save SLURM's SIGTERM asked for
    [resumed] = resumes(run_dir)
    assert resumed >= 20 and f"checkpoint step_{resumed:08d} committed" in rank0_log(run_dir), resumed
    st = record.read_state(run_dir)
    assert st is not None and st.failures == 1 and st.restarts >= 1, st
    assert st.last_failure["kind"] == "node_fail" and "n2" in st.last_failure["hosts"], st.last_failure
    assert st.last_failure["rule"] == "transient: NODE_FAIL (1/3)"
    assert "n2" in record.read_nodes(sweep) and record.excluded_hosts(sweep) == []
    rec = launcher.status(sweep)["main"]
    assert rec["state"] == record.COMPLETED and rec["failures"] == 1 and "NODE_FAIL" in rec["failure"]
    assert losses(run_dir) == reference_w2_drill.losses("main")


# ---- 7. exclusion of a twice-blamed node ------------------------------------------------------------


def test_twice_blamed_node_is_excluded_from_submission_and_requeue(
        launcher: Launcher, tmp_path: Path, reference_w1: LocalReference) -> None:
    """The blames are written into the sweep's ledger as two failures would; the exclusion itself
    goes through the real sbatch (a new submission) and scontrol (a requeue)."""
    exp = write_experiment(tmp_path / "exclude.yaml", launcher.overrides(SHORT), {"tasks_per_node": 1})
    sweep = launcher.root / "exclude"
    for event in ("a/0", "b/0"):
        record.blame(sweep, event, ["n1"], event[0], "hang", "hang on rank 0 on n1")
    launcher.submit(exp)
    jid = job_id(sweep, "main")
    assert job_info(jid).get("ExcNodeList") == "n1"
    wait_for_step(sweep, "main", 3)
    assert job_info(jid)["NodeList"] == "n2"

    launcher.sweep_py("nodes", str(sweep), "--clear", "n1")
    for event in ("c/0", "d/0"):
        record.blame(sweep, event, ["n2"], event[0], "peer_lost", "peer lost on n2")
    assert "n2" in launcher.sweep_py("nodes", str(sweep)).stdout
    run(["scancel", "--signal=USR2", jid])  # early in the limit: a preemption, requeued by the job
    wait_for_requeue(jid)
    deadline = time.monotonic() + 30  # the job updates ExcNodeList right after its requeue
    while (info := job_info(jid)).get("ExcNodeList") != "n2":
        assert time.monotonic() < deadline, f"{info.get('ExcNodeList')}\n{diagnostics(sweep, 'main')}"
        time.sleep(0.3)
    start_now(jid)
    wait_for_run(sweep, "main", {record.COMPLETED})

    attempts = wait_for_sacct(jid, "COMPLETED")
    assert attempts[0]["nodes"] == "n2" and attempts[-1]["nodes"] == "n1", attempts
    assert losses(sweep / "main") == reference_w1.losses(ref_job(SHORT))
