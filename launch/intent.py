"""A submission's write-ahead line, so that a launcher killed mid-submission never submits a job twice.

    <sweep>/submitting.json    the jobs one submission is about to start, written (and flushed
                               to disk) under the sweep's lock before its first sbatch or local
                               controller, and removed once the sweep record names them all (or
                               sbatch refused the rest); a Ctrl-C or a crash leaves it for the next

Without it, a launcher (or the SLURM controller of an early-stopping sweep) killed between
sbatch accepting a job and the sweep record naming it leaves a job nobody knows about: the next
submission starts the same run again, and two jobs train one run directory at once.

Each job carries the submission's token where the next launcher can find it:

- SLURM: the job's comment, `gpt2-submission:<token>:<first>` (`<first>`: the position of the
  sbatch's first job in the submission; array task i is job `<first> + i`); squeue shows it;
- local: the controller's environment, `GPT2_SUBMISSION=<token>:<position>` (/proc/<pid>/environ);
- either: a job that has started writes its id into its run's state.json, which the launcher had
  reset to PENDING (no id) before submitting; a job that has already left the queue is found so.

The next submission of the sweep (`submit`, `resubmit`, `advance`; `status` and `cancel` too)
finds the file under the lock, adopts every job it can find into the record, exactly as the dead
launcher would have recorded it, and removes the file. A job the launcher never got to submit is
found nowhere and is submitted normally. The debug executor runs jobs in the launcher's own
process: nothing can outlive it, so it writes no line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gpt2 import safe_read, strict_json
from gpt2.errors import UserError, one_line
from launch import record
from launch.paths import child

INTENT = "submitting.json"
TAG = "gpt2-submission"
ENV = "GPT2_SUBMISSION"
EXIT_AFTER_SUBMIT = "GPT2_SUBMIT_EXIT_AFTER_SUBMIT"  # tests: die (exit 9) once the first jobs are submitted, unrecorded

Found = dict[int, tuple[str, int | None]]  # position in the submission -> (job id, array index)


@dataclass
class Intent:
    token: str
    executor: str
    time: float
    rows: list[record.JobRecord]  # as the record will show them, without job ids, in submission order

    def comment(self, first: int) -> str:
        """The SLURM comment of the sbatch whose first job is `rows[first]`."""
        return slurm_comment(self.token, first)

    def env(self, position: int) -> dict[str, str]:
        """What the local controller of `rows[position]` carries in its environment."""
        return {ENV: f"{self.token}:{position}"}


def slurm_comment(token: str, first: int) -> str:
    return f"{TAG}:{token}:{first}"


def sweep_tag(kind: str, sweep_dir: Path, *parts: str) -> str:
    """The comment that marks a sweep's own small jobs (`gpt2-advance:<hash>` for its controller,
    `gpt2-chain:<hash>:<step>` for a chain step): the hash is of the sweep's absolute path, so two
    sweeps of one name, in two runs folders, never take each other's jobs for their own."""
    digest = hashlib.sha256(str(Path(sweep_dir).absolute()).encode()).hexdigest()[:16]
    return ":".join([f"gpt2-{kind}", digest, *parts])


def queued_with(tag: str) -> list[str]:
    """The ids of this user's queued or running jobs whose comment is `tag`; UserError if squeue fails."""
    from launch import slurm

    queued = slurm.queued_comments()
    if queued is None:
        raise UserError(f"squeue failed, so whether a job tagged {tag} is queued already cannot be told: "
                        f"try again when squeue answers")
    return [job for job, comment in queued if comment == tag]


def begin(sweep_dir: Path, executor: str, rows: list[record.JobRecord]) -> Intent:
    """Write the line (under the caller's lock) and make it durable before anything is submitted."""
    it = Intent(secrets.token_hex(8), executor, time.time(), rows)
    path = Path(sweep_dir) / INTENT
    text = json.dumps({"token": it.token, "executor": executor, "time": it.time, "jobs": [vars(r) for r in rows]})
    record.atomic_write(path, text + "\n")
    _fsync(path)
    _fsync(path.parent)
    return it


def end(sweep_dir: Path) -> None:
    """The record names every job of the submission (or none was submitted): drop the line."""
    (Path(sweep_dir) / INTENT).unlink(missing_ok=True)


def read(sweep_dir: Path) -> tuple[Intent | None, str | None]:
    """(the interrupted submission's line or None, what was wrong with a damaged one or None)."""
    path = Path(sweep_dir) / INTENT
    try:
        raw = strict_json.loads(safe_read.read_text(path))
        if raw["executor"] not in ("slurm", "local"):  # the executors a submission writes this line for
            raise ValueError(f"executor {raw['executor']!r}")
        for r in raw["jobs"]:  # a job is adopted into the record as written here: the record's own check
            if (problem := record.shape_problem(record.JobRecord, r)) is not None:
                raise ValueError(problem)
        rows = [record.JobRecord.from_dict(r) for r in raw["jobs"]]
        return Intent(str(raw["token"]), str(raw["executor"]), float(raw["time"]), rows), None
    except FileNotFoundError:
        return None, None
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        return None, (f"{path}: an interrupted submission's line that cannot be read ({type(exc).__name__}: "
                      f"{one_line(str(exc))[:80]}); "
                      f"removed it: if `squeue` shows jobs of this sweep that `status` does not, scancel them")


def recover(sweep_dir: Path, records: dict[str, record.JobRecord],
            queue: Callable[[], list[tuple[str, str]] | None] | None = None,
            controllers: Callable[[], list[tuple[str, str]]] | None = None) -> tuple[set[str], list[str]]:
    """Under the sweep's lock: adopt into `records` the jobs an interrupted submission started.
    Returns (the names adopted, warnings). `queue` (SLURM: (job id, comment) per queued job) and
    `controllers` (local: (pid, GPT2_SUBMISSION) per live controller) are the seams."""
    from launch import slurm

    sweep_dir = Path(sweep_dir)
    it, problem = read(sweep_dir)
    warnings = [problem] if problem else []
    if it is None:
        end(sweep_dir)
        return set(), warnings
    if it.executor == "slurm":
        tagged = (queue or slurm.queued_comments)()
        if tagged is None:  # cannot tell what was submitted: keep the line, submit nothing that might be twice
            raise UserError(f"{sweep_dir / INTENT}: a submission of this sweep was interrupted and squeue "
                            f"failed, so what it submitted cannot be told: try again when squeue answers")
        found = found_in_queue(it, tagged)
    else:
        found = found_in_controllers(it, (controllers or local_controllers)())
    for i, row in enumerate(it.rows):  # started already: its state.json names it
        st = record.read_state(child(sweep_dir, row.job, "job"))
        old = records.get(row.job)
        if i not in found and st and st.job_id and st.executor == it.executor and (old is None or st.job_id != old.job_id):
            found[i] = (st.job_id, int(st.job_id.split("_")[1]) if "_" in st.job_id else None)  # checked ids
    adopted = set()
    for i, (job_id, index) in sorted(found.items()):
        row = it.rows[i]
        if records.get(row.job) and records[row.job].job_id == job_id:
            continue  # recorded before the launcher died
        records[row.job] = record.JobRecord(**{**vars(row), "job_id": job_id, "array_index": index,
                                               "state": record.PENDING, "submitted_at": it.time})
        adopted.add(row.job)
    if adopted:
        warnings.append(f"a submission of this sweep was interrupted before it recorded {len(adopted)} job(s) it had "
                        f"started: adopted them ({', '.join(sorted(adopted))}), none is submitted twice")
    return adopted, warnings


def _count(text: str) -> int | None:
    """A plain decimal count read from the queue (ASCII digits, at most 18), else None: whatever
    else a name or comment holds there (`²`, 5,000 digits) is not ours."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 18 else None


def found_in_queue(it: Intent, tagged: list[tuple[str, str]]) -> Found:
    found: Found = {}
    for job_id, comment in tagged:
        tag, _, rest = comment.partition(":")
        token, _, first = rest.partition(":")
        start = _count(first)
        if tag != TAG or token != it.token or start is None:
            continue
        base, array, task = job_id.partition("_")
        index = _count(task) if array else None
        if _count(base) is None or (array and index is None):  # not SLURM's `digits[_digits]`
            continue
        pos = start + (index or 0)
        if 0 <= pos < len(it.rows):
            found[pos] = (job_id, index)
    return found


def found_in_controllers(it: Intent, live: list[tuple[str, str]]) -> Found:
    found: Found = {}
    for pid, value in live:
        token, _, text = value.partition(":")
        pos = _count(text)
        if token == it.token and pos is not None and pos < len(it.rows):
            found[pos] = (pid, None)
    return found


def local_controllers() -> list[tuple[str, str]]:
    """(pid, its GPT2_SUBMISSION) for every live local controller (submitit.local._local) that carries one."""
    out, prefix = [], f"{ENV}=".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if b"submitit.local._local" not in (proc / "cmdline").read_bytes().split(b"\0"):
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        out += [(proc.name, e[len(prefix):].decode(errors="replace")) for e in env if e.startswith(prefix)]
    return out


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
