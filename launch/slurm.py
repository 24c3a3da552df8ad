"""The one seam through which launcher code runs SLURM commands.

Every command goes through `run_cmd(argv, timeout) -> stdout`, which raises `CommandError` (a
UserError, one line: the command, its exit status and its last line of output) when the command
fails, hangs past `timeout` or is not installed. Tests fake the cluster by replacing `run_cmd`;
the wrappers below hold the exact argv of each command and parse its output, nothing more.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

from gpt2.errors import UserError


class CommandError(UserError):
    """A cluster command failed, timed out or is missing; str() is one line."""


def run_cmd(argv: Sequence[str], timeout: float = 60.0) -> str:
    """Run `argv` and return its stdout; CommandError when it is missing, times out or fails."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise CommandError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"{' '.join(argv[:3])}: no answer after {timeout:.0f} s") from None
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise CommandError(f"{' '.join(argv[:3])}: exit {res.returncode}: {err[-1] if err else 'no output'}")
    return res.stdout


def parse_kv(text: str) -> dict[str, str]:
    """One record of `scontrol show ... -o` (`Key=Value Key=Value ...`) as a dict; the first
    occurrence of a key wins. Values with spaces are not split correctly (none we read has one)."""
    out: dict[str, str] = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


# ---- used by the drill ----


def show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (JobState, Reason, NodeList, NumNodes, ...); empty when
    SLURM no longer knows the job (purged from the controller's memory) or cannot be asked."""
    try:
        return parse_kv(run_cmd(["scontrol", "show", "job", "-o", job_id], timeout=30))
    except CommandError:
        return {}


def show_partitions() -> list[dict[str, str]]:
    """`scontrol show partition -o`: one dict per partition (PartitionName, PriorityTier, ...)."""
    out = run_cmd(["scontrol", "show", "partition", "-o"], timeout=30)
    return [parse_kv(line) for line in out.splitlines() if line.strip()]


def signal_job(job_id: str, sig: str = "USR2") -> None:
    """Send signal `sig` (a name without SIG) to the job's processes: `scancel --signal`."""
    run_cmd(["scancel", f"--signal={sig}", job_id], timeout=30)


def release(job_id: str) -> None:
    """Let a pending job start as soon as it can (`StartTime=now`): a requeued job otherwise waits
    SLURM's own begin-time delay."""
    run_cmd(["scontrol", "update", f"jobid={job_id}", "StartTime=now"], timeout=30)


def submit_blocker(partition: str, nodelist: str, num_nodes: str, name: str, extra: Sequence[str] = ()) -> str:
    """Submit a short exclusive job (`sleep 2`, one-minute limit) on exactly these nodes in
    `partition`; its job id. In a partition of higher PriorityTier it makes SLURM preempt the jobs
    running there. `extra`: more sbatch arguments (account, qos)."""
    out = run_cmd(["sbatch", "--parsable", "-p", partition, "-w", nodelist, "-N", num_nodes, "--exclusive",
                   "--time=1", "-J", name, "-o", "/dev/null", *extra, "--wrap", "sleep 2"], timeout=60)
    return out.strip().split(";")[0]


def cancel_quietly(job_ids: Sequence[str]) -> None:
    """`scancel` these jobs, ignoring failures (jobs already gone): for clean-up on the way out."""
    if job_ids:
        try:
            run_cmd(["scancel", *job_ids], timeout=30)
        except CommandError:
            pass
