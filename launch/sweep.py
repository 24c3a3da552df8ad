"""Submit an experiment as a sweep, and look after it.

    python launch/sweep.py jobs/X.yaml [key=value ...] [--executor slurm|local|debug]
                                       [--dry-run] [--detach] [--name NAME]
    python launch/sweep.py status   SWEEP_DIR [--json]
    python launch/sweep.py cancel   SWEEP_DIR [JOB]
    python launch/sweep.py resubmit SWEEP_DIR --failed [--cancelled] [--executor E] [--detach]
    python launch/sweep.py logs     SWEEP_DIR JOB [--rank N] [--err] [-n LINES] [--traceback]
    python launch/sweep.py nodes    SWEEP_DIR [--clear HOST]
    python launch/sweep.py advance  SWEEP_DIR [--watch | --controller | --resume JOB [--steps N]]
    python launch/sweep.py chain    SWEEP_DIR [--run STEP]

A sweep lives in $RUNS_DIR/<experiment> (default runs/). Submitting the same experiment again
is idempotent: jobs already COMPLETED, PENDING, RUNNING or REQUEUED are left alone; FAILED and
TIMEOUT jobs are submitted again and resume from their last checkpoint. SLURM submission
returns once sbatch has queued the jobs; local jobs are followed to the end with a progress
bar (`--detach` returns at once). Every bad input is one line on stderr and exit code 2,
before anything is submitted or overwritten. JOB is a job's name, its index in `status`, or a
unique prefix of its name.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2.errors import ArgumentParser, UserError, one_line, report
from launch import executors as ex
from launch import goodput, intent, record, slurm, status
from launch.advance import after_submit, cmd_advance
from launch.chain import cmd_chain
from launch.experiment import (
    ClusterProfile,
    Composer,
    Resources,
    check_resources,
    config_hash,
    load_experiment,
    load_profile,
    parse_resources,
    runs_root,
    set_launch_fields,
)
from launch.paths import child
from launch.plan import Plan, format_plan, make_plan, signal_lead_s
from launch.status import cmd_status, refresh, status_records, warn

EXECUTORS = record.EXECUTORS


@dataclass
class Prepared:
    """A job ready to submit: its resolved config and what the sweep record keeps about it."""

    name: str
    overrides: list[str]
    cfg: Any
    hash: str
    plan: Plan


@dataclass
class Sweep:
    dir: Path
    name: str
    executor: str
    profile: ClusterProfile
    resources: Resources
    meta: dict[str, Any]


# ---- submit ----------------------------------------------------------------------------------


def cmd_submit(argv: list[str]) -> int:
    p = ArgumentParser(prog="launch/sweep.py", description="Submit an experiment as a sweep.")
    p.add_argument("experiment", help="jobs/X.yaml (or X)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, resources.KEY=VALUE, cluster=NAME")
    p.add_argument("--executor", choices=EXECUTORS, help="default: the experiment's, else slurm if sbatch exists")
    p.add_argument("--dry-run", action="store_true", help="print configs, sbatch scripts and the plan; submit nothing")
    p.add_argument("--detach", action="store_true", help="local jobs: return at once instead of following them")
    p.add_argument("--name", help="sweep directory name (default: the experiment's name)")
    args = p.parse_intermixed_args(argv)
    for ov in args.overrides:
        slurm.check_line("command-line override", ov)
    exp = load_experiment(args.experiment, args.overrides)
    kind = args.executor or exp.executor or ("slurm" if shutil.which("sbatch") else "local")
    name = args.name or exp.name
    sweep_dir = child(runs_root(), name, "--name" if args.name else "the experiment name")
    profile = load_profile(exp.cluster)
    ex.check_inputs(name, exp.resources, profile, [ov for j in exp.jobs for ov in j.overrides])
    check_resources(exp.resources, profile, kind, ex.local_gpu_count())
    if kind == "slurm" and not args.dry_run:
        slurm.require_slurm()
    if exp.search is not None and kind == "debug":
        raise UserError("sweep.search needs jobs that outlive this command: use --executor local or slurm")
    meta = {"name": name, "experiment": str(exp.path), "cluster": exp.cluster, "executor": kind,
            "resources": exp.resources.to_dict(), "cli_overrides": exp.cli_overrides,
            **({"search": vars(exp.search)} if exp.search else {}),
            **({"after": [vars(s) for s in exp.after]} if exp.after else {})}
    sweep = Sweep(sweep_dir, name, kind, profile, exp.resources, meta)
    prepared = prepare(sweep, [(j.name, j.overrides) for j in exp.jobs])
    if args.dry_run:
        dry_run(sweep, prepared)
        return 0
    for job in prepared:
        check_data(job.cfg)
    if exp.search is not None or exp.after:  # a controller or a chain follows (launch/advance.py, chain.py)
        code = submit_and_report(sweep, prepared, detach=args.detach or exp.search is not None,
                                 retry=record.RETRYABLE, check_hash=True)
        return after_submit(sweep.dir, detach=args.detach, code=code)
    return submit_and_report(sweep, prepared, detach=args.detach, retry=record.RETRYABLE, check_hash=True)


def prepare(sweep: Sweep, jobs: list[tuple[str, list[str]]]) -> list[Prepared]:
    """Compose and validate every job's config (all errors surface here, before any submission)."""
    resolver = Composer()
    out = []
    for name, overrides in jobs:
        child(sweep.dir, name, "job")  # its run directory stays inside the sweep
        cfg = resolver.compose(overrides)
        set_launch_fields(cfg, sweep.dir, sweep.name, name, sweep.resources)
        out.append(Prepared(name, overrides, cfg, config_hash(cfg), make_plan(cfg, sweep.resources.world_size)))
    return out


def check_data(cfg: Any) -> None:
    for key, split in (("train_dataset", cfg.dataset.train_dataset), ("val_dataset", cfg.dataset.val_dataset)):
        if not Path(split.data_root).is_dir():
            raise UserError(f"dataset.{key}.data_root {split.data_root} does not exist: prepare the data first "
                            f"(`make data-pydoc` for the built-in corpus) or override the path")


def lead_for(sweep: Sweep, prepared: list[Prepared]) -> int:
    r, prof = sweep.resources, sweep.profile
    return max(signal_lead_s(j.plan, r.time, prof.min_signal_lead_s, prof.checkpoint_write_mb_s, r.signal_lead_s)
               for j in prepared)


def dry_run(sweep: Sweep, prepared: list[Prepared]) -> None:
    from gpt2.config import to_yaml

    r = sweep.resources
    lead = lead_for(sweep, prepared)
    part = sweep.profile.partition(r.partition)
    gpu_mem = part.gpu_mem_gb if part and r.gpus_per_node else None
    print(f"# dry run: sweep {sweep.dir} ({len(prepared)} jobs, executor {sweep.executor}, cluster "
          f"{sweep.profile.name}); nothing is submitted or written")
    for i, job in enumerate(prepared):
        print(f"\n=== job {i}: {job.name}  (config hash {job.hash})")
        print("overrides: " + " ".join(job.overrides))
        print("--- resolved config")
        print(to_yaml(job.cfg).rstrip())
        print("--- plan")
        print(format_plan(job.plan, gpu_mem, lead))
        if (line := interval_line(sweep, job)) is not None:
            print(f"  {line}")
    snapshot = ex.snapshot_path(sweep.dir)
    if sweep.executor == "slurm":
        params = ex.slurm_parameters(sweep.name, r, sweep.profile, lead, snapshot, record.excluded_hosts(sweep.dir))
        folder = (sweep.dir / "logs" / "%j").absolute()
        for start, stop, per in ex.array_chunks(len(prepared), sweep.profile.max_array_size, r.array_parallelism):
            n = stop - start
            what = f"jobs {start}-{stop - 1} as an array" if n > 1 else f"job {start}"
            print(f"\n=== sbatch script for {what} (submitit writes it to {folder.parent}/<job id>/; "
                  f"TOKEN: each submission's own, launch/intent.py)")
            print(ex.sbatch_script({**params, "array_parallelism": per, "comment": intent.slurm_comment("TOKEN", start)},
                                   folder, map_count=n).rstrip())
    else:
        print(f"\n=== {sweep.executor} executor: each job runs {r.ntasks_per_node} process(es) on this machine "
              f"from {snapshot}; time limit {r.time} min, USR2 {lead} s before it (emulated)")


def interval_line(sweep: Sweep, job: Prepared) -> str | None:
    """Why `interval: auto` will save as often as it will (None for a fixed interval)."""
    from gpt2.checkpoint.interval import explain_plan
    from gpt2.config import fixed_interval

    ck = job.cfg.trainer.config.checkpoint_strategy.config
    if fixed_interval(ck) is not None:
        return None
    prof = sweep.profile
    seen = goodput.sweep_mtbi(sweep.dir) if record.SweepRecord(sweep.dir).exists() else None
    m, source = (seen[0], f"this sweep's ledger, {seen[1]} interruption(s)") if seen else \
        (prof.mtbi_hours * 3600.0, f"cluster {prof.name} mtbi_hours")
    save_s = job.plan.checkpoint_gib * 1024 / max(1.0, prof.checkpoint_write_mb_s)
    return explain_plan(save_s, f"checkpoint size / {prof.checkpoint_write_mb_s:g} MB/s", m, source, ck.max_interval)


def submit_and_report(sweep: Sweep, prepared: list[Prepared], detach: bool, retry: frozenset[str] | set[str],
                      check_hash: bool) -> int:
    done, skipped = submit_jobs(sweep, prepared, retry=retry, check_hash=check_hash)
    print(f"sweep {sweep.dir}")
    if skipped:
        states = ", ".join(f"{n} {s}" for s, n in sorted(status.count(skipped).items()))
        print(f"  not submitted again: {len(skipped)} job(s) ({states})")
    if not done:
        print("  nothing to submit")
        return 0
    ids = sorted({s.job_id.split("_")[0] for _, s in done})
    print(f"  submitted {len(done)} job(s) with the {sweep.executor} executor: job id(s) {', '.join(ids[:10])}"
          + (" ..." if len(ids) > 10 else ""))
    for job, s in done[:20]:
        print(f"    {job.name:<40} {s.job_id}")
    print(f"  status: python launch/sweep.py status {sweep.dir}")
    if sweep.executor == "debug":
        return run_debug_jobs(sweep, done)
    if sweep.executor == "local" and not detach:
        return follow_local(sweep, done)
    return 0


def submit_jobs(sweep: Sweep, prepared: list[Prepared], retry: frozenset[str] | set[str],
                check_hash: bool) -> tuple[list[tuple[Prepared, ex.Submitted]], list[str]]:
    """Under the sweep's lock: refresh states, submit the jobs that need it, record them.

    A job is submitted when it is not in the sweep record yet or its state is in `retry`; jobs in
    any other state are skipped (their states are returned). Holding the lock for the whole
    submission makes two concurrent submissions of the same sweep submit each job once; the
    write-ahead line (launch/intent.py) makes a submission killed half-way and the next one
    submit each job once too.
    """
    from launch.job import JobEntry

    m = record.SweepRecord(sweep.dir)
    with m.locked():
        records = m.read()
        adopted, problems = intent.recover(sweep.dir, records)
        if adopted:
            m.write(records)
        intent.end(sweep.dir)
        warn(m.skipped + problems + refresh(sweep.dir, records))
        todo, skipped = [], []
        for job in prepared:
            rec = records.get(job.name)
            if rec is not None and check_hash and rec.config_hash != job.hash:
                raise UserError(
                    f"job '{job.name}' of {sweep.dir} was submitted with a different config (hash "
                    f"{rec.config_hash}, now {job.hash}): use --name to start a new sweep, or remove {sweep.dir}"
                )
            if rec is None or (rec.state in retry and not (job.name in adopted and rec.overrides == job.overrides)):
                todo.append(job)
            else:
                skipped.append(rec.state)
        if not todo:
            m.write(records)
            return [], skipped
        record.write_sweep_meta(sweep.dir, {**sweep.meta, "updated": time.time()})
        snapshot = ex.snapshot_code(sweep.dir)
        lead = lead_for(sweep, todo)
        r = sweep.resources
        entries = [JobEntry(cfg=j.cfg, sweep_dir=str(sweep.dir.absolute()), job=j.name, executor=sweep.executor,
                            time_limit_s=r.time * 60.0, signal_lead_s=lead, max_timeouts=r.max_timeouts,
                            requeue=r.requeue, max_failures=r.max_failures,
                            threads=r.cpus_per_task if sweep.executor == "slurm" else None,
                            mtbi_s=sweep.profile.mtbi_hours * 3600.0)
                   for j in todo]
        rows = [_row(sweep, j, records.get(j.name), snapshot) for j in todo]
        # Write ahead what is about to be submitted (a job outlives a launcher killed before it records
        # the job), then reset each run's state: a job may start (and write RUNNING) at once.
        m.write(records)  # a new sweep's record exists from here: `status` and `cancel` find the sweep
        ahead = intent.begin(sweep.dir, sweep.executor, rows) if sweep.executor != "debug" else None
        before = {j.name: record.read_state(j.cfg.run.dir) for j in todo}
        for j in todo:
            prior = before[j.name] or record.RunState()
            record.write_state(j.cfg.run.dir, record.RunState(state=record.PENDING, executor=sweep.executor,
                                                      restarts=prior.restarts, preemptions=prior.preemptions,
                                                      step=prior.step, loss=prior.loss))
        folder = (sweep.dir / "logs" / "%j").absolute()
        done: list[tuple[Prepared, ex.Submitted]] = []
        recorded, settled = 0, False
        try:
            for batch in _submit_batches(sweep, entries, folder, lead, snapshot, ahead):
                if os.environ.get(intent.EXIT_AFTER_SUBMIT):
                    os._exit(9)  # the test's kill: jobs submitted, not recorded
                for s in batch:
                    k = len(done)
                    records[todo[k].name] = record.JobRecord(**{**vars(rows[k]), "job_id": s.job_id,
                                                                "array_index": s.array_index})
                    done.append((todo[k], s))
                m.write(records)
                recorded = len(done)
            settled = True
        except slurm.CommandError:
            settled = recorded == len(done)  # sbatch refused the next batch: none of it is out there
            raise
        finally:
            for j in todo[len(done):]:  # not submitted: put their state back
                prior = before[j.name]
                if prior is not None:
                    record.write_state(j.cfg.run.dir, prior)
                else:
                    (Path(j.cfg.run.dir) / record.STATE).unlink(missing_ok=True)
            if settled:  # else (Ctrl-C, a crash) a job may be out there unrecorded: the next submission looks
                intent.end(sweep.dir)
        return done, skipped


def _row(sweep: Sweep, job: Prepared, old: record.JobRecord | None, snapshot: Path) -> record.JobRecord:
    """The record line of a job about to be submitted (its job id comes once sbatch accepts it)."""
    return record.JobRecord(
        job=job.name, overrides=job.overrides, config_hash=job.hash, executor=sweep.executor,
        state=record.PENDING, restarts=old.restarts if old else 0, last_step=old.last_step if old else None,
        last_loss=old.last_loss if old else None,
        checkpoint_dir=job.cfg.trainer.config.checkpoint_strategy.config.checkpoint_dir,
        submissions=(old.submissions if old else 0) + 1, submitted_at=time.time(), snapshot=str(snapshot),
    )


def _submit_batches(sweep: Sweep, entries: list[Any], folder: Path, lead: int, snapshot: Path,
                    ahead: intent.Intent | None) -> Any:
    r = sweep.resources
    if sweep.executor == "slurm":
        assert ahead is not None
        params = ex.slurm_parameters(sweep.name, r, sweep.profile, lead, snapshot, record.excluded_hosts(sweep.dir))
        size = slurm.max_array_size(sweep.profile.max_array_size)
        return ex.submit_slurm(entries, folder, params, size, r.max_timeouts, comment=ahead.comment)
    if sweep.executor == "local":
        assert ahead is not None
        return [ex.submit_local(entries, folder, r, lead, snapshot, dict(sweep.profile.env), tag=ahead.env)]
    return [ex.submit_debug(entries, folder)]


# ---- following local and debug jobs ----------------------------------------------------------


def follow_local(sweep: Sweep, done: list[tuple[Prepared, ex.Submitted]], poll_s: float = 1.0) -> int:
    """Show one progress bar over all local jobs until their controllers exit; then the final losses."""
    from tqdm import tqdm

    total = sum(j.cfg.trainer.config.max_steps for j, _ in done)
    tty = sys.stderr.isatty()  # in a log file, a line every 30 s instead of a redrawn bar
    bar = tqdm(total=total, unit="step", desc=sweep.name, file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if tty else 30.0)
    try:
        while True:
            finished = all(s.handle.done() for _, s in done)
            rows = [record.last_metrics(j.cfg.run.dir) for j, _ in done]
            losses = [r["loss"] for r in rows if "loss" in r]
            if losses:
                bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", refresh=False)
            steps = sum(int(r.get("step", 0)) for r in rows)
            if steps > bar.n:
                bar.update(steps - bar.n)
            if finished:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: Ctrl-C reached the local jobs too, so they stop; "
              f"see python launch/sweep.py status {sweep.dir}", file=sys.stderr)
        return 130
    bar.close()
    return final_report(sweep)


def run_debug_jobs(sweep: Sweep, done: list[tuple[Prepared, ex.Submitted]]) -> int:
    """Run each job in this process, one after the other (pdb opens on an exception)."""
    for job, s in done:
        print(f"--- running {job.name} in this process")
        try:
            s.handle.result()
        except SystemExit as exc:  # a job's exit 2 (bad input) or 75 ends that job, not the launcher
            print(f"job {job.name} exited with code {exc.code}", file=sys.stderr)
        except Exception as exc:  # the job recorded FAILED in its state.json
            print(f"job {job.name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return final_report(sweep)


def final_report(sweep: Sweep) -> int:
    records = status_records(sweep.dir)
    status.print_table(sweep.dir, records)
    bad = [r for r in records if r.state != record.COMPLETED]
    for r in records:
        if r.state == record.COMPLETED and r.last_loss is not None:
            print(f"{r.job}: final loss {r.last_loss:.4f} at step {r.last_step}")
    if bad:
        print(f"{len(bad)} job(s) did not complete: python launch/sweep.py logs {sweep.dir} {bad[0].job}",
              file=sys.stderr)
        return 1
    return 0


# ---- cancel, resubmit, logs ------------------------------------------------------------------


def pick(records: dict[str, record.JobRecord], ref: str, sweep_dir: Path) -> record.JobRecord:
    """A job by name, index or unique name prefix."""
    names = list(records)
    if ref in records:
        return records[ref]
    if ref.isascii() and ref.isdigit() and len(ref) < 10 and int(ref) < len(names):  # (not ², not 5,000 digits)
        return records[names[int(ref)]]
    hits = [n for n in names if ref and n.startswith(ref)]
    if len(hits) == 1:
        return records[hits[0]]
    shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
    raise UserError(f"no single job '{ref}' in {sweep_dir}: give a name or index from `status` ({shown})")


def cmd_cancel(argv: list[str]) -> int:
    p = ArgumentParser(prog="launch/sweep.py cancel",
                                description="Stop jobs: SLURM's scancel, or SIGTERM to a local job (it saves a "
                                            "checkpoint first); cancelling the same local job again sends SIGINT.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("job", nargs="?", help="one job (default: every unfinished job)")
    args = p.parse_args(argv)
    warn(record.check_sweep_dir(args.sweep_dir))
    m = record.SweepRecord(args.sweep_dir)
    with m.locked():
        records = m.read()
        _, problems = intent.recover(args.sweep_dir, records)  # an interrupted submission's jobs are cancelled too
        warn(m.skipped + problems + refresh(args.sweep_dir, records))
        targets = [pick(records, args.job, args.sweep_dir)] if args.job else list(records.values())
        targets = [r for r in targets if r.state in record.ACTIVE]
        slurm_ids = []
        for r in targets:
            run_dir = child(args.sweep_dir, r.job, "job")
            again = (record.read_state(run_dir) or record.RunState()).cancel_requested
            try:
                record.update_state(run_dir, cancel_requested=True, state=record.CANCELLED, message="cancelled")
            except OSError as exc:  # its run directory is a file (a damaged record names one): cancel it anyway
                warn([f"{run_dir}: cannot hold its state.json ({exc.strerror or exc}); cancelled in the record only"])
            r.state, r.message = record.CANCELLED, "cancelled"
            if r.executor == "slurm" and r.job_id:
                slurm_ids.append(r.job_id)
            elif r.executor == "local":
                _signal_local(r.job_id, args.sweep_dir, hard=again)
        slurm.cancel(slurm_ids)
        m.write(records)
        intent.end(args.sweep_dir)
    print(f"cancelled {len(targets)} job(s) of {args.sweep_dir}" + (f": {', '.join(r.job for r in targets)}"
                                                                      if 0 < len(targets) <= 10 else ""))
    return 0


def _signal_local(pid: str | None, sweep_dir: Path, hard: bool) -> None:
    import signal

    if ex.local_alive(pid, sweep_dir):
        assert pid is not None
        os.kill(int(pid), signal.SIGINT if hard else signal.SIGTERM)


def cmd_resubmit(argv: list[str]) -> int:
    p = ArgumentParser(prog="launch/sweep.py resubmit",
                                description="Submit jobs of a sweep again; they resume from their checkpoints.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--failed", action="store_true", help="FAILED and TIMEOUT jobs")
    p.add_argument("--cancelled", action="store_true", help="CANCELLED jobs")
    p.add_argument("--executor", choices=EXECUTORS)
    p.add_argument("--detach", action="store_true")
    args = p.parse_args(argv)
    if not (args.failed or args.cancelled):
        raise UserError("say which jobs to resubmit: --failed (FAILED and TIMEOUT) and/or --cancelled")
    meta = record.read_sweep_meta(args.sweep_dir)
    kind = args.executor or meta["executor"]
    profile = load_profile(meta["cluster"])
    res = parse_resources(meta["resources"], f"{args.sweep_dir}/sweep.json")
    m = record.SweepRecord(args.sweep_dir)
    records = m.read()
    warn(m.skipped)
    ex.check_inputs(meta["name"], res, profile, [ov for r in records.values() for ov in r.overrides])
    check_resources(res, profile, kind, ex.local_gpu_count())
    if kind == "slurm":
        slurm.require_slurm()
    retry = set(record.RETRYABLE if args.failed else ()) | ({record.CANCELLED} if args.cancelled else set())
    sweep = Sweep(args.sweep_dir, meta["name"], kind, profile, res, {**meta, "executor": kind})
    prepared = prepare(sweep, [(r.job, r.overrides) for r in records.values()])
    for job in prepared:
        check_data(job.cfg)
    return submit_and_report(sweep, prepared, detach=args.detach, retry=retry, check_hash=False)


def cmd_logs(argv: list[str]) -> int:
    p = ArgumentParser(prog="launch/sweep.py logs")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("job")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--err", action="store_true", help="stderr (where tracebacks and the trainer's log go)")
    p.add_argument("-n", "--lines", type=int, default=40)
    p.add_argument("--traceback", action="store_true", help="the tracebacks of the run's first and last failure")
    args = p.parse_args(argv)
    warn(record.check_sweep_dir(args.sweep_dir))
    m = record.SweepRecord(args.sweep_dir)
    records = m.read()
    warn(m.skipped)
    rec = pick(records, args.job, args.sweep_dir)
    if args.traceback:
        return print_tracebacks(child(args.sweep_dir, rec.job, "job"))
    if not rec.job_id:
        raise UserError(f"job {rec.job} was never submitted: nothing to show")
    folder = child(args.sweep_dir / "logs", rec.job_id, "job id")
    path = folder / f"{rec.job_id}_{args.rank}_log.{'err' if args.err else 'out'}"
    run_logs = child(args.sweep_dir, rec.job, "job") / "logs"
    print(f"# {path}  (job {rec.job}, {rec.state}; trainer log: {run_logs}/rank{args.rank}.log)")
    if not path.is_file():
        print(f"# no such file yet ({rec.state}); files here: {', '.join(sorted(f.name for f in folder.glob('*_log.*'))) or 'none'}")
        return 0
    lines = path.read_text(errors="replace").splitlines()
    print("\n".join(lines[-args.lines:] if args.lines > 0 else lines))
    return 0


def cmd_nodes(argv: list[str]) -> int:
    p = ArgumentParser(prog="launch/sweep.py nodes",
                       description="Hosts blamed for this sweep's failures; one blamed "
                                   f"{record.BLAMES_TO_EXCLUDE} times is excluded from its later jobs.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--clear", metavar="HOST", help="forget HOST's blames (it was checked): no longer excluded")
    args = p.parse_args(argv)
    warn(record.check_sweep_dir(args.sweep_dir))
    if args.clear:
        if not record.clear_host(args.sweep_dir, args.clear):
            known = ", ".join(record.read_nodes(args.sweep_dir)) or "none"
            raise UserError(f"no host '{one_line(args.clear)}' in {args.sweep_dir / record.NODES} (blamed hosts: {known})")
        print(f"cleared {args.clear}: no longer excluded from {args.sweep_dir}")
        return 0
    ledger = record.read_nodes(args.sweep_dir)
    if not ledger:
        print(f"no host blamed in {args.sweep_dir}")
        return 0
    rows = [("HOST", "BLAMES", "EXCLUDED", "LAST FAILURE")]
    for b in ledger.values():
        last = b.last
        what = f"{last.get('job')}: {last.get('message')}" if last else ("cleared" if b.cleared else "-")
        rows.append((b.host, str(len(b.blames)), "yes" if b.excluded else "no", what))
    widths = [max(len(row[c]) for row in rows) for c in range(3)]
    for row in rows:
        print("  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[3]]).rstrip())
    return 0


def print_tracebacks(run_dir: Path) -> int:
    """The first failure's traceback (state.json), then the last failed attempt's reports."""
    from launch.job import attempt_failures

    st = record.read_state(run_dir)
    first, last = (st.first_failure, st.last_failure) if st else (None, None)
    if not first:
        print(f"# no failure recorded in {run_dir / record.STATE}")
        return 0
    print(f"# first failure: {record.failure_line(first)}")
    print(str(first.get("traceback") or "(no traceback: not a Python exception)").rstrip())
    if last and last.get("restart") != first.get("restart"):
        print(f"# last failure: {record.failure_line(last)}")
        restart = last.get("restart")
        restart = restart if isinstance(restart, int) and not isinstance(restart, bool) else 0
        for rep in attempt_failures(run_dir, restart)[:1]:
            print(str(rep.get("traceback") or "(no traceback)").rstrip())
    return 0


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "status": cmd_status, "cancel": cmd_cancel, "resubmit": cmd_resubmit, "logs": cmd_logs, "nodes": cmd_nodes,
    "advance": cmd_advance, "chain": cmd_chain,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        if argv and argv[0] == "submit":
            argv = argv[1:]
        return cmd_submit(argv)
    except slurm.CommandError as exc:  # a cluster command failed: not the user's input
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        return 1
    except (UserError, OSError) as exc:
        return report(exc)


if __name__ == "__main__":
    sys.exit(main())
