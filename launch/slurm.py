"""The one door to SLURM: every command the launcher runs, and every value it writes into a job script.

Commands: `run_cmd(argv, timeout)` runs one and returns its stdout, or raises `CommandError` with
one line. Each use has a small function here (`submit_wrapped`, `queue_states`, `accounting_states`,
`cancel`, `requeue`, `exclude_nodes`, `attempts`, `attempt_times`, `job_state`, `time_left_s`,
`max_array_size`), so tests put fake `squeue`/`sacct`/
`scancel`/`scontrol` commands on PATH (tests/fake_slurm/) and the cluster tests run the real ones
through the same lines. One exception: submitit runs `sbatch` itself when `launch/executors.py`
submits (it writes the script, then calls `sbatch <script>`); the script it writes is checked here
first, and `sweep.py --dry-run` prints it.

Values: nothing from an experiment, a command-line override, a cluster profile or a flag reaches
a script unchecked. `check_sbatch_option` holds, per `#SBATCH` option, what SLURM accepts there
(a partition is a name, a time is minutes or [D-]HH:MM:SS, ...); `check_line` refuses control
characters (newline, CR, NUL, tab, Unicode line and paragraph separators, invisible format
characters) in any text written on a line of its own (setup lines, environment values, paths).
Both raise `UserError` with one line naming the field and what is allowed, so no value can end an
`#SBATCH` line or start a command; values are shell-quoted where they are written as well.
"""

from __future__ import annotations

import getpass
import re
import shlex
import shutil
import signal
import subprocess
import sys
import unicodedata
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt2.errors import UNSAFE_CATEGORIES, UserError, one_line

if TYPE_CHECKING:
    from launch.experiment import ClusterProfile


class CommandError(UserError):
    """A cluster command failed or is missing; str() is one line."""


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def run_cmd(argv: Sequence[str], timeout: float = 60.0) -> str:
    """Run a command and return its stdout; CommandError (one line) when it is missing or fails.

    The command ignores SIGTERM: a job that requeues itself runs `scontrol update` right after its
    `scontrol requeue`, while SLURM is ending the job step with SIGTERM to every process of the task
    (the job's own Python ignores it by then); the command must finish, not die with it. It still
    ends at `timeout`, and SLURM's SIGKILL after KillWait ends it with the step."""
    try:
        res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False,
                             preexec_fn=_ignore_sigterm)
    except FileNotFoundError:
        raise CommandError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"{' '.join(argv[:3])}: no answer after {timeout:.0f} s") from None
    if res.returncode != 0:
        err = (res.stderr or res.stdout).strip().splitlines()
        raise CommandError(f"{' '.join(argv[:3])}: exit {res.returncode}: {err[-1] if err else 'no output'}")
    return res.stdout


def submit_wrapped(argv: Sequence[str], name: str, output: Path, delay_s: int = 0,
                   dependency: str | None = None, where: dict[str, Any] | None = None,
                   comment: str | None = None) -> str:
    """Queue one small command as a job (an early-stopping sweep's controller, a step of a chain):
    one task, one CPU, ten minutes, starting `delay_s` seconds from now at the earliest, after
    `dependency` (e.g. "afterok:123") when given, on the sweep's partition, account and qos
    (`where`: its resources), with `comment` (squeue's %k). Returns its job id."""
    cmd = " ".join(shlex.quote(check_line("command", a)) for a in [sys.executable, *argv])
    opts = ["--parsable", f"--job-name={check_line('job name', name)}", "--ntasks=1", "--cpus-per-task=1",
            "--time=10", f"--output={check_line('log file', str(Path(output).absolute()))}"]
    for key in ("partition", "account", "qos"):
        if (where or {}).get(key) is not None:
            opts.append(f"--{key}={check_sbatch_option(key, where[key], f'resources.{key}')}")  # type: ignore[index]
    if delay_s > 0:
        opts.append(f"--begin=now+{int(delay_s)}")
    if dependency:
        if not re.fullmatch(r"(afterok|afterany):\d+(_\d+)?(:\d+(_\d+)?)*", dependency):
            raise UserError(f"dependency '{show(dependency)}' is not afterok|afterany:<job id>[:<job id>...]")
        opts.append(f"--dependency={dependency}")
    if comment:
        opts.append(f"--comment={check_sbatch_option('comment', comment, 'the job comment')}")
    out = run_cmd(["sbatch", *opts, f"--wrap={cmd}"])
    return out.strip().split(";")[0]


def require_slurm() -> None:
    """UserError unless sbatch and srun are on PATH (submitting needs both)."""
    for tool in ("sbatch", "srun"):
        if shutil.which(tool) is None:
            raise UserError(f"`{tool}` is not on PATH, so --executor slurm cannot submit: run from a SLURM "
                            f"login node (or `make slurm-up` for the local cluster), or use --executor local")


# ---- one function per use ---------------------------------------------------------------------


def queue_states() -> dict[str, tuple[str, str]] | None:
    """{job id ("123" or "123_4"): (state, reason)} for this user's queued jobs; None if squeue fails."""
    try:
        out = run_cmd(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%T|%r"], timeout=30)
    except CommandError:
        return None
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) >= 2:
            states[parts[0]] = (parts[1], parts[2] if len(parts) > 2 else "")
    return states


def queued_comments() -> list[tuple[str, str]] | None:
    """(job id, comment) for this user's queued jobs, array tasks one by one; None if squeue fails."""
    try:
        out = run_cmd(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%i|%k"], timeout=30)
    except CommandError:
        return None
    return [(a.strip(), b.strip()) for a, _, b in (line.partition("|") for line in out.splitlines()) if a.strip()]


JOB_ID = re.compile(r"[0-9]+(?:_[0-9]+)?")  # a job, or an array task: never an option such as --me


def checked(job_ids: Sequence[str]) -> list[str]:
    """`job_ids` when each is a SLURM job id; UserError naming the first that is not (a damaged record
    line must never reach scancel: `scancel --me` would cancel every job of the user)."""
    for job_id in job_ids:
        if not isinstance(job_id, str) or not JOB_ID.fullmatch(job_id):
            raise UserError(f"{show(job_id)} is not a SLURM job id (digits, or digits_digits for an array "
                            f"task): nothing was sent to SLURM")
    return list(job_ids)


def accounting_states(job_ids: list[str]) -> dict[str, str] | None:
    """Final states from sacct ("CANCELLED by 0" -> CANCELLED); None when accounting is off."""
    if not job_ids:
        return {}
    try:
        out = run_cmd(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(checked(job_ids))], timeout=30)
    except CommandError:
        return None
    states = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 2 and parts[1]:
            states[parts[0]] = parts[1].split()[0]
    return states


def cancel(job_ids: list[str]) -> None:
    """scancel these jobs (nothing to do for none); CommandError when scancel fails."""
    if job_ids:
        run_cmd(["scancel", *checked(job_ids)], timeout=60)


def requeue(job_id: str) -> None:
    """Put SLURM job `job_id` ("123", or "123_4" for an array task) back in the queue."""
    run_cmd(["scontrol", "requeue", *checked([job_id])], timeout=60)


def exclude_nodes(job_id: str, hosts: Sequence[str]) -> None:
    """Keep pending job `job_id` off `hosts` (`scontrol update ExcNodeList=`); nothing for none."""
    if hosts:
        value = check_sbatch_option("exclude", ",".join(hosts), "the sweep's excluded nodes")
        run_cmd(["scontrol", "update", f"jobid={checked([job_id])[0]}", f"ExcNodeList={value}"], timeout=60)


def attempts(job_id: str) -> list[tuple[str, str]] | None:
    """(state, node list) of every attempt of the job, oldest first (`sacct -D`); None without accounting."""
    try:
        out = run_cmd(["sacct", "-n", "-P", "-X", "-D", "-j", *checked([job_id]), "-o", "JobID,State,NodeList"], timeout=30)
    except CommandError:
        return None
    rows = [line.strip().split("|") for line in out.splitlines() if line.strip()]
    return [(r[1].split()[0], r[2]) for r in rows if len(r) == 3 and r[1] and r[0] == job_id]


def _acct_time(text: str) -> float | None:
    """sacct's local ISO time ("2026-11-30T07:01:06") as unix seconds; None for Unknown/None."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def attempt_times(job_ids: Sequence[str]) -> dict[str, list[tuple[float | None, float | None, float | None]]] | None:
    """{job id: [(Submit, Start, End) of every attempt, oldest first]} in unix seconds (`sacct -D`,
    one call for all jobs; a requeued attempt's Submit is its requeue); None without accounting."""
    if not job_ids:
        return {}
    try:
        out = run_cmd(["sacct", "-n", "-P", "-X", "-D", "-o", "JobID,Submit,Start,End", "-j", ",".join(checked(job_ids))],
                      timeout=30)
    except CommandError:
        return None
    times: dict[str, list[tuple[float | None, float | None, float | None]]] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            times.setdefault(parts[0], []).append((_acct_time(parts[1]), _acct_time(parts[2]), _acct_time(parts[3])))
    return times


def hostnames(nodelist: str) -> list[str]:
    """A SLURM host list ("n[1-2],gpu7") as names (`scontrol show hostnames`); [nodelist] if that fails."""
    try:
        return run_cmd(["scontrol", "show", "hostnames", nodelist], timeout=30).split() or [nodelist]
    except CommandError:
        return [nodelist]


def parse_kv(text: str) -> dict[str, str]:
    """One record of `scontrol show ... -o` (`Key=Value Key=Value ...`) as a dict; the first
    occurrence of a key wins. Values with spaces are not split correctly (none we read has one)."""
    out: dict[str, str] = {}
    for part in text.split():
        key, sep, value = part.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def show_job(job_id: str) -> dict[str, str]:
    """`scontrol show job -o JOB` as a dict (JobState, Reason, NodeList, NumNodes, ...); empty when
    SLURM no longer knows the job (purged from the controller's memory) or cannot be asked."""
    try:
        return parse_kv(run_cmd(["scontrol", "show", "job", "-o", *checked([job_id])], timeout=30))
    except CommandError:
        return {}


def job_state(job_id: str) -> str | None:
    """SLURM's state for the job ("RUNNING", "CANCELLED", ...), or None when it cannot say."""
    return show_job(job_id).get("JobState")


def parse_duration(text: str) -> float | None:
    """Seconds in SLURM's [days-]hours:minutes:seconds (or minutes:seconds); None for UNLIMITED etc."""
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", text.strip())
    if not m:
        return None
    d, h, mi, sec = (int(g) if g else 0 for g in m.groups())
    return float(((d * 24 + h) * 60 + mi) * 60 + sec)


def time_left_s(job_id: str) -> float | None:
    """What SLURM says is left of the job's time limit, or None when it cannot say."""
    try:
        return parse_duration(run_cmd(["squeue", "-h", "-j", *checked([job_id]), "-o", "%L"], timeout=30))
    except CommandError:
        return None


def max_array_size(default: int) -> int:
    """SLURM's MaxArraySize from `scontrol show config`, else `default` (the profile's value)."""
    try:
        out = run_cmd(["scontrol", "show", "config"], timeout=10)
    except CommandError:
        return default
    for line in out.splitlines():
        if line.strip().startswith("MaxArraySize"):
            try:
                return int(line.split("=", 1)[1].strip())
            except ValueError:
                break
    return default


# ---- used by the drill ----


def show_partitions() -> list[dict[str, str]]:
    """`scontrol show partition -o`: one dict per partition (PartitionName, PriorityTier, ...)."""
    out = run_cmd(["scontrol", "show", "partition", "-o"], timeout=30)
    return [parse_kv(line) for line in out.splitlines() if line.strip()]


def signal_job(job_id: str, sig: str = "USR2") -> None:
    """Send signal `sig` (a name without SIG) to the job's processes: `scancel --signal`."""
    run_cmd(["scancel", f"--signal={sig}", *checked([job_id])], timeout=30)


def release(job_id: str) -> None:
    """Let a pending job start as soon as it can (`StartTime=now`): a requeued job otherwise waits
    SLURM's own begin-time delay."""
    run_cmd(["scontrol", "update", f"jobid={checked([job_id])[0]}", "StartTime=now"], timeout=30)


def submit_blocker(partition: str, nodelist: str, num_nodes: str, name: str, extra: Sequence[str] = ()) -> str:
    """Submit a short exclusive job (`sleep 2`, one-minute limit) on exactly these nodes in
    `partition`; its job id. In a partition of higher PriorityTier it makes SLURM preempt the jobs
    running there. `extra`: more sbatch arguments (account, qos)."""
    out = run_cmd(["sbatch", "--parsable", "-p", partition, "-w", nodelist, "-N", num_nodes, "--exclusive",
                   "--time=1", "-J", name, "-o", "/dev/null", *extra, "--wrap", "sleep 2"], timeout=60)
    return out.strip().split(";")[0]


def set_node_state(node: str, state: str, reason: str | None = None) -> None:
    """`scontrol update nodename=NODE state=STATE [reason=REASON]`: DOWN takes a node out (SLURM
    ends its jobs with NODE_FAIL and requeues them), RESUME brings it back (the drill)."""
    run_cmd(["scontrol", "update", f"nodename={node}", f"state={state}", *([f"reason={reason}"] if reason else [])],
            timeout=30)


def node_state(node: str) -> str:
    """The node's State field of `scontrol show node -o` ("IDLE", "DOWN+NOT_RESPONDING", ...); "" if unknown."""
    try:
        return parse_kv(run_cmd(["scontrol", "show", "node", "-o", node], timeout=30)).get("State", "")
    except CommandError:
        return ""


_OUT_OF_SERVICE = frozenset({"DOWN", "DRAIN", "DRAINED", "DRAINING", "FAIL", "FAILING", "NOT_RESPONDING",
                             "NO_RESPOND", "REBOOT_REQUESTED", "REBOOT_ISSUED"})


def out_of_service(hosts: Sequence[str]) -> list[str]:
    """The hosts whose SLURM state takes them out of service now (DOWN, DRAIN, FAIL, NOT_RESPONDING,
    a pending reboot: any of the `+`-joined words of `node_state`); a host SLURM cannot tell about
    is not counted."""
    return [h for h in hosts if _OUT_OF_SERVICE & set(node_state(h).upper().split("+"))]


def cancel_quietly(job_ids: Sequence[str]) -> None:
    """`scancel` these jobs, ignoring failures (jobs already gone): for clean-up on the way out."""
    if job_ids:
        try:
            run_cmd(["scancel", *checked(job_ids)], timeout=30)
        except CommandError:
            pass


# ---- what may be written into a job script -----------------------------------------------------

_UNSAFE = UNSAFE_CATEGORIES

_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_NAMES = rf"{_NAME}(?:,{_NAME})*"
_COUNT = r"[0-9]+"
_TERM = r"[\[(]*[A-Za-z0-9_.:-]+(?:\*[0-9]+)?[\])]*(?:\*[0-9]+)?"  # a feature of a constraint expression
# (pattern, what SLURM accepts, in words) per long option
_RULES: dict[str, tuple[str, str]] = {
    "job-name": (r"[A-Za-z0-9_][A-Za-z0-9_.=,+-]*", "letters, digits and _.=,+- (not starting with . or -)"),
    "partition": (_NAMES, "partition names (letters, digits, _.-), comma-separated"),
    "account": (_NAME, "an account name (letters, digits, _.-)"),
    "qos": (_NAME, "a QOS name (letters, digits, _.-)"),
    "reservation": (_NAMES, "reservation names (letters, digits, _.-), comma-separated"),
    "wckey": (_NAME, "a wckey (letters, digits, _.-)"),
    "constraint": (rf"{_TERM}(?:[&|,]{_TERM})*", "features (letters, digits, _.-:) joined by & | , with [] () *N"),
    "mem": (r"[0-9]+[KMGT]?", "a size like 64G or 500M"),
    "mem-per-cpu": (r"[0-9]+[KMGT]?", "a size like 4G or 500M"),
    "time": (r"[0-9]+|(?:[0-9]+-)?[0-9]+(?::[0-9]+){0,2}", "minutes, or [D-]HH:MM:SS"),
    "nodes": (r"[0-9]+(?:-[0-9]+)?", "a node count, or min-max"),
    "ntasks-per-node": (_COUNT, "a task count"),
    "cpus-per-task": (_COUNT, "a CPU count"),
    "gpus-per-node": (r"(?:[A-Za-z0-9_.-]+:)?[0-9]+", "a GPU count, or type:count"),
    "signal": (r"(?:[BR]:){0,2}(?:SIG)?[A-Z0-9]+(?:@[0-9]+)?", "a signal spec like USR2@120"),
    "nodelist": (r"[A-Za-z0-9_.,\[\]-]+", "a host list like n[1-4],gpu7"),
    "exclude": (r"[A-Za-z0-9_.,\[\]-]+", "a host list like n[1-4],gpu7"),
    "array": (r"[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*(?::[0-9]+)?(?:%[0-9]+)?", "indices like 0-9%4"),
    "open-mode": (r"append|truncate", "append or truncate"),
    "comment": (r"[A-Za-z0-9_.:=,+-]+", "letters, digits and _.:=,+-"),
}
_PATHS = frozenset({"output", "error", "chdir"})  # any printable text; quoted where written
_FLAGS = frozenset({"requeue", "no-requeue"})  # written bare, only ever True


def show(value: object, limit: int = 60) -> str:
    """A value for a one-line message: quoted, control characters escaped, cut at `limit`."""
    text = str(value)
    cut = text[:limit] + ("..." if len(text) > limit else "")
    return ascii(cut) if any(ord(c) > 126 or not c.isprintable() for c in cut) else f"'{cut}'"


def unsafe_char(text: str) -> str | None:
    """The first character that must never reach a script line (see _UNSAFE), or None."""
    return next((c for c in text if unicodedata.category(c) in _UNSAFE), None)


def check_line(field: str, value: object, allowed: str = "one line of printable text") -> str:
    """`value` as text when it holds no control character; else UserError naming `field`."""
    text = str(value)
    bad = unsafe_char(text)
    if bad is not None:
        raise UserError(f"{field} {show(text)} contains the control character {ascii(bad)}: "
                        f"only {allowed} is allowed")
    return text


def check_sbatch_option(option: str, value: Any, field: str | None = None) -> Any:
    """`value` unchanged when SLURM accepts it for `--option`; UserError (one line) naming `field`
    (default: the option) and what is allowed. None (unset) passes; flags must be True."""
    field = field or f"--{option}"
    if value is None:
        return value
    if option in _FLAGS:
        if value is not True:
            raise UserError(f"{field}: --{option} is a flag and takes no value (got {show(value)})")
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UserError(f"{field} must be text or a number (got {show(value)})")
    text = str(value)
    if option in _PATHS:
        check_line(field, text, "a path without control characters")
        return value
    if option not in _RULES:
        raise UserError(f"{field}: --{option} is not an sbatch option the launcher writes")
    pattern, allowed = _RULES[option]
    check_line(field, text, allowed)
    if not re.fullmatch(pattern, text):
        raise UserError(f"{field} {show(text)} is not valid for --{option}: use {allowed}")
    return value


def check_sbatch_options(options: dict[str, Any], fields: dict[str, str] | None = None) -> dict[str, Any]:
    """check_sbatch_option for each `option: value` (underscores or dashes); returns `options`."""
    for key, value in options.items():
        option = key.replace("_", "-")
        check_sbatch_option(option, value, (fields or {}).get(key))
    return options


def check_profile(profile: ClusterProfile, where: str | None = None) -> None:
    """Refuse a cluster profile whose values could break a job script: partition names SLURM would
    not take, or a control character in its description, a setup line or an environment value
    (setup lines are shell by design, one line each; environment values are quoted when written)."""
    where = where or "cluster profile"
    check_line(f"{where}: name", profile.name)
    check_line(f"{where}: description", profile.description.strip())
    for key, part in profile.partitions.items():
        check_sbatch_option("partition", key, f"{where}: partitions.{one_line(key)}")
        check_sbatch_option("partition", part.name, f"{where}: partitions.{one_line(key)}")
    for i, line in enumerate(profile.setup):
        check_line(f"{where}: setup[{i}]", line, "one shell line per entry, without control characters")
    for key, value in profile.env.items():
        check_line(f"{where}: env.{one_line(key)}", value, "a value without control characters (it is quoted)")
