"""submitit executors (slurm | local | debug) built from resources and a cluster profile.

SLURM commands go through `launch/slurm.py` (sbatch aside, which submitit runs itself), and every
value written into a script is checked there first: `check_inputs` before anything is prepared,
and again where the parameters and lines are built.

- slurm: one sbatch per array of at most MaxArraySize jobs, `array_parallelism` split across
  arrays, one task per GPU (`--ntasks-per-node`), `--signal=USR2@<lead>`, `--requeue`,
  `srun --kill-on-bad-exit=1` (a dead rank takes the others down), `--chdir` into the code
  snapshot. Returns as soon as sbatch has queued the jobs.
- local: submitit's LocalExecutor: one controller process per job on this machine that starts
  the ranks, sends USR2 `lead` seconds before the time limit and restarts the ranks when they
  exit with its requeue code (144). The same JobEntry runs as on SLURM.
- debug: submitit's DebugExecutor: the job runs in this process when its result is asked for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.experiment import ROOT, ClusterProfile, Resources
from launch.slurm import CommandError, check_line, check_profile, check_sbatch_option, check_sbatch_options

CODE_PATHS = ("gpt2", "launch", "configs", "deepspeed_configs", "data_prep", "main.py", "pyproject.toml")
SRUN_ARGS = ["--kill-on-bad-exit=1"]


def local_gpu_count() -> int:
    """GPUs this machine offers (CUDA_VISIBLE_DEVICES respected), without importing torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


# ---- code snapshot ---------------------------------------------------------------------------


def _code_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for name in CODE_PATHS:
        p = root / name
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(f for f in sorted(p.rglob("*"))
                         if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc")
    return files


def snapshot_id(root: Path = ROOT) -> str:
    """Content hash of the code a job would run: the same code gives the same snapshot."""
    h = hashlib.sha256()
    for f in _code_files(root):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def snapshot_path(sweep_dir: Path, root: Path = ROOT) -> Path:
    return (sweep_dir / "code" / snapshot_id(root)).absolute()


def snapshot_code(sweep_dir: Path, root: Path = ROOT) -> Path:
    """Copy the code into <sweep>/code/<hash>/ (once per distinct code) and return that path.

    Jobs start with their working directory there, so `import gpt2`/`launch` and configs/ come
    from the snapshot: a job requeued after the working tree changed still runs what was submitted.
    """
    dest = snapshot_path(sweep_dir, root)
    if (dest / ".complete").is_file():
        return dest
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}")
    try:
        for f in _code_files(root):
            target = tmp / f.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
        (tmp / ".complete").write_text("")
    except BaseException:  # a full disk, say: leave no half snapshot behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(dest)
    except OSError:  # a concurrent submission made the same snapshot first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---- SLURM -----------------------------------------------------------------------------------


# resources by submitit's name -> the field a user sets (for messages)
RESOURCE_FIELDS = {"partition": "partition", "time": "time", "nodes": "nodes", "ntasks_per_node": "tasks_per_node",
                   "cpus_per_task": "cpus_per_task", "gpus_per_node": "gpus_per_node", "mem": "mem",
                   "account": "account", "qos": "qos", "constraint": "constraint"}


def check_inputs(job_name: str, res: Resources, profile: ClusterProfile, overrides: Iterable[str] = ()) -> None:
    """Before anything is prepared or written: the job name and every resource as SLURM would
    take them, the profile's lines, and no control character in a config override."""
    check_sbatch_option("job-name", job_name, "the sweep name")
    for option, name in RESOURCE_FIELDS.items():
        value = getattr(res, name)
        if name == "gpus_per_node" and value == 0:
            continue  # not written
        check_sbatch_option(option.replace("_", "-"), value, f"resources.{name}")
    check_profile(profile)
    for ov in overrides:
        check_line(f"override {ov.split('=', 1)[0]!r}", ov, "one line of printable text")


def setup_lines(profile: ClusterProfile, snapshot: Path | None = None) -> list[str]:
    """The profile's own lines, then its environment (values quoted), then the snapshot on PYTHONPATH."""
    check_profile(profile)
    lines = list(profile.setup)
    lines += [f"export {k}={shlex.quote(v)}" for k, v in profile.env.items()]
    if snapshot is not None:
        path = check_line("the code snapshot path", str(snapshot), "a path without control characters")
        lines.append(f"export PYTHONPATH={shlex.quote(path)}${{PYTHONPATH:+:$PYTHONPATH}}")
    return lines


def resource_fields(res: Resources, profile: ClusterProfile) -> dict[str, Any]:
    """The SLURM resource requests of a job, by submitit's names (underscores); None means unset.
    Shared by the submitit executor and the plain sbatch template (launch/render.py); every value
    is checked against what SLURM accepts for its option."""
    part = profile.partition(check_sbatch_option("partition", res.partition, "resources.partition"))
    fields = {
        "partition": part.name if part else res.partition,
        "time": res.time,
        "nodes": res.nodes,
        "ntasks_per_node": res.ntasks_per_node,
        "cpus_per_task": res.cpus_per_task,
        "gpus_per_node": res.gpus_per_node or None,
        "mem": res.mem,
        "account": res.account,
        "qos": res.qos,
        "constraint": res.constraint,
    }
    return check_sbatch_options(fields, {k: f"resources.{v}" for k, v in RESOURCE_FIELDS.items()})


def slurm_parameters(job_name: str, res: Resources, profile: ClusterProfile, lead_s: int,
                     snapshot: Path, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """submitit SlurmExecutor parameters, each checked for its sbatch option (submitit quotes them).
    `exclude`: hosts the sweep excludes (blamed twice for failures, launch/record.py)."""
    check_sbatch_option("signal", f"USR2@{lead_s}", "resources.signal_lead_s")
    extra: dict[str, Any] = {"requeue" if res.requeue else "no-requeue": True, "chdir": str(snapshot)}
    if hosts := ",".join(exclude):
        extra["exclude"] = hosts
    params: dict[str, Any] = {
        "job_name": check_sbatch_option("job-name", job_name, "the sweep name"),
        **resource_fields(res, profile),
        "signal_delay_s": lead_s,
        "array_parallelism": res.array_parallelism,
        "setup": setup_lines(profile, snapshot),
        "srun_args": list(SRUN_ARGS),
        "additional_parameters": check_sbatch_options(extra, {"chdir": "the code snapshot path",
                                                              "exclude": "the sweep's excluded nodes"}),
    }
    return {k: v for k, v in params.items() if v is not None}


def submit_command(folder: Path, python: str = sys.executable) -> str:
    """The command submitit puts in the script (its `_submitit_command_str`)."""
    return " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])


def sbatch_script(params: dict[str, Any], folder: Path, map_count: int | None = None,
                  python: str = sys.executable) -> str:
    """The exact script submitit writes for these parameters (map_count: the array's size)."""
    from submitit.slurm.slurm import _make_sbatch_string

    check_line("the launcher's Python", python, "a path without control characters")
    check_line("the log folder", str(folder), "a path without control characters")
    p = dict(params)
    if map_count is not None and map_count > 1:
        p["map_count"] = map_count
    return _make_sbatch_string(command=submit_command(folder, python), folder=folder, **p)


def array_chunks(n: int, max_array_size: int, parallelism: int) -> list[tuple[int, int, int]]:
    """(start, stop, parallelism) per sbatch: arrays below MaxArraySize sharing the parallelism."""
    size = max(1, max_array_size)
    bounds = [(i, min(n, i + size)) for i in range(0, n, size)]
    per = max(1, parallelism // max(1, len(bounds)))
    return [(a, b, per) for a, b in bounds]


@dataclass
class Submitted:
    job_id: str
    array_index: int | None
    handle: Any  # the submitit Job (local: it holds the controller process)


def submit_slurm(entries: list[Any], folder: Path, params: dict[str, Any], max_array_size: int,
                 max_timeouts: int, comment: Callable[[int], str] | None = None) -> Iterator[list[Submitted]]:
    """Submit as arrays; yields each array's jobs as soon as sbatch accepted it. `comment(first)`:
    the comment of the sbatch whose first job is entries[first] (launch/intent.py)."""
    import submitit

    check_line("the log folder", str(folder), "a path without control characters")  # submitit writes it
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_timeouts)
    ex.update_parameters(**params)
    for start, stop, per in array_chunks(len(entries), max_array_size, params.get("array_parallelism", 256)):
        chunk = entries[start:stop]
        ex.update_parameters(array_parallelism=per, **({"comment": comment(start)} if comment else {}))
        try:
            if len(chunk) == 1:
                job = ex.submit(chunk[0])
                yield [Submitted(job.job_id, None, job)]
                continue
            with ex.batch():
                jobs = [ex.submit(e) for e in chunk]
        except submitit.core.utils.FailedJobError as exc:
            msg = (str(exc).strip().splitlines() or ["no message"])[-1]
            raise CommandError(f"sbatch refused the submission: {msg}") from None
        yield [Submitted(j.job_id, int(j.job_id.split("_")[1]), j) for j in jobs]


# ---- local and debug -------------------------------------------------------------------------


@contextlib.contextmanager
def _working_dir(path: Path) -> Iterator[None]:
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


@contextlib.contextmanager
def _std_streams_to(path: Path) -> Iterator[None]:
    """Point fds 1 and 2 at `path` while children are started, so a controller never holds the
    launcher's terminal or pipe open (`--detach | tee` returns when the launcher does)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644)  # never through a symlink
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def submit_local(entries: list[Any], folder: Path, res: Resources, lead_s: int, snapshot: Path,
                 env: dict[str, str], tag: Callable[[int], dict[str, str]] | None = None) -> list[Submitted]:
    """Start one controller per job; it inherits the snapshot as working directory and `env`
    (and `tag(i)`, launch/intent.py), and writes anything of its own to <logs>/local-controllers.log."""
    import submitit
    from submitit.core.utils import JobPaths, environment_variables

    ex = submitit.LocalExecutor(folder=folder, max_num_timeout=res.max_timeouts)
    ex.update_parameters(timeout_min=res.time, nodes=1, tasks_per_node=res.ntasks_per_node,
                         gpus_per_node=res.gpus_per_node, signal_delay_s=lead_s)
    pythonpath = os.pathsep.join(p for p in (str(snapshot), os.environ.get("PYTHONPATH", "")) if p)
    log = JobPaths.get_first_id_independent_folder(folder) / "local-controllers.log"
    with _working_dir(snapshot), environment_variables(**env, PYTHONPATH=pythonpath), _std_streams_to(log):
        jobs = []
        for i, e in enumerate(entries):
            with environment_variables(**(tag(i) if tag else {})):
                jobs.append(ex.submit(e))
    return [Submitted(j.job_id, None, j) for j in jobs]


def submit_debug(entries: list[Any], folder: Path) -> list[Submitted]:
    """Nothing runs yet: call `.handle.result()` to run a job in this process (pdb on error)."""
    import submitit

    ex = submitit.DebugExecutor(folder=folder)
    return [Submitted(j.job_id, None, j) for j in (ex.submit(e) for e in entries)]


def local_alive(pid: str | None, sweep_dir: Path) -> bool:
    """True while the local controller `pid` of this sweep runs (a zombie counts as gone)."""
    if not pid or not pid.isdigit():
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    args = [a.decode(errors="replace") for a in cmdline]
    root = sweep_dir.resolve()
    # by path components: the controller of runs/exp2 is not one of runs/exp's
    return "submitit.local._local" in args and any(
        a.startswith("/") and Path(a).resolve().is_relative_to(root) for a in args
    )
