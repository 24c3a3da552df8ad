"""The callable every rank of a job runs: set up the environment, train, then finish or requeue.

`JobEntry` is what the launcher pickles through submitit (the same object for slurm, local and
debug). Each rank:

1. exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR from submitit's TorchDistributedEnvironment, a
   MASTER_PORT unique to the job or array task, GPT2_RESTART_COUNT and the thread count, and
   with compile=true torch.compile's caches in the sweep's folder (launch/rank_env.py);
2. calls `gpt2.train.run(cfg)`, which handles USR2/SIGTERM itself: every rank saves the same
   step and returns Outcome(status="preempted", reason="USR2"|"SIGTERM"|"time_budget");
3. rank 0 records the result in `<run>/state.json` and the sweep record, and on "preempted"
   decides: a *time-out* (the trainer's budget, or USR2 within the last stretch of the time
   limit, as submitit tells them apart) or a *preemption* (SIGTERM, or USR2 earlier). Only
   time-outs count against `max_timeouts`. Then it requeues: `scontrol requeue <id or A_a>`
   on SLURM, exit code 144 on the local executor (its controller restarts the ranks), another
   attempt in-process for debug. A stop asked by `sweep.py cancel` (or SIGTERM to a local job,
   where nothing preempts) is CANCELLED instead, with its checkpoint kept. Every rank then
   exits at once; a watchdog also stops ranks whose peer failed or whose local controller died,
   so none is left running.

Failures (issue 13): a rank that fails (an exception out of training, or gpt2's watchdog calling
the fatal hook with its report of a hang or a lost peer) calls `decide_failure`; the first rank of
the attempt to get there decides for all. `judge` (pure) reads the attempt's first failure report
(`<run>/failures/restart<R>-rank<K>.json`) and the previous failure in state.json: transient
infrastructure failures (hang, lost peer, communication error, NODE_FAIL, a CUDA error naming the
hardware, a storage error: blamed on no host) are requeued up to `max_failures`; bad input and the same exception at the same step on
two attempts in a row are not. The rule that decided goes into state.json with the failure, and
the hosts of an infrastructure failure are blamed in the sweep's ledger (launch/record.py): a host
blamed twice is excluded from the sweep's requeues (`scontrol update ExcNodeList`) and new
submissions (`--exclude`). NODE_FAIL (SLURM requeues the job itself, no report of ours) is noted
by rank 0 at the start of the next attempt, from sacct (`note_node_failure`).

Exit codes: 0 done (or a non-zero rank after a stop), 2 bad input, 76 (EXIT_FAILURE) a failure
that was requeued or left to the rank that decides, 1 a failure not retried, 75 (EXIT_REQUEUE) stopped
after a checkpoint and requeued, or not requeued (cap reached, requeue disabled or impossible:
the message says so, and the next submission of the sweep resumes from the checkpoint), 144 the
local executor's requeue code, anything else a failure with its traceback in the log.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2.errors import EXIT_FAILURE, EXIT_REQUEUE, EXIT_USER_ERROR, UserError
from launch import record, slurm
from launch.failures import Verdict, attempt_failures, blamed_hosts, failure_from_exception, judge, summary
from launch.rank_env import TaskContext, export_mtbi, setup_env
from launch.slurm import CommandError

LOCAL_REQUEUE_CODE = 144  # submitit.local.local.LOCAL_REQUEUE_RETURN_CODE
_ATTEMPT_START = 0.0  # when this process's attempt began (for classifying an early USR2)


def now() -> float:
    """Wall clock (a seam: tests pass a fake)."""
    return time.time()


def classify(reason: str | None, elapsed_s: float, time_limit_s: float | None, lead_s: float,
             executor: str, time_left_s: float | None = None) -> str:
    """"timeout" or "preemption" for a stop with this reason after `elapsed_s` of this attempt.

    USR2 is both SLURM's time-limit warning (sent `lead_s` before the limit) and, on clusters
    with preempt_send_user_signal, a preemption. SLURM's own word on the time left is the best
    evidence (it checks limits every ~30 s, so the warning may come up to a minute early);
    without it, tell them apart by elapsed time as submitit does. The local executor sends
    USR2 only as its time-out warning.
    """
    if reason == "time_budget":
        return "timeout"
    if reason == "USR2" and executor == "local":
        return "timeout"
    if reason == "USR2" and time_left_s is not None:
        return "timeout" if time_left_s <= lead_s + 90.0 else "preemption"
    if reason == "USR2" and time_limit_s:
        usable = time_limit_s - lead_s
        threshold = max(0.5 * usable, usable - max(60.0, 0.05 * time_limit_s))
        return "timeout" if elapsed_s >= threshold else "preemption"
    return "preemption"


@dataclass
class JobEntry:
    """One job of a sweep, as submitted: the resolved config and how to requeue it."""

    cfg: Any  # gpt2.config.Config (resolved and validated at submission)
    sweep_dir: str
    job: str
    executor: str  # slurm | local | debug
    time_limit_s: float | None
    signal_lead_s: float
    max_timeouts: int = 3
    requeue: bool = True
    max_failures: int = 3
    threads: int | None = None  # per rank; default: SLURM_CPUS_PER_TASK, else cores / local ranks
    mtbi_s: float | None = None  # the cluster profile's mean time between interruptions (interval auto)

    def __call__(self) -> dict[str, Any]:
        if self.executor == "debug":
            return run_in_process(self)
        return run_task(self)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit calls this on global rank 0 when USR2 arrives before training took over the
        signal (during start-up). Count the stop like any other; None tells submitit not to requeue
        (cap reached or requeue disabled), else it requeues this entry itself."""
        from submitit.helpers import DelayedSubmission

        run_dir = self.cfg.run.dir
        st = record.read_state(run_dir) or record.RunState()
        elapsed = now() - _ATTEMPT_START if _ATTEMPT_START else 0.0
        kind = classify("USR2", elapsed, self.time_limit_s, self.signal_lead_s, self.executor)
        timeouts, preemptions = st.timeouts + (kind == "timeout"), st.preemptions + (kind == "preemption")
        if not self.requeue or timeouts > self.max_timeouts:
            state = record.TIMEOUT if self.requeue else record.FAILED
            record.update_state(run_dir, state=state, timeouts=timeouts, preemptions=preemptions, reason="USR2",
                            message=f"USR2 during start-up ({kind}); not requeued")
            return None
        record.update_state(run_dir, state=record.REQUEUED, restarts=st.restarts + 1, timeouts=timeouts,
                        preemptions=preemptions, reason="USR2", stop_save_s=None,
                        message=f"USR2 during start-up ({kind}); requeued")
        return DelayedSubmission(self)


def start_watchdog(abort_file: Path, watch_parent: bool, interval_s: float = 0.5) -> None:
    """Exit this rank when a peer failed (it touched `abort_file`) or, locally, when the controller
    that started us is gone: no rank is left blocked in a collective or orphaned."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            if abort_file.exists():
                print(f"[job] a peer rank failed ({abort_file.name}): exiting", file=sys.stderr, flush=True)
                os._exit(1)
            if watch_parent and os.getppid() != parent:
                print("[job] the local controller is gone: exiting", file=sys.stderr, flush=True)
                os._exit(1)

    threading.Thread(target=loop, name="gpt2-job-watchdog", daemon=True).start()


def _quiet_signals() -> None:
    """After training: a late USR2/SIGTERM must not interrupt the bookkeeping and requeue. Only
    the main thread may set handlers: from the watchdog's fatal hook (another thread) nothing is
    done (signal.signal would raise there and the requeue would never happen)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def note(signum: int, frame: object) -> None:
        print(f"[job] {signal.Signals(signum).name} received while finishing; ignored", file=sys.stderr, flush=True)

    for sig in (signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, note)


def _record(entry: JobEntry, ctx: TaskContext, **fields: Any) -> record.RunState:
    """Write state.json and mirror it into the sweep record (best effort: status refreshes it)."""
    st = record.update_state(ctx.run_dir, **fields)
    record.SweepRecord(entry.sweep_dir).update(
        entry.job, timeout=10.0, state=st.state, restarts=st.restarts, last_step=st.step,
        last_loss=st.loss, message=st.message, failures=st.failures, failure=record.failure_line(st.last_failure),
    )
    return st


def run_task(entry: JobEntry, train_fn: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """One attempt on one rank. Returns when training is done; raises SystemExit after a stop."""
    global _ATTEMPT_START
    if entry.executor == "debug":  # attempts share the launcher's process: start-up counts from here
        os.environ["GPT2_T0"] = str(now())
    prior = record.read_state(entry.cfg.run.dir) or record.RunState()
    # when this attempt was queued (submitted, or requeued): the goodput ledger's queue wait,
    # written by the trainer into its "start" row (launch/goodput.py)
    queued = prior.updated if prior.state in (record.PENDING, record.REQUEUED) else None
    os.environ["GPT2_QUEUED_AT"] = f"{queued:.3f}" if queued else ""
    ctx = setup_env(entry, prior)
    start = now()
    if os.environ.get("SLURM_JOB_START_TIME", "").isdigit():
        start = min(start, float(os.environ["SLURM_JOB_START_TIME"]))
    _ATTEMPT_START = ctx.started = start
    export_mtbi(entry)
    if train_fn is None:
        import torch

        from gpt2.train import run as train_fn

        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if ctx.rank == 0:
        _record(entry, ctx, state=record.RUNNING, job_id=ctx.job_id, executor=entry.executor,
                restarts=ctx.restarts, reason=None, stop_save_s=None, message=None, host=socket.gethostname())
    abort = ctx.run_dir / f".abort-{ctx.job_id}-{ctx.restarts}"
    if entry.executor != "debug":
        start_watchdog(abort, watch_parent=entry.executor == "local")
    _register_fatal_hook(entry, ctx)
    if ctx.rank == 0 and entry.executor == "slurm" and ctx.job_id and ctx.restarts > 0:
        code = note_node_failure(entry, ctx)
        if code is not None:
            _touch(abort)
            raise SystemExit(code)
    try:
        outcome = train_fn(entry.cfg)
    except KeyboardInterrupt:
        if ctx.rank == 0:
            _record(entry, ctx, state=record.CANCELLED, message="interrupted (SIGINT)")
        raise
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        decide_failure(entry, ctx, exc=exc, bad_input=True)
        _touch(abort)
        raise SystemExit(EXIT_USER_ERROR) from None
    except Exception as exc:
        code = decide_failure(entry, ctx, exc=exc)
        _touch(abort)
        if code == 1:
            raise  # not retried: the traceback goes to the log as before
        traceback.print_exc()
        raise SystemExit(code) from None  # requeued, or left to the rank that decides
    if entry.executor != "debug":  # debug runs in the launcher's process: leave its handlers alone
        _quiet_signals()
    if outcome.status == "done":
        if ctx.rank == 0:
            _record(entry, ctx, state=record.COMPLETED, step=outcome.step, loss=outcome.final_loss, reason=None)
        return {"job": entry.job, "status": "done", "step": outcome.step, "loss": outcome.final_loss}
    code = after_stop(entry, ctx, outcome, elapsed_s=now() - start)
    raise SystemExit(code)


def after_stop(entry: JobEntry, ctx: TaskContext, outcome: Any, elapsed_s: float) -> int:
    """Rank 0 counts the stop, requeues when allowed, and returns this rank's exit code."""
    if ctx.rank != 0:
        return 0  # rank 0 decides; under SLURM its requeue stops the whole job anyway
    st = record.read_state(ctx.run_dir) or record.RunState()
    where = f"{entry.sweep_dir}"
    seen = dict(step=outcome.step, loss=outcome.final_loss, reason=outcome.reason,
                stop_save_s=outcome.save_s)
    if st.cancel_requested:
        _record(entry, ctx, state=record.CANCELLED, message="cancelled", **seen)
        return 0
    if entry.executor == "local" and outcome.reason == "SIGTERM":  # nothing preempts on this machine
        msg = (f"stopped by SIGTERM at step {outcome.step}, checkpoint kept: "
               f"`python launch/sweep.py resubmit {entry.sweep_dir} --cancelled` resumes from it")
        _record(entry, ctx, state=record.CANCELLED, message=msg, **seen)
        return 0
    if entry.executor == "slurm" and ctx.job_id and outcome.reason == "SIGTERM" \
            and (slurm.job_state(ctx.job_id) or "").startswith("CANCELLED"):
        # a plain `scancel`: the user wants it stopped, not requeued
        _record(entry, ctx, state=record.CANCELLED, message="cancelled (scancel)", **seen)
        return 0
    left = slurm.time_left_s(ctx.job_id) if entry.executor == "slurm" and ctx.job_id else None
    kind = classify(outcome.reason, elapsed_s, entry.time_limit_s, entry.signal_lead_s, entry.executor, left)
    timeouts = st.timeouts + (kind == "timeout")
    preemptions = st.preemptions + (kind == "preemption")
    counts = dict(timeouts=timeouts, preemptions=preemptions)
    resume = f"`python launch/sweep.py resubmit {where} --failed` resumes from it"
    if kind == "timeout" and timeouts > entry.max_timeouts:
        msg = (f"timed out {timeouts} times (max_timeouts={entry.max_timeouts}); checkpoint at step "
               f"{outcome.step} kept: {resume}")
        _record(entry, ctx, state=record.TIMEOUT, message=msg, **seen, **counts)
        print(f"[job] {msg}", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    if not entry.requeue:
        msg = f"stopped at step {outcome.step} ({outcome.reason}) and requeue is disabled: {resume}"
        _record(entry, ctx, state=record.FAILED, message=msg, **seen, **counts)
        print(f"[job] {msg}", file=sys.stderr, flush=True)
        return EXIT_REQUEUE
    restarts = ctx.restarts + 1
    note = f"{kind} at step {outcome.step} ({outcome.reason}); restart {restarts}"
    # Written before requeueing: on SLURM the requeue may stop this process at once.
    _record(entry, ctx, state=record.REQUEUED, restarts=restarts, message=note, **seen, **counts)
    print(f"[job] {note}", file=sys.stderr, flush=True)
    if entry.executor in ("local", "debug"):
        return LOCAL_REQUEUE_CODE
    assert ctx.job_id is not None
    try:
        requeue_slurm(entry, ctx.job_id)
    except CommandError as exc:
        msg = f"checkpoint at step {outcome.step} saved but job {ctx.job_id} could not be requeued ({exc}): {resume}"
        _record(entry, ctx, state=record.FAILED, restarts=ctx.restarts, message=msg)
        print(f"[job] {msg}", file=sys.stderr, flush=True)
    return EXIT_REQUEUE


def requeue_slurm(entry: JobEntry, job_id: str) -> None:
    """`scontrol requeue`, then keep the job off the hosts its sweep excludes (ExcNodeList can only
    be changed once the job is pending again). A job SLURM has requeued already (NODE_FAIL: it
    also sends SIGTERM, which the trainer answers with a save) is left as it is. CommandError
    when the job could not be requeued."""
    try:
        slurm.requeue(job_id)
    except CommandError as exc:
        # while the old attempt's processes end, scontrol may show the job COMPLETING; its answer
        # to the requeue ("Job is pending execution") says it is queued already
        queued = "pending execution" in str(exc).lower() \
            or (slurm.job_state(job_id) or "") in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED")
        if not queued:
            raise
        print(f"[job] SLURM requeued job {job_id} already", file=sys.stderr, flush=True)
    excluded = record.excluded_hosts(entry.sweep_dir)
    try:
        slurm.exclude_nodes(job_id, excluded)
    except (CommandError, UserError) as exc:
        print(f"[job] requeued, but could not exclude {','.join(excluded)}: {exc}", file=sys.stderr, flush=True)


# ---- failures: record, blame, requeue (the rules: launch/failures.py) --------------------------


def _event(entry: JobEntry, restart: int) -> str:
    return f"{entry.job}/{restart}"


def _note_failure(entry: JobEntry, ctx: TaskContext, failure: dict[str, Any], verdict: Verdict, restart: int,
                  counted_before: int, **fields: Any) -> tuple[record.RunState, list[str] | None]:
    """Record the failure in state.json (count, last failure, the run's first failure with its
    traceback) and blame its hosts in the sweep's ledger; returns the state and excluded hosts."""
    st = record.read_state(ctx.run_dir) or record.RunState()
    hosts = blamed_hosts(failure) if verdict.blame else []
    last = summary(failure, verdict, restart, hosts)
    first = st.first_failure or {**last, "traceback": failure.get("traceback")}
    line = record.failure_line(last) or ""
    excluded = record.blame(entry.sweep_dir, _event(entry, restart), hosts, entry.job, last["kind"], line) \
        if hosts else None
    st = _record(entry, ctx, failures=counted_before + verdict.counted, last_failure=last, first_failure=first,
                 **fields)
    return st, excluded


def _decided_path(ctx: TaskContext) -> Path:
    """One per attempt: a resubmitted job starts again at the same restart count, with a new job id
    (debug: in a new launcher process)."""
    return ctx.run_dir / "failures" / f".decided-{ctx.job_id or os.getpid()}-{ctx.restarts}"


def _claim(ctx: TaskContext) -> bool:
    """True for the first rank of this attempt to fail: it decides; the others leave it to it."""
    path = _decided_path(ctx)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False


def _wait_decided(ctx: TaskContext, timeout_s: float = 30.0) -> None:
    """Give the deciding rank time to requeue before this one exits (srun's --kill-on-bad-exit
    would otherwise stop it half way)."""
    path = _decided_path(ctx)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if path.read_text():
                return
        except OSError:
            return
        time.sleep(0.2)


def decide_failure(entry: JobEntry, ctx: TaskContext, report: dict[str, Any] | None = None,
                   exc: BaseException | None = None, bad_input: bool = False) -> int:
    """A rank failed (an exception out of training, or the watchdog's fatal hook with its report).
    The first rank of the attempt to get here judges the attempt's first failure, records it and
    requeues when the rules allow; returns this rank's exit code (LOCAL_REQUEUE_CODE for a local
    requeue, EXIT_FAILURE after a SLURM requeue or for a rank that left the decision to another,
    EXIT_USER_ERROR for bad input, 1 for a failure that is not retried)."""
    if not _claim(ctx):
        _wait_decided(ctx)
        return EXIT_USER_ERROR if bad_input else EXIT_FAILURE
    code = 1
    try:
        code = _decide(entry, ctx, report, exc, bad_input)
    finally:
        with contextlib.suppress(OSError):
            _decided_path(ctx).write_text(f"{code}\n")
    return code


def _decide(entry: JobEntry, ctx: TaskContext, report: dict[str, Any] | None, exc: BaseException | None,
            bad_input: bool) -> int:
    st = record.read_state(ctx.run_dir) or record.RunState()
    if st.cancel_requested:
        _record(entry, ctx, state=record.CANCELLED, message="cancelled")
        return 0
    found = attempt_failures(ctx.run_dir, ctx.restarts, since=ctx.started - 5.0 if ctx.started else 0.0)
    mine = report or (failure_from_exception(exc, ctx.rank, ctx.restarts, record.last_metrics(ctx.run_dir).get("step"), now()) if exc is not None else {"kind": "exception", "rank": ctx.rank})
    first = found[0] if found else mine
    if bad_input:
        first = {**mine, "kind": "bad_input"}
    verdict = judge(first, st.last_failure, st.failures, entry.max_failures, bad_input=bad_input)
    if verdict.requeue and not entry.requeue:
        verdict = Verdict(False, f"requeue disabled: {verdict.rule}", verdict.counted, verdict.blame)
    line = record.failure_line(summary(first, verdict, ctx.restarts, []))
    if not verdict.requeue:
        _note_failure(entry, ctx, first, verdict, ctx.restarts, st.failures, state=record.FAILED,
                      message=str(mine.get("message")) if bad_input else f"failed: {line}")
        print(f"[job] failed, not requeued: {line}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR if bad_input else 1
    restarts = ctx.restarts + 1
    _note_failure(entry, ctx, first, verdict, ctx.restarts, st.failures, state=record.REQUEUED,
                  restarts=restarts, message=f"requeued (restart {restarts}) after {line}")
    print(f"[job] requeued (restart {restarts}) after {line}", file=sys.stderr, flush=True)
    if entry.executor in ("local", "debug"):
        return LOCAL_REQUEUE_CODE
    assert ctx.job_id is not None
    if entry.executor != "debug":
        _quiet_signals()
    try:
        requeue_slurm(entry, ctx.job_id)
    except CommandError as exc_rq:
        msg = (f"{line}; job {ctx.job_id} could not be requeued ({exc_rq}): "
               f"`python launch/sweep.py resubmit {entry.sweep_dir} --failed` resumes from the last checkpoint")
        _record(entry, ctx, state=record.FAILED, restarts=ctx.restarts, message=msg)
        print(f"[job] {msg}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


def note_node_failure(entry: JobEntry, ctx: TaskContext) -> int | None:
    """At the start of a requeued SLURM attempt (rank 0): when SLURM ended the previous attempt
    with NODE_FAIL (no signal, no report of ours), count it as a transient failure blamed on the
    nodes the watchdog saw lost, else on those of the attempt's nodes SLURM has out of service now
    (DOWN, DRAIN, ...), else on all of them (the node is back already). An attempt already counted (a
    surviving rank's lost connection) is corrected, not counted twice. Returns an exit code when
    max_failures is exceeded (the job must not train), else None."""
    assert ctx.job_id is not None
    rows = slurm.attempts(ctx.job_id)
    if not rows or len(rows) < 2 or rows[-2][0] != "NODE_FAIL":
        return None
    prev, nodelist = ctx.restarts - 1, rows[-2][1]
    st = record.read_state(ctx.run_dir) or record.RunState()
    last = st.last_failure or {}
    if last.get("restart") == prev and last.get("kind") == "node_fail":
        return None  # noted already
    counted = last.get("restart") == prev
    before = st.failures - 1 if counted and st.failures > 0 else st.failures
    lost = [r["blamed_host"] for r in attempt_failures(ctx.run_dir, prev)
            if r.get("kind") in ("peer_lost", "hang") and isinstance(r.get("blamed_host"), str)]
    failure = {"kind": "node_fail", "rank": None, "host": nodelist, "step": last.get("step"),
               "exc_type": None, "message": f"SLURM ended attempt {prev} with NODE_FAIL ({nodelist})",
               "hosts": sorted(set(lost)) or failed_nodes(nodelist)}
    verdict = judge(failure, None, before, entry.max_failures)
    if verdict.requeue:
        _note_failure(entry, ctx, failure, verdict, prev, before)
        print(f"[job] {record.failure_line(summary(failure, verdict, prev, failure['hosts']))}",
              file=sys.stderr, flush=True)
        return None
    line = record.failure_line(summary(failure, verdict, prev, []))
    _note_failure(entry, ctx, failure, verdict, prev, before, state=record.FAILED, message=f"failed: {line}")
    print(f"[job] not training: {line}", file=sys.stderr, flush=True)
    return 1


def failed_nodes(nodelist: str) -> list[str]:
    """Which of a NODE_FAIL attempt's nodes to blame when no rank said: the ones SLURM has out of
    service now, else all (a healthy node blamed for a neighbour's death counts toward its exclusion)."""
    hosts = slurm.hostnames(nodelist)
    return (slurm.out_of_service(hosts) or hosts) if len(hosts) > 1 else hosts


_HOOKED: list[tuple[JobEntry, TaskContext]] = []  # this process's current attempt, for the fatal hook


def _register_fatal_hook(entry: JobEntry, ctx: TaskContext) -> None:
    """Let gpt2's watchdog (a hang, a lost peer) hand its report to `decide_failure` before it ends
    the process; once per process, pointing at the current attempt. Nothing to do while the
    trainer has no watchdog module."""
    first = not _HOOKED
    _HOOKED[:] = [(entry, ctx)]
    if not first or importlib.util.find_spec("gpt2.watchdog") is None:
        return
    from gpt2 import watchdog  # type: ignore[attr-defined,unused-ignore]

    def on_fatal(report: dict[str, Any]) -> int:
        e, c = _HOOKED[0]
        return decide_failure(e, c, report=report)

    watchdog.on_fatal(on_fatal)


def run_in_process(entry: JobEntry, train_fn: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The debug executor: one process, and a requeue is simply another attempt here."""
    while True:
        try:
            return run_task(entry, train_fn)
        except SystemExit as exc:
            if exc.code != LOCAL_REQUEUE_CODE:
                raise


def _touch(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    except OSError:
        pass


# ---- a plain entry point, for the scripts launch/render.py writes ---------------------------


def main(argv: list[str] | None = None) -> int:
    """`srun python launch/job.py --sweep-dir D --job J [...] -- overrides`: one rank of a job
    submitted by hand (no submitit pickle); the same set-up, training and requeue as above."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--sweep-dir", required=True)
    p.add_argument("--job", required=True)
    p.add_argument("--time-limit-min", type=float, default=None)
    p.add_argument("--signal-lead-s", type=float, default=60.0)
    p.add_argument("--max-timeouts", type=int, default=3)
    p.add_argument("--max-failures", type=int, default=3)
    p.add_argument("--no-requeue", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    from gpt2.compose import load_config

    try:
        cfg = load_config(args.overrides)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    executor = "slurm" if os.environ.get("SLURM_JOB_ID") else "debug"
    if executor == "slurm":
        os.environ.setdefault("SUBMITIT_EXECUTOR", "slurm")
    entry = JobEntry(cfg=cfg, sweep_dir=args.sweep_dir, job=args.job, executor=executor,
                     time_limit_s=args.time_limit_min * 60 if args.time_limit_min else None,
                     signal_lead_s=args.signal_lead_s, max_timeouts=args.max_timeouts,
                     requeue=not args.no_requeue, max_failures=args.max_failures)
    entry()
    return 0


if __name__ == "__main__":
    sys.exit(main())
