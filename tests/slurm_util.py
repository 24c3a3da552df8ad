"""Helpers for tests that talk to the local SLURM cluster (`make slurm-up`).

The cluster: nodes n1 and n2 on this machine, partitions `low` (default, preemptible, requeued on
preemption) and `high`. Tests that need it call `require_slurm()` first: it returns when both nodes
answer, and otherwise skips the test, or fails it when CI=true, because CI always brings the
cluster up and a missing one there is a broken set-up, not a reason to skip.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

NODES = ("n1", "n2")
# Job states after which a job never runs again by itself.
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
# Node states of a node that answers, with or without jobs on it.
UP_NODE_STATES = {"idle", "mixed", "allocated", "completing"}


def run(cmd: list[str], timeout: float = 30) -> str:
    """Run a Slurm command; return its stdout, or raise with its stderr in the message."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@functools.cache
def cluster_problem() -> str | None:
    """Why the local cluster cannot run jobs, or None when both nodes answer.

    Asked once per test session: with no controller, sinfo takes about 10 s to give up.
    """
    if shutil.which("sinfo") is None:
        return "Slurm is not installed"
    try:
        out = run(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=15)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed ({exc})"
    states = dict(line.split() for line in out.splitlines() if line.strip())
    missing = [n for n in NODES if states.get(n) not in UP_NODE_STATES]
    if missing:
        return "nodes not up: " + ", ".join(f"{n}={states.get(n, 'absent')}" for n in missing)
    return None


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"true", "1"}


def require_slurm() -> None:
    """Return when the local cluster is up; otherwise skip the test, or fail it under CI=true."""
    problem = cluster_problem()
    if problem is None:
        return
    reason = f"needs the local SLURM cluster: {problem}; run `make slurm-up`"
    if in_ci():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def sbatch(args: Iterable[str], script: str | None = None, cwd: Path | None = None) -> str:
    """Submit a job (`script` is the batch script's text; else pass --wrap in args); return its id."""
    cmd = ["sbatch", "--parsable", *args]
    proc = subprocess.run(cmd, input=script, capture_output=True, text=True, cwd=cwd, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict (JobState, Reason, Restarts, NodeList, ...); {} once purged."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
    )
    if proc.returncode != 0:
        return {}
    info = {}
    for field in proc.stdout.split():
        key, sep, value = field.partition("=")
        if sep and key not in info:
            info[key] = value
    return info


def wait_for_job_state(job_id: str, states: str | Iterable[str], timeout: float = 60) -> dict[str, str]:
    """Poll until the job is in one of `states` (e.g. "RUNNING"); return its `job_info`.

    Fails at once when the job reaches a final state that was not asked for, and after `timeout`
    seconds otherwise; the message carries the job's last state and reason.
    """
    wanted = {states} if isinstance(states, str) else set(states)
    deadline = time.monotonic() + timeout
    info: dict[str, str] = {}
    while True:
        info = job_info(job_id)
        state = info.get("JobState", "")
        if state in wanted:
            return info
        if state in FINAL_STATES:
            pytest.fail(f"job {job_id} ended {state} (reason {info.get('Reason')}), wanted {sorted(wanted)}")
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} still {state or 'unknown'} (reason {info.get('Reason')}) after {timeout:.0f}s, "
                f"wanted {sorted(wanted)}"
            )
        time.sleep(0.5)


# A requeued job started (StartTime=now) within the second SLURM requeued it can get a credential of
# that same second, which its node still holds as revoked: "Killing non-startable batch JobId=N:
# Job credential revoked", and the job ends FAILED (seen when the stop and its requeue took 0.2 s).
# launch/drill.py waits the same (RELEASE_AFTER_S).
REQUEUE_SETTLE_S = 2.0


def start_now(job_id: str, *fields: str) -> None:
    """Move a requeued job's start time to now (plus any `scontrol update` fields), once the
    requeue has settled (REQUEUE_SETTLE_S)."""
    time.sleep(REQUEUE_SETTLE_S)
    run(["scontrol", "update", f"jobid={job_id}", "StartTime=now", *fields])


def release_requeued(job_id: str, timeout: float = 60) -> None:
    """Let a requeued job start now instead of after the requeue delay (AuthInfo cred_expire).

    Waits for the job to be back in the queue (PENDING, reason BeginTime), then moves its start
    time to now; returns at once if it already runs again after a restart.
    """
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(job_id)
        state, reason = info.get("JobState", ""), info.get("Reason", "")
        if state == "PENDING" and reason == "BeginTime":
            start_now(job_id)
            return
        if state in {"RUNNING", "COMPLETED"} and info.get("Restarts", "0") != "0":
            return
        if state in FINAL_STATES:
            pytest.fail(f"job {job_id} ended {state} (reason {reason}) instead of being requeued")
        if time.monotonic() > deadline:
            pytest.fail(
                f"job {job_id} still {state or 'unknown'} (reason {reason}) after {timeout:.0f}s, not requeued"
            )
        time.sleep(0.5)


def wait_for_file_text(path: Path, text: str, timeout: float = 60) -> str:
    """Poll until `text` appears in the file a job writes; return the file's content."""
    deadline = time.monotonic() + timeout
    while True:
        content = path.read_text() if path.exists() else ""
        if text in content:
            return content
        if time.monotonic() > deadline:
            pytest.fail(f"{path} has no {text!r} after {timeout:.0f}s; it holds {content!r}")
        time.sleep(0.2)


def cancel(job_ids: Iterable[str]) -> None:
    """Cancel jobs, ignoring ones that already ended."""
    ids = list(job_ids)
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


CLUSTER_SCRIPTS = Path(__file__).resolve().parent.parent / "slurm_templates" / "local-cluster"


def node_state(node: str) -> str:
    """The node's state as sinfo prints it ("idle", "down", "idle*", ...)."""
    out = run(["sinfo", "-h", "-N", "-n", node, "-o", "%T"])
    return (out.split() or [""])[0]


def wait_node_up(node: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node_state(node) in UP_NODE_STATES:
            return True
        time.sleep(0.5)
    return False


def bring_back(node: str, timeout: float = 90) -> None:
    """Return a node set DOWN to service. Slurm 22.05 may refuse `state=resume` for a DOWN node
    that had a job on it; it comes back when its slurmd registers again, so restart that slurmd
    (its pid file is the cluster scripts'; up.sh starts the daemons that are missing)."""
    try:
        run(["scontrol", "update", f"nodename={node}", "state=resume"])
    except RuntimeError:
        pass
    if wait_node_up(node, 15):
        return
    slurm_dir = Path(os.environ.get("GPT2_SLURM_DIR", "/var/lib/gpt2-slurm"))
    pid_file = slurm_dir / "run" / f"slurmd-{node}.pid"
    if pid_file.is_file():
        pid = int(pid_file.read_text().strip())
        subprocess.run(["kill", "-TERM", str(pid)], capture_output=True, timeout=10)
        deadline = time.monotonic() + 15
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    subprocess.run(["bash", str(CLUSTER_SCRIPTS / "up.sh")], capture_output=True, text=True, timeout=timeout)
    if not wait_node_up(node, timeout):
        pytest.fail(f"node {node} still {node_state(node)} after restarting its slurmd")
