"""The local SLURM cluster itself (slurm_templates/local-cluster): nodes, partitions, preemption.

These run real jobs on the two simulated nodes; the launcher's own SLURM tests build on what they
check. About a minute in all, most of it the preempted job's GraceTime.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_util import (
    NODES,
    UP_NODE_STATES,
    bring_back,
    cancel,
    release_requeued,
    require_slurm,
    run,
    sbatch,
    wait_for_file_text,
    wait_for_job_state,
)

from launch import slurm

pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def jobs() -> Iterator[list[str]]:
    """Ids of the jobs a test submits; whatever still runs is cancelled when the test ends."""
    require_slurm()
    ids: list[str] = []
    yield ids
    cancel(ids)


def test_both_nodes_answer_in_both_partitions() -> None:
    rows = {tuple(line.split()) for line in run(["sinfo", "-h", "-N", "-o", "%N %P %T"]).splitlines()}
    for node in NODES:
        for partition in ("low*", "high"):
            states = {s for n, p, s in rows if n == node and p == partition}
            assert states and states <= UP_NODE_STATES, f"{node} in {partition}: {states or 'absent'}"


def test_configuration_the_launcher_relies_on() -> None:
    config = {}
    for line in run(["scontrol", "show", "config"]).splitlines():
        key, sep, value = line.partition("=")
        if sep:
            config[key.strip()] = value.strip()
    assert config["PreemptType"] == "preempt/partition_prio"
    assert "preempt_send_user_signal" in config["SlurmctldParameters"]
    assert int(config["MaxArraySize"]) >= 1001
    assert config["RequeueExit"] == "75"  # the toolkit's EXIT_REQUEUE
    low = run(["scontrol", "show", "partition", "low"])
    assert "PreemptMode=REQUEUE" in low and "Default=YES" in low
    assert "GraceTime=0" not in low


def test_a_drained_node_is_out_of_service_and_back_after_resume() -> None:
    """What note_node_failure blames a NODE_FAIL on when no rank reported: the nodes SLURM itself
    has out of service (scontrol's State words), read from the real controller."""
    assert slurm.out_of_service(list(NODES)) == []
    slurm.set_node_state("n2", "DRAIN", reason="gpt2-test")
    try:
        assert "DRAIN" in slurm.node_state("n2")
        assert slurm.out_of_service([*NODES, "no-such-node"]) == ["n2"]
    finally:
        slurm.set_node_state("n2", "RESUME")
        bring_back("n2")
    assert slurm.out_of_service(list(NODES)) == []


def test_sacct_reports_a_finished_job(tmp_path: Path, jobs: list[str]) -> None:
    if "accounting_storage/none" in run(["scontrol", "show", "config"]):
        pytest.skip("the cluster runs without accounting (GPT2_SLURM_ACCOUNTING=0)")
    job = sbatch(["--job-name=test-sacct", "--output=/dev/null"], script="#!/bin/bash\ntrue\n", cwd=tmp_path)
    jobs.append(job)
    wait_for_job_state(job, "COMPLETED", timeout=60)
    deadline = time.monotonic() + 20  # slurmctld sends the record to slurmdbd shortly after
    while (states := run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job]).split()) != ["COMPLETED"]:
        assert time.monotonic() < deadline, f"sacct says {states} for job {job}"
        time.sleep(0.5)


def test_job_that_exits_75_is_requeued_and_runs_again(tmp_path: Path, jobs: list[str]) -> None:
    out = tmp_path / "out.txt"
    job = sbatch(
        ["--job-name=test-exit75", f"--output={out}", "--open-mode=append"],
        script='#!/bin/bash\necho "run ${SLURM_RESTART_COUNT:-0}"\n[[ -n $SLURM_RESTART_COUNT ]] || exit 75\n',
        cwd=tmp_path,
    )
    jobs.append(job)
    release_requeued(job, timeout=60)
    info = wait_for_job_state(job, "COMPLETED", timeout=60)
    assert info["Restarts"] == "1"
    assert [line for line in out.read_text().splitlines() if line.startswith("run")] == ["run 0", "run 1"]


@pytest.mark.parametrize("partition", ["low", "high"])
def test_batch_job_runs_and_writes_its_output(partition: str, tmp_path: Path, jobs: list[str]) -> None:
    out = tmp_path / "out.txt"
    job = sbatch(
        [f"--partition={partition}", f"--job-name=test-{partition}", f"--output={out}"],
        script='#!/bin/bash\necho "$SLURM_JOB_PARTITION $SLURMD_NODENAME"\n',
        cwd=tmp_path,
    )
    jobs.append(job)
    wait_for_job_state(job, "COMPLETED", timeout=60)
    partition_seen, node = wait_for_file_text(out, "\n", timeout=10).split()
    assert partition_seen == partition
    assert node in NODES


def test_two_node_job_runs_a_step_on_each_node(tmp_path: Path, jobs: list[str]) -> None:
    out = tmp_path / "out.txt"
    job = sbatch(
        ["--nodes=2", "--ntasks-per-node=1", "--job-name=test-2nodes", f"--output={out}"],
        script="#!/bin/bash\nsrun bash -c 'echo step $SLURMD_NODENAME $(hostname)'\n",
        cwd=tmp_path,
    )
    jobs.append(job)
    info = wait_for_job_state(job, "COMPLETED", timeout=60)
    assert info["NodeList"] == "n[1-2]"
    steps = sorted(line.split()[1] for line in out.read_text().splitlines() if line.startswith("step "))
    assert steps == ["n1", "n2"]


# A job in `low` that notes each start and signal in a marker file. Asked for USR2 (like submitit),
# it gets USR2 as soon as a `high` job preempts it. In "requeue" mode it then requeues itself, as the
# toolkit's job entry does after saving; in "grace" mode it keeps running until Slurm ends the grace
# time with SIGTERM and requeues it. Its second run (SLURM_RESTART_COUNT=1) just finishes.
LOW_JOB = """#!/bin/bash
marker={marker}
echo "start ${{SLURM_RESTART_COUNT:-0}} $SLURMD_NODENAME $(date +%s)" >> $marker
if [[ ${{SLURM_RESTART_COUNT:-0}} -ge 1 ]]; then echo done >> $marker; exit 0; fi
on_usr2() {{
  echo "USR2 $(date +%s)" >> $marker
  if [[ {mode} == requeue ]]; then scontrol requeue $SLURM_JOB_ID; exit 0; fi
}}
trap on_usr2 USR2
trap 'echo "TERM $(date +%s)" >> $marker; exit 0' TERM
echo ready >> $marker
while :; do sleep 1 & wait $!; done
"""


def _preempt_and_restart(mode: str, node: str, tmp_path: Path, jobs: list[str]) -> list[str]:
    """Run LOW_JOB on `node`, preempt it from `high`, release its requeue; return the marker lines."""
    marker = tmp_path / "marker"
    low = sbatch(
        [
            "--partition=low",
            f"--nodelist={node}",
            "--exclusive",
            "--signal=B:USR2@10",
            "--open-mode=append",
            f"--job-name=test-preempt-{mode}",
            f"--output={tmp_path / 'low.out'}",
        ],
        script=LOW_JOB.format(marker=marker, mode=mode),
        cwd=tmp_path,
    )
    jobs.append(low)
    wait_for_job_state(low, "RUNNING", timeout=60)
    wait_for_file_text(marker, "ready", timeout=30)

    high = sbatch(
        ["--partition=high", f"--nodelist={node}", "--job-name=test-preempter", "--output=/dev/null"],
        script="#!/bin/bash\nsleep 1\n",
    )
    jobs.append(high)
    wait_for_file_text(marker, "USR2", timeout=30)
    release_requeued(low, timeout=60)  # in grace mode this waits out the GraceTime
    wait_for_job_state(high, "COMPLETED", timeout=60)
    info = wait_for_job_state(low, "COMPLETED", timeout=60)
    assert info["Restarts"] == "1"
    return wait_for_file_text(marker, "done", timeout=10).splitlines()


def test_preempted_job_requeues_itself_and_runs_again(tmp_path: Path, jobs: list[str]) -> None:
    lines = _preempt_and_restart("requeue", "n1", tmp_path, jobs)
    assert [line.split()[0] for line in lines] == ["start", "ready", "USR2", "start", "done"]
    assert lines[3].split()[1:3] == ["1", "n1"]  # SLURM_RESTART_COUNT=1, same node


def test_preempted_job_is_requeued_by_slurm_after_grace_time(tmp_path: Path, jobs: list[str]) -> None:
    lines = _preempt_and_restart("grace", "n2", tmp_path, jobs)
    assert [line.split()[0] for line in lines] == ["start", "ready", "USR2", "TERM", "start", "done"]
    assert lines[4].split()[1] == "1"
    grace = int(run(["scontrol", "show", "partition", "low"]).split("GraceTime=")[1].split()[0])
    usr2, term = int(lines[2].split()[1]), int(lines[3].split()[1])
    assert term - usr2 >= grace - 2, f"SIGTERM came {term - usr2}s after USR2; GraceTime is {grace}s"
