"""Job chains: steps an experiment runs after its sweep (`after:` in jobs/*.yaml).

    after:
      - {name: export, module: gpt2.export, args: ["{best}", "--out", "{sweep}/export"]}
      - {name: sample, module: gpt2.generate, args: ["{best}", "--max_new_tokens", "20"], after: export}

A step runs `python -m MODULE ARGS` with `{best}` (the run directory of the sweep's best trial,
known only once the sweep is over) and `{sweep}` (the sweep directory) filled in when it runs.
A step without `after` waits for the whole sweep (SLURM `afterany`: it runs whatever the trials'
fates, on the best trial that completed); a step naming an earlier one waits for that one to
succeed (`afterok`). On SLURM the steps are queued with those dependencies (an early-stopping
sweep's controller queues them when the sweep is finished); the local executor runs them in the
same order once the sweep is over, and skips a step whose `after` step failed.

    <sweep>/chain/submitted.json    step -> SLURM job id, written under the sweep's lock (queued once)
    <sweep>/chain/<step>.json       the step's own word: RUNNING, COMPLETED, FAILED, SKIPPED; rc; best
    <sweep>/chain/<step>.log        its output
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2 import safe_read, strict_json
from gpt2.errors import UserError, one_line
from launch import intent, record

MODULES = ("gpt2.export", "gpt2.generate")  # what a step may run
CHAIN = "chain"
SUBMITTED = "submitted.json"


@dataclass
class ChainStep:
    """One entry of `after:` in an experiment file."""

    name: str = ""  # names its files under <sweep>/chain/
    module: str = ""  # gpt2.export | gpt2.generate
    args: list[str] = field(default_factory=list)  # {best} and {sweep} are filled in when it runs
    after: str | None = None  # an earlier step (afterok); None: after the whole sweep (afterany)


def check_steps(steps: list[ChainStep], where: str) -> None:
    """Names unique and plain, modules known, `after` naming an earlier step: one line otherwise."""
    from launch.slurm import check_line

    seen: list[str] = []
    for s in steps:
        if not s.name or not all(c.isalnum() or c in "_.-" for c in s.name):
            raise UserError(f"{where}: after: step name '{s.name}' must be letters, digits and _.- (not empty)")
        if s.name in seen:
            raise UserError(f"{where}: after: two steps are named '{s.name}'")
        if s.module not in MODULES:
            raise UserError(f"{where}: after.{s.name}: module '{s.module}' is not one of {', '.join(MODULES)}")
        if s.after is not None and s.after not in seen:
            raise UserError(f"{where}: after.{s.name}: after '{s.after}' is not an earlier step "
                            f"(earlier: {', '.join(seen) or 'none'}); leave it out to run after the sweep")
        for a in s.args:
            check_line(f"after.{s.name}.args", a)
        seen.append(s.name)


def steps_of(meta: dict[str, Any]) -> list[ChainStep]:
    """sweep.json's chain steps, checked as the experiment file's were; UserError when damaged."""
    raw = meta.get("after") or []
    known = {f.name for f in dataclasses.fields(ChainStep)}
    problem = None if isinstance(raw, list) else f"a JSON {type(raw).__name__}, not a list"
    for s in raw if problem is None else []:
        problem = record.shape_problem(ChainStep, s)
        if problem is None and (unknown := sorted(set(s) - known)):
            problem = f"unknown key '{unknown[0]}'"
        if problem is not None:
            break
    if problem is not None:
        raise record.DamagedSweepFile(f"sweep.json's after is damaged ({one_line(problem)}): restore it from the experiment "
                        f"file's after")
    steps = [ChainStep(**s) for s in raw]
    check_steps(steps, "sweep.json")
    return steps


# ---- the best trial --------------------------------------------------------------------------


def best_trial(sweep_dir: Path) -> str | None:
    """The trial that reached the furthest rung (an early-stopping sweep) with the best metric
    there; for other sweeps the COMPLETED job with the lowest last val_loss (else train loss)."""
    from launch import advance, asha

    meta = record.read_sweep_meta(sweep_dir)
    spec = advance.search_spec(meta)
    records = record.SweepRecord(sweep_dir).read()
    metric, mode = (spec.metric, spec.mode) if spec else ("val_loss", "min")
    best: tuple[Any, ...] | None = None
    name = None
    for rec in records.values():
        run_dir = sweep_dir / rec.job
        st = record.read_state(run_dir)
        if st is None or st.state != record.COMPLETED:
            continue
        values = advance.metric_values(run_dir, metric) or advance.metric_values(run_dir, "loss")
        if not values:
            continue
        step = max(values)
        v = values[step]
        key = (-step, *asha.sort_key(mode, rec.job, v))
        if v is not None and not math.isnan(v) and (best is None or key < best):
            best, name = key, rec.job
    return name


# ---- running a step (locally, or as the SLURM job of a step) ---------------------------------


def _state_path(sweep_dir: Path, name: str) -> Path:
    return Path(sweep_dir) / CHAIN / f"{name}.json"


def step_state(sweep_dir: Path, name: str) -> dict[str, Any]:
    """chain/<name>.json, or {} when there is none or it is damaged (not a JSON object)."""
    try:
        raw = strict_json.loads(safe_read.read_text(_state_path(sweep_dir, name)))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def submitted_ids(sweep_dir: Path) -> dict[str, str]:
    """chain/submitted.json: step -> job id ({} when there is none; a damaged entry is left out)."""
    try:
        raw = strict_json.loads(safe_read.read_text(Path(sweep_dir) / CHAIN / SUBMITTED))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, str)} if isinstance(raw, dict) else {}


def _write_state(sweep_dir: Path, name: str, **fields: Any) -> None:
    path = _state_path(sweep_dir, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record.atomic_write(path, json.dumps({**fields, "time": time.time()}) + "\n")


def run_step(sweep_dir: Path, name: str) -> int:
    """Fill in {best} and {sweep}, run the step's module, record how it ended; its exit code."""
    sweep_dir = Path(sweep_dir).absolute()
    steps = {s.name: s for s in steps_of(record.read_sweep_meta(sweep_dir))}
    if name not in steps:
        raise UserError(f"no step '{name}' in the chain of {sweep_dir} (steps: {', '.join(steps) or 'none'})")
    step = steps[name]
    best = best_trial(sweep_dir)
    if best is None and any("{best}" in a for a in step.args):
        _write_state(sweep_dir, name, state=record.FAILED, rc=2, best=None, message="no trial completed")
        print(f"chain step {name}: no trial of {sweep_dir} completed: nothing to run it on", file=sys.stderr)
        return 2
    fill = {"best": str(sweep_dir / best) if best else "", "sweep": str(sweep_dir)}
    args = [a.replace("{best}", fill["best"]).replace("{sweep}", fill["sweep"]) for a in step.args]
    _write_state(sweep_dir, name, state=record.RUNNING, best=best, job_id=os.environ.get("SLURM_JOB_ID"))
    log = sweep_dir / CHAIN / f"{name}.log"
    with log.open("w") as f:
        f.write(f"# python -m {step.module} {' '.join(args)}\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", step.module, *args], stdout=f, stderr=subprocess.STDOUT,
                            check=False).returncode
    _write_state(sweep_dir, name, state=record.COMPLETED if rc == 0 else record.FAILED, rc=rc, best=best)
    return rc


def run_local(sweep_dir: Path) -> int:
    """Run the chain in order in this process's machine; a step whose `after` failed is SKIPPED.
    Steps already COMPLETED are not run again. Returns 0 when every step completed."""
    bad = 0
    for step in steps_of(record.read_sweep_meta(sweep_dir)):
        if step_state(sweep_dir, step.name).get("state") == record.COMPLETED:
            continue
        if step.after is not None and step_state(sweep_dir, step.after).get("state") != record.COMPLETED:
            _write_state(sweep_dir, step.name, state="SKIPPED", message=f"{step.after} did not complete")
            bad += 1
            continue
        rc = run_step(sweep_dir, step.name)
        print(f"chain step {step.name}: {'COMPLETED' if rc == 0 else f'FAILED (exit {rc})'} "
              f"(log {Path(sweep_dir) / CHAIN / step.name}.log)", flush=True)
        bad += rc != 0
    return 1 if bad else 0


def submit_slurm(sweep_dir: Path, after_jobs: list[str]) -> dict[str, str]:
    """Queue the chain's steps not queued yet: the first ones `afterany` on `after_jobs` (none:
    the sweep is over), the others `afterok` on their step. Returns step -> job id."""
    from launch import slurm
    from launch.advance import ROOT

    sweep_dir = Path(sweep_dir).absolute()
    meta = record.read_sweep_meta(sweep_dir)
    steps = steps_of(meta)
    path = sweep_dir / CHAIN / SUBMITTED
    path.parent.mkdir(parents=True, exist_ok=True)
    with record.SweepRecord(sweep_dir).locked():
        ids = submitted_ids(sweep_dir)
        for step in [step for step in steps if step.name not in ids]:
            # queued (or run already) by a controller killed before it wrote the id here: adopt it
            tag = intent.sweep_tag("chain", sweep_dir, step.name)
            found = intent.queued_with(tag) or [str(step_state(sweep_dir, step.name).get("job_id") or "")]
            if found[0]:
                ids[step.name] = found[0]
                record.atomic_write(path, json.dumps(ids, indent=1) + "\n")
                continue
            if step.after is not None:
                dep: str | None = f"afterok:{ids[step.after]}"
            else:
                dep = "afterany:" + ":".join(sorted(set(after_jobs))) if after_jobs else None
            argv = [str(ROOT / "launch" / "sweep.py"), "chain", str(sweep_dir), "--run", step.name]
            ids[step.name] = slurm.submit_wrapped(argv, f"{meta['name']}-{step.name}",
                                                  sweep_dir / CHAIN / f"{step.name}-%j.out", dependency=dep,
                                                  where=meta.get("resources"), comment=tag)
            record.atomic_write(path, json.dumps(ids, indent=1) + "\n")  # at once; a crash before it: the tag
    return ids


def follow_up(sweep_dir: Path) -> None:
    """After an early-stopping sweep is finished: run (local) or queue (SLURM) its chain."""
    meta = record.read_sweep_meta(sweep_dir)
    if not steps_of(meta):
        return
    if meta["executor"] == "slurm":
        ids = submit_slurm(sweep_dir, [])
        print(f"chain queued: {', '.join(f'{k} {v}' for k, v in ids.items())}", flush=True)
    else:
        run_local(sweep_dir)


def chain_lines(sweep_dir: Path) -> list[str]:
    """For `status`: each step, its dependency and state."""
    try:
        steps = steps_of(record.read_sweep_meta(sweep_dir))
    except record.DamagedSweepFile as exc:
        return [f"chain: {exc}"]
    except UserError:
        return []
    if not steps:
        return []
    ids = submitted_ids(sweep_dir)
    lines = ["chain (after the sweep):"]
    for s in steps:
        st = step_state(sweep_dir, s.name)
        state = st.get("state") or ("PENDING" if s.name in ids else "waiting for the sweep")
        on = f" on {st['best']}" if st.get("best") else ""
        job = f", job {ids[s.name]}" if s.name in ids else ""
        dep = f"after {s.after} succeeds" if s.after else "after the sweep"
        lines.append(f"  {s.name}: python -m {s.module} ({dep}{job}): {state}{on}")
    return lines


def cmd_chain(argv: list[str]) -> int:
    from gpt2.errors import ArgumentParser

    p = ArgumentParser(prog="launch/sweep.py chain", description="Run a sweep's chain (`after:`) now, in order.")
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--run", metavar="STEP", help="run only this step (what a chain's SLURM job runs)")
    args = p.parse_args(argv)
    if args.run:
        return run_step(args.sweep_dir, args.run)
    return run_local(args.sweep_dir)
