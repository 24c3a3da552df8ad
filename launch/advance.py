"""Durable decisions of an early-stopping sweep: `python launch/sweep.py advance SWEEP [--watch]`.

    <sweep>/decisions.jsonl    one line per decision ("decided", with the numbers it was based
                               on) and one per completed action ("done"); appended under the
                               sweep record's lock, never rewritten

`advance` reads what the trials recorded (state.json, the metric rows of metrics.jsonl), asks
the rule (launch/asha.py) for the decisions not made yet, appends them as "decided", THEN acts:
a promoted trial is submitted again with the next rung's max_steps (it resumes from its own
checkpoint: max_steps may change between resumes), a stopped one is marked STOPPED_EARLY in its
state.json and the record (its checkpoint stays: `advance SWEEP --resume JOB` continues it by
hand). Then it appends "done". Killed at any moment and run again, it never promotes twice and
never loses a promotion: a decision is made once (its key, trial@rung, is in the file), and an
action is redone only while it is not visible (the record does not show the trial submitted to
the next rung yet; its state.json does not say STOPPED_EARLY yet). Submission itself goes
through the sweep's usual path (`sweep.submit_jobs`, under the lock, skipping a trial that is
already PENDING or RUNNING). A controller killed between sbatch accepting a promoted trial and
the record line naming it leaves the submission's write-ahead line (launch/intent.py): the next
`advance` adopts the job it finds there, in the queue or in the trial's state.json, and never
submits the trial twice.

Who runs it: `sweep.py advance` by hand or from cron; on the local executor, the submit command
itself (`--watch`: a loop until the sweep is finished, or a detached loop with --detach); on
SLURM, a small controller job that runs `advance` once and submits itself again with a delay
(`--begin`), until the sweep is finished; a failed round is the next round's to retry, and
`<sweep>/controller.json` holds how the last round went (`status` shows it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2 import safe_read, safe_write, strict_json
from gpt2.errors import ArgumentParser, UserError, one_line
from launch import asha, intent, record
from launch.asha import Decision, SearchSpec, Trial
from launch.paths import child

DECISIONS = "decisions.jsonl"
EXIT_AFTER_DECIDE = "GPT2_ADVANCE_EXIT_AFTER_DECIDE"  # tests: die (exit 9) after writing new decisions, before acting
MAX_STEPS = "trainer.config.max_steps="


def search_spec(meta: dict[str, Any]) -> SearchSpec | None:
    """sweep.json's search, checked as the experiment file's was (a damaged one could make the rungs
    endless: reduction 1); UserError (one line) when it is damaged."""
    raw = meta.get("search")
    if raw is None:
        return None
    known = {f.name for f in dataclasses.fields(SearchSpec)}
    problem = record.shape_problem(SearchSpec, raw)
    if problem is None and (unknown := sorted(set(raw) - known)):
        problem = f"unknown key '{unknown[0]}'"
    if problem is None:
        problem = SearchSpec(**raw).problem()
    if problem is not None:
        raise record.DamagedSweepFile(f"sweep.json's search is damaged ({one_line(problem)}): restore it from the experiment "
                        f"file's sweep.search")
    return SearchSpec(**raw)


def target_of(overrides: list[str]) -> int:
    """The max_steps a trial's job was submitted with (its last override of it)."""
    for ov in reversed(overrides):
        if ov.startswith(MAX_STEPS):
            value = ov[len(MAX_STEPS):]
            if value.isascii() and value.isdigit() and len(value) < 19:
                return int(value)
            raise record.DamagedSweepFile(f"a trial's override '{one_line(ov)[:60]}' is not {MAX_STEPS}N: the sweep "
                                          "record is damaged")
    raise record.DamagedSweepFile(f"no {MAX_STEPS}N in a trial's overrides: not a trial of an early-stopping sweep")


def with_target(overrides: list[str], steps: int) -> list[str]:
    return [ov for ov in overrides if not ov.startswith(MAX_STEPS)] + [f"{MAX_STEPS}{steps}"]


# ---- decisions.jsonl -------------------------------------------------------------------------


@dataclass
class Log:
    """decisions.jsonl folded: every decision by key, and the keys whose action is done."""

    decided: dict[str, Decision] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    times: dict[str, float] = field(default_factory=dict)


def read_log(sweep_dir: Path) -> Log:
    log = Log()
    try:
        lines = safe_read.read_text(Path(sweep_dir) / DECISIONS).splitlines()
    except FileNotFoundError:
        return log
    except OSError as exc:  # what was decided cannot be read: deciding again could differ from what was done
        raise record.DamagedSweepFile(f"{Path(sweep_dir) / DECISIONS} is unreadable ({exc.strerror or exc}): move "
                                      "it aside and restore it; each line is a decision the sweep acted on") from None
    for line in lines:
        try:
            row = strict_json.loads(line)
            if row["state"] == "decided":
                d = Decision.from_dict(row)
                log.decided.setdefault(d.key, d)  # the first word stands
                log.times.setdefault(d.key, float(row.get("time", 0)))
            elif row["state"] == "done":
                log.done.add(row["key"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash mid-write: its decision is made again, identically
    return log


def _append(sweep_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Append under the caller's lock, flushed to disk before anything acts on it."""
    if not rows:
        return
    with safe_write.open_append(sweep_dir / DECISIONS) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# ---- what the trials recorded ----------------------------------------------------------------


def metric_values(run_dir: Path, metric: str) -> dict[int, float | None]:
    """step -> metric from the eval rows of metrics.jsonl (the newest row of a step wins; a
    value that is not a number reads None, NaN stays NaN: both rank last; event rows, such as
    the summary of discarded steps, are passed over)."""
    out: dict[int, float | None] = {}
    try:
        lines = safe_read.read_text(run_dir / "metrics.jsonl").splitlines()
    except OSError:  # none yet, or not a regular file (a FIFO there must not block the controller)
        return out
    for line in lines:
        try:
            row = strict_json.loads(line, nonfinite=True)  # a diverged trial's NaN ranks last
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and metric in row and isinstance(row.get("step"), int) and "event" not in row:
            v = row[metric]
            out[row["step"]] = float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None
    return out


def read_trials(sweep_dir: Path, records: dict[str, record.JobRecord], spec: SearchSpec) -> list[Trial]:
    from launch.executors import local_alive

    trials = []
    for rec in records.values():
        run_dir = child(sweep_dir, rec.job, "job")
        st = record.read_state(run_dir)
        state = st.state if st else rec.state
        if state in record.ACTIVE and rec.executor == "local" and not local_alive(rec.job_id, sweep_dir):
            state = record.FAILED  # its controller is gone without a final word
        values = {s: v for s, v in metric_values(run_dir, spec.metric).items() if s in spec.rungs()}
        trials.append(Trial(rec.job, target_of(rec.overrides), state, values))
    return trials


# ---- advance ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    new: list[Decision]
    promoted: list[str]  # submitted to their next rung by this call
    stopped: list[str]  # marked STOPPED_EARLY by this call
    finished: bool


def advance(sweep_dir: Path) -> Outcome:
    """Decide (durably), then act; safe to run any number of times, concurrently too."""
    sweep_dir = Path(sweep_dir)
    meta = record.read_sweep_meta(sweep_dir)
    spec = search_spec(meta)
    if spec is None:
        raise UserError(f"{sweep_dir} has no sweep.search: nothing to advance (only early-stopping sweeps have rungs)")
    m = record.SweepRecord(sweep_dir)
    with m.locked():
        records = m.read()
        log = read_log(sweep_dir)
        new = asha.decide(spec, read_trials(sweep_dir, records, spec), log.decided)
        now = time.time()
        _append(sweep_dir, [{"key": d.key, "state": "decided", "time": now, **d.to_dict()} for d in new])
    if new and os.environ.get(EXIT_AFTER_DECIDE):
        os._exit(9)  # the test's kill: decisions written, nothing acted on
    log = read_log(sweep_dir)
    promoted = _promote(sweep_dir, meta, log)
    stopped = _stop(sweep_dir, log)
    records = m.read()
    log = read_log(sweep_dir)
    done = asha.finished(spec, read_trials(sweep_dir, records, spec), log.decided)
    return Outcome(new, promoted, stopped, done)


def _promote(sweep_dir: Path, meta: dict[str, Any], log: Log) -> list[str]:
    """Submit every promoted trial whose record does not show it at its next rung yet."""
    from launch import sweep as sw
    from launch.experiment import load_profile, parse_resources

    records = record.SweepRecord(sweep_dir).read()
    todo = [d for d in log.decided.values() if d.action == asha.PROMOTE and d.next_rung is not None
            and d.trial in records and target_of(records[d.trial].overrides) < d.next_rung]
    if todo:
        res = parse_resources(meta["resources"], f"{sweep_dir}/sweep.json")
        sweep = sw.Sweep(sweep_dir, meta["name"], meta["executor"], load_profile(meta["cluster"]), res, meta)
        prepared = sw.prepare(sweep, [(d.trial, with_target(records[d.trial].overrides, d.next_rung))
                                      for d in todo if d.next_rung is not None])
        retry = {record.COMPLETED} | record.RETRYABLE  # never an ACTIVE one: that is a submission already made
        sw.submit_jobs(sweep, prepared, retry=retry, check_hash=False)
    records = record.SweepRecord(sweep_dir).read()
    shown = [d for d in log.decided.values() if d.action == asha.PROMOTE and d.next_rung is not None
             and d.trial in records and target_of(records[d.trial].overrides) >= d.next_rung]
    _mark_done(sweep_dir, [d for d in shown if d.key not in log.done])
    return [d.trial for d in todo if d in shown]


def _stop(sweep_dir: Path, log: Log) -> list[str]:
    """Mark stopped trials STOPPED_EARLY (state.json, then the record); their checkpoints stay."""
    m = record.SweepRecord(sweep_dir)
    trials = m.read()  # a decision naming no trial of the sweep (a damaged line) stops nothing
    todo = [d for d in log.decided.values() if d.action == asha.STOP and d.key not in log.done and d.trial in trials]
    for d in todo:
        run_dir = child(sweep_dir, d.trial, "job")
        why = f"stopped early at step {d.rung}: rank {d.rank + 1} of {d.reported}, {d.cut} continue"
        record.update_state(run_dir, state=record.STOPPED_EARLY, message=why)
        m.update(d.trial, state=record.STOPPED_EARLY, message=why)
    _mark_done(sweep_dir, todo)
    return [d.trial for d in todo]


def _mark_done(sweep_dir: Path, decisions: list[Decision]) -> None:
    if decisions:
        with record.SweepRecord(sweep_dir).locked():
            _append(sweep_dir, [{"key": d.key, "state": "done", "time": time.time()} for d in decisions])


def resume_by_hand(sweep_dir: Path, job: str, steps: int | None) -> None:
    """Continue a STOPPED_EARLY trial from its checkpoint to `steps` (default: the search's max_steps)."""
    from launch import sweep as sw
    from launch.experiment import load_profile, parse_resources

    meta = record.read_sweep_meta(sweep_dir)
    spec = search_spec(meta)
    records = record.SweepRecord(sweep_dir).read()
    rec = sw.pick(records, job, sweep_dir)
    if rec.state != record.STOPPED_EARLY:
        raise UserError(f"job {rec.job} is {rec.state}, not {record.STOPPED_EARLY}: only stopped trials resume by hand")
    target = steps or (spec.max_steps if spec else target_of(rec.overrides))
    reached = max([target_of(rec.overrides), *(d.rung for d in read_log(sweep_dir).decided.values()
                                               if d.trial == rec.job)])
    if target <= reached:  # main.py would find its checkpoint already there and stop at once
        raise UserError(f"--steps {target}: job {rec.job} was stopped at step {reached}; give a step above it "
                        f"(or leave --steps out for the search's max_steps)")
    res = parse_resources(meta["resources"], f"{sweep_dir}/sweep.json")
    sweep = sw.Sweep(sweep_dir, meta["name"], meta["executor"], load_profile(meta["cluster"]), res, meta)
    prepared = sw.prepare(sweep, [(rec.job, with_target(rec.overrides, target))])
    sw.submit_jobs(sweep, prepared, retry={record.STOPPED_EARLY}, check_hash=False)


# ---- controllers -----------------------------------------------------------------------------


def describe(out: Outcome) -> list[str]:
    lines = [why(d) for d in out.new]
    if out.promoted:
        lines.append(f"submitted to their next rung: {', '.join(out.promoted)}")
    return lines


def why(d: Decision) -> str:
    value = dict(d.ranking).get(d.trial)  # a number or None (Decision.from_dict checks)
    shown = "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"
    what = f"promoted to {d.next_rung}" if d.action == asha.PROMOTE else "stopped"
    closed = ", rung closed" if d.closed else ""
    return (f"{d.trial} at step {d.rung}: {what} (metric {shown}, rank {d.rank + 1} of {d.reported} reported "
            f"of {d.trials}, top {d.cut} continue{closed})")


def watch(sweep_dir: Path, poll_s: float = 2.0, quiet: bool = False) -> int:
    """Advance until the sweep is finished (the local executor's controller)."""
    while True:
        out = advance(sweep_dir)
        for line in [] if quiet else describe(out):
            print(line, flush=True)
        if out.finished:
            return 0
        time.sleep(poll_s)


def after_submit(sweep_dir: Path, detach: bool, code: int = 0) -> int:
    """Start what follows a sweep with a search or a chain (launch/chain.py) once it is submitted."""
    from launch import chain, slurm

    meta = record.read_sweep_meta(sweep_dir)
    executor = meta["executor"]
    if search_spec(meta) is None:  # a plain sweep with a chain
        if executor == "slurm":
            ids = [r.job_id.split("_")[0] for r in record.SweepRecord(sweep_dir).read().values() if r.job_id]
            queued = chain.submit_slurm(sweep_dir, ids)
            print(f"  chain: {', '.join(f'{k} (job {v})' for k, v in queued.items())}")
        elif not detach:
            return chain.run_local(sweep_dir) or code
        else:
            print(f"  chain: run it when the sweep is over: python launch/sweep.py chain {sweep_dir}")
        return code
    if executor != "slurm" and not detach:
        print(f"following the sweep: decisions in {sweep_dir / DECISIONS}", flush=True)
        watch(sweep_dir)
        for line in summary_lines(sweep_dir):
            print(line)
        return chain.run_local(sweep_dir)
    if executor == "slurm":
        if queued := intent.queued_with(intent.sweep_tag("advance", sweep_dir)):  # one controller is enough
            print(f"  controller: SLURM job {queued[0]} already advances the sweep")
            return 0
        job_id = slurm.submit_wrapped(controller_argv(sweep_dir), f"{meta['name']}-advance", _controller_log(sweep_dir),
                                      where=meta["resources"], comment=intent.sweep_tag("advance", sweep_dir))
        print(f"  controller: SLURM job {job_id} runs `advance` every {CONTROLLER_DELAY_S} s until the sweep is done")
        return 0
    log = sweep_dir / "logs" / "controller.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with safe_write.open_append(log) as f:
        proc = subprocess.Popen([sys.executable, *controller_argv(sweep_dir, watch=True)], stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
    print(f"  controller: process {proc.pid} advances the sweep (log {log})")
    return 0


CONTROLLER_DELAY_S = int(os.environ.get("GPT2_ADVANCE_DELAY_S") or 60)  # between SLURM controller rounds
ROOT = Path(__file__).resolve().parent.parent


def _controller_log(sweep_dir: Path) -> Path:
    return Path(sweep_dir).absolute() / "logs" / "controller-%j.out"


def controller_argv(sweep_dir: Path, watch: bool = False, failures: int = 0) -> list[str]:
    flag = "--watch" if watch else "--controller"
    more = ["--failures", str(failures)] if failures else []
    return [str(ROOT / "launch" / "sweep.py"), "advance", str(Path(sweep_dir).absolute()), flag, *more]


CONTROLLER = "controller.json"  # <sweep>/controller.json: how the SLURM controller's last round went
CONTROLLER_MAX_FAILURES = 30  # rounds in a row that fail before the controller stops submitting itself


def run_controller_once(sweep_dir: Path, failures: int = 0) -> int:
    """The SLURM controller job: advance once, then submit itself again unless the sweep is done.

    A round that fails (the sweep's lock busy for minutes, squeue or sbatch refusing for a while,
    such as a QOS limit on queued jobs) is retried by the next round, so a passing problem never
    leaves a sweep without its driver; `CONTROLLER_MAX_FAILURES` rounds in a row stop it, and
    `status` says so and how to start it again. Exit 1 for a failed round (sacct shows FAILED).
    """
    from launch import slurm

    job = os.environ.get("SLURM_JOB_ID")
    try:
        out = advance(sweep_dir)
        for line in describe(out):
            print(line, flush=True)
        if out.finished:
            for line in summary_lines(sweep_dir):
                print(line)
            from launch.chain import follow_up

            follow_up(sweep_dir)
            _note_round(sweep_dir, "FINISHED", job, "the sweep is finished")
            return 0
        state, code, what = "ADVANCING", 0, "; ".join(describe(out)) or "nothing to decide"
        failures = 0
    except Exception as exc:  # noqa: BLE001 - any failure of a round is the next round's to retry
        failures += 1
        state, code, what = "RETRYING", 1, f"{type(exc).__name__}: {one_line(str(exc))}"
        print(f"advance failed ({failures} round(s) in a row, at most {CONTROLLER_MAX_FAILURES}): {what}", flush=True)
        if not isinstance(exc, UserError):
            traceback.print_exc()
        if failures >= CONTROLLER_MAX_FAILURES:
            _note_round(sweep_dir, "STOPPED", job, f"{failures} rounds in a row failed, the last: {what}", failures)
            print(f"the controller stops: start it again with `{_restart(sweep_dir)}`", flush=True)
            return 1
    try:
        meta = record.read_sweep_meta(sweep_dir)
        nxt = slurm.submit_wrapped(controller_argv(sweep_dir, failures=failures), f"{meta['name']}-advance",
                                   _controller_log(sweep_dir), delay_s=CONTROLLER_DELAY_S, where=meta["resources"],
                                   comment=intent.sweep_tag("advance", sweep_dir))
    except Exception as exc:  # noqa: BLE001
        why = f"could not submit the next round ({type(exc).__name__}: {one_line(str(exc))})"
        _note_round(sweep_dir, "STOPPED", job, f"{why}; this round: {what}", failures)
        print(f"the controller stops: {why}: start it again with `{_restart(sweep_dir)}`", flush=True)
        return 1
    _note_round(sweep_dir, state, job, what, failures, nxt)
    return code


def _restart(sweep_dir: Path) -> str:
    return f"python launch/sweep.py advance {Path(sweep_dir).absolute()} --controller"


def _note_round(sweep_dir: Path, state: str, job: str | None, message: str, failures: int = 0,
                next_job: str | None = None) -> None:
    row = {"state": state, "job": job, "next_job": next_job, "failures": failures, "message": message,
           "time": time.time()}
    with contextlib.suppress(OSError):  # a round's note must never be what stops the sweep
        record.atomic_write(Path(sweep_dir) / CONTROLLER, json.dumps(row) + "\n")


def controller_line(sweep_dir: Path, finished: bool) -> list[str]:
    """For `status` of an early-stopping sweep on SLURM: whether a controller drives it, and its last round."""
    try:
        last = strict_json.loads(safe_read.read_text(Path(sweep_dir) / CONTROLLER))
        last = last if isinstance(last, dict) else {}
    except (OSError, ValueError):
        last = {}
    ago = f", {time.time() - float(last['time']):.0f} s ago" if isinstance(last.get("time"), int | float) else ""
    said = f" (last round{ago}: {one_line(str(last.get('message')))})" if last else ""
    if finished:
        return [] if last.get("state") in (None, "FINISHED") else [f"controller: done{said}"]
    try:
        queued = intent.queued_with(intent.sweep_tag("advance", sweep_dir))
    except UserError:
        return [f"controller: unknown (squeue failed){said}"]
    if queued:
        return [f"controller: SLURM job {queued[0]}{said}"]
    return [f"controller: none queued, so the sweep is not advancing{said}: start it again with "
            f"`{_restart(sweep_dir)}`"]


# ---- status and summary ----------------------------------------------------------------------


def rung_steps(sweep_dir: Path) -> list[int]:
    """The rungs of an early-stopping sweep (for `make plot`); [] for any other directory."""
    try:
        spec = search_spec(record.read_sweep_meta(sweep_dir))
    except UserError:
        return []
    return spec.rungs()[:-1] if spec else []


def rung_lines(sweep_dir: Path) -> list[str]:
    """For `status`: each rung's reports, promotions and stops, and why; then the chain's steps
    (launch/chain.py). Empty for a sweep with neither."""
    from launch.chain import chain_lines

    return _rungs(sweep_dir) + chain_lines(sweep_dir)


def _rungs(sweep_dir: Path) -> list[str]:
    try:
        meta = record.read_sweep_meta(sweep_dir)
        spec = search_spec(meta)
        if spec is None:
            return []
        log = read_log(sweep_dir)
        trials = read_trials(sweep_dir, record.SweepRecord(sweep_dir).read(), spec)
    except record.DamagedSweepFile as exc:  # shown, the table above it; `advance` refuses it in one line
        return [f"search: {exc}"]
    except UserError:
        return []
    lines = [f"search: {spec.kind} on {spec.metric} ({spec.mode}), rungs {', '.join(map(str, spec.rungs()))}, "
             f"keep 1/{spec.reduction}"]
    for rung in spec.rungs():
        n = len(asha.reports(spec, trials, rung))
        if rung == spec.max_steps:
            done = [t.name for t in trials if t.target == rung and t.state == asha.COMPLETED]
            lines.append(f"  rung {rung} (the end): {n} of {len(trials)} reported; completed {', '.join(done) or '-'}")
            continue
        ds = [d for d in log.decided.values() if d.rung == rung]
        up = [d.trial for d in ds if d.action == asha.PROMOTE]
        cut = [d.trial for d in ds if d.action == asha.STOP]
        lines.append(f"  rung {rung}: {n} of {len(trials)} reported; promoted {', '.join(up) or '-'}; "
                     f"stopped {len(cut)}")
    lines += [f"    {why(d)}" + ("" if d.key in log.done else " [not acted on yet]")
              for d in sorted(log.decided.values(), key=lambda d: (d.rung, d.action != asha.PROMOTE, d.rank))]
    if meta.get("executor") == "slurm":
        lines += controller_line(sweep_dir, asha.finished(spec, trials, log.decided))
    return lines


def summary_lines(sweep_dir: Path) -> list[str]:
    """The final ranking, and the compute used against what the full grid would have cost."""
    meta = record.read_sweep_meta(sweep_dir)
    spec = search_spec(meta)
    assert spec is not None
    records = record.SweepRecord(sweep_dir).read()
    trials = read_trials(sweep_dir, records, spec)
    ranked = sorted(trials, key=lambda t: (-max(t.values, default=0),
                                           asha.sort_key(spec.mode, t.name, t.values.get(max(t.values, default=0)))))
    lines = ["final ranking (furthest rung first, then the metric there):"]
    for i, t in enumerate(ranked):
        step = max(t.values, default=None)
        v = t.values.get(step) if step is not None else None
        lines.append(f"  {i + 1}. {t.name}: {spec.metric} {'-' if v is None else f'{v:.4f}'} at step {step} ({t.state})")
    used, full = compute_used(sweep_dir, records, spec, meta)
    res = meta.get("resources", {})
    devices = int(res.get("nodes", 1)) * (int(res.get("gpus_per_node") or 0) or int(res.get("tasks_per_node", 1)))
    unit = "GPU-hours" if int(res.get("gpus_per_node") or 0) else "process-hours (CPU)"
    steps = sum(target_of(r.overrides) for r in records.values())
    lines.append(f"compute: {steps} trial-steps of {len(records) * spec.max_steps} for the full grid "
                 f"({100 * steps / max(1, len(records) * spec.max_steps):.0f}%); {used * devices:.4f} {unit} used, "
                 f"~{full * devices:.4f} for the full grid at the measured step times")
    return lines


def compute_used(sweep_dir: Path, records: dict[str, record.JobRecord], spec: SearchSpec,
                 meta: dict[str, Any]) -> tuple[float, float]:
    """(hours used, hours the full grid would have taken), from the step times each trial logged."""
    used = full = 0.0
    for rec in records.values():
        times: dict[int, float] = {}
        try:
            for line in safe_read.read_text(child(sweep_dir, rec.job, "job") / "metrics.jsonl").splitlines():
                row = strict_json.loads(line, nonfinite=True)
                if isinstance(row, dict) and isinstance(row.get("step_time"), int | float) and "step" in row \
                        and "event" not in row:
                    times[row["step"]] = float(row["step_time"])
        except (OSError, ValueError):
            continue
        if times:
            mean = sum(times.values()) / len(times)
            done = max(times)
            used += mean * done / 3600
            full += mean * spec.max_steps / 3600
    return used, full


# ---- command line ----------------------------------------------------------------------------


def cmd_advance(argv: list[str]) -> int:
    p = ArgumentParser(prog="launch/sweep.py advance",
                       description="Make the early-stopping decisions the records call for, then act on them.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--watch", action="store_true", help="repeat until the sweep is finished (local controller)")
    p.add_argument("--controller", action="store_true", help="advance once, then resubmit this as a SLURM job")
    p.add_argument("--failures", type=int, default=0, help=argparse.SUPPRESS)  # --controller: failed rounds so far
    p.add_argument("--poll", type=float, default=2.0, help="seconds between rounds of --watch")
    p.add_argument("--resume", metavar="JOB", help="continue a STOPPED_EARLY trial from its checkpoint by hand")
    p.add_argument("--steps", type=int, help="with --resume: train to this step (default: the search's max_steps)")
    args = p.parse_args(argv)
    if not 0.0 < args.poll <= 3600.0:  # (nan fails this too)
        p.error(f"--poll {args.poll}: give seconds between 0 and 3600")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: give a step >= 1 (or leave it out for the search's max_steps)")
    if args.resume:
        resume_by_hand(args.sweep_dir, args.resume, args.steps)
        return 0
    if args.controller:
        return run_controller_once(args.sweep_dir, args.failures)
    if args.watch:
        code = watch(args.sweep_dir, args.poll)
        for line in summary_lines(args.sweep_dir):
            print(line)
        from launch.chain import follow_up

        follow_up(args.sweep_dir)
        return code
    out = advance(args.sweep_dir)
    for line in describe(out) or ["nothing to decide"]:
        print(line)
    if out.finished:
        print("the sweep is finished")
        for line in summary_lines(args.sweep_dir):
            print(line)
    return 0
