"""What the GPU check's stages left, judged and written up (bench/gpu_check.py runs the stages).

- `parse_tests`: pytest's outcome per test, from its JUnit XML (or its -v lines if it was killed);
- `train_rows`, `compare`: a run's loss per step from its metrics.jsonl, and how far two curves are
  apart (largest absolute difference; bitwise when it is 0.0);
- `summarize_run`: the run that got a USR2 and was resumed, set against the uninterrupted reference;
- `summarize_backend`: one backend's uninterrupted run, set against DDP's;
- `render`: bench/RESULTS-gpu.md.

The tolerances are stated here and printed in the report. On the GPU (bf16 autocast, compile) two
processes need not agree to the bit (the flash kernel's backward accumulates with atomics), so a
resumed curve is held to TOLERANCE["resume"]["gpu"] and whether it is bitwise is reported; on the
CPU in fp32 with one thread per process (the dry mode's training stages) every op is deterministic,
so the dry mode demands the bit.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from bench.run_all import fmt, table
from gpt2.metrics_file import json_rows

# Largest |loss difference| per step allowed, by what is compared and where.
TOLERANCE = {
    "resume": {"gpu": 0.02, "dry": 0.0},  # resumed run against the uninterrupted one (same backend)
    "backend": {"gpu": 0.1, "dry": 1e-3},  # FSDP and ZeRO-2 against DDP (bf16: different rounding)
}


class _Stage(Protocol):
    name: str
    status: str
    seconds: float
    budget: float
    note: str
    output: str
    data: dict[str, Any]


class _Check(Protocol):
    dry: bool
    stages: list[Any]

    def elapsed(self) -> float: ...

    @property
    def deadline(self) -> float: ...


# ---- tests ---------------------------------------------------------------------------------------
def parse_tests(junit: Path, output: str) -> list[dict[str, Any]]:
    """Per test: name, outcome, seconds, message. From the JUnit XML when pytest wrote it, else from
    the -v lines it printed before it was killed."""
    tests: list[dict[str, Any]] = []
    if junit.is_file():
        try:
            for case in ET.parse(junit).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        message = (el.get("message") or "").strip().splitlines()[0][:200] if el.get("message") else ""
                tests.append(dict(test=case.get("name", "?"), outcome=outcome,
                                  seconds=float(case.get("time", 0) or 0), message=message))
            return tests
        except ET.ParseError:
            pass
    for m in re.finditer(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", output):
        tests.append(dict(test=m.group(1), outcome=m.group(2).lower(), seconds=None, message=""))
    return tests


# ---- training curves -----------------------------------------------------------------------------
def train_rows(metrics: Path) -> dict[int, dict[str, Any]]:
    """step -> that step's train row (the last one written wins, as in gpt2/logs.py); {} without a file."""
    rows = json_rows(metrics.read_text()) if metrics.is_file() else []
    return {r["step"]: r for r in rows if "loss" in r and isinstance(r.get("step"), int)}


def last_step(metrics: Path) -> int:
    """The highest step with a train row so far (0 before the first); cheap enough to poll."""
    return max(train_rows(metrics), default=0)


def compare(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], steps: range) -> dict[str, Any]:
    """How far two loss curves are apart over `steps` (those both have): the largest |difference|,
    the step where it is, and whether every loss is bitwise equal."""
    common = [s for s in steps if s in a and s in b]
    if not common:
        return {"steps": 0, "max_abs_diff": None, "at_step": None, "bitwise": False}
    diffs = {s: abs(a[s]["loss"] - b[s]["loss"]) for s in common}
    worst = max(common, key=lambda s: diffs[s])
    return {"steps": len(common), "max_abs_diff": diffs[worst], "at_step": worst,
            "bitwise": all(a[s]["loss"] == b[s]["loss"] for s in common)}


def _speed(train: dict[int, dict[str, Any]], first: int, last: int) -> dict[str, Any]:
    """Median tokens/s and MFU of steps first..last, its first steps (compilation, allocator warm-up)
    left out, and the wall time of its first step."""
    warm = first + min(3, (last - first + 1) // 2)
    steady = [train[s] for s in range(warm, last + 1) if s in train]
    out: dict[str, Any] = {}
    if steady:
        out["tokens_per_s"] = sorted(r["tokens_per_s"] for r in steady)[len(steady) // 2]
        out["mfu"] = sorted(r["mfu"] for r in steady)[len(steady) // 2]
    if first in train:
        out["first_step_s"] = train[first]["step_time"]
    return out


def summarize_run(train: dict[int, dict[str, Any]], output: str, end: int, signalled_after: int | None,
                  reference: dict[int, dict[str, Any]] | None, tol: float) -> dict[str, Any]:
    """The run stopped by a USR2 sent once step `signalled_after` was logged, then resumed to `end`.

    Checks: the second process resumed from the step the first one stopped after, logged every
    step after it as restart 1, the loss fell, and (given the uninterrupted reference) the resumed
    steps are within `tol` of it. `problems` lists what failed, in words."""
    resumed = re.search(r"resumed from \S+ at step (\d+)", output)
    mid = int(resumed.group(1)) if resumed else None
    out: dict[str, Any] = {"signalled_after_step": signalled_after, "resumed_at": mid, "steps_logged": len(train),
                           "problems": []}
    problems: list[str] = out["problems"]
    if not train:
        problems.append("no metrics.jsonl rows")
        return out
    out["loss_at"] = {s: round(train[s]["loss"], 4) for s in sorted({1, mid or 1, (mid or 0) + 1, end}) if s in train}
    if signalled_after is None:
        problems.append("the USR2 was never sent (the first process ended or ran out of time first)")
    if mid is None:
        problems.append("the second process did not say it resumed")
    elif signalled_after is not None and not signalled_after <= mid <= signalled_after + 2:
        problems.append(f"resumed at step {mid}, not just after the USR2 (sent after step {signalled_after})")
    if mid is not None:
        for name, first, last in (("first", 1, mid), ("resume", mid + 1, end)):
            out.update({f"{name}_{k}": v for k, v in _speed(train, first, last).items()})
        if train.get(mid, {}).get("peak_mem_mb") is not None:
            out["peak_mem_mb"] = train[mid]["peak_mem_mb"]
        if end in train and train.get(mid + 1, {}).get("restart") != 1:
            problems.append(f"step {mid + 1} was not logged by the restarted process")
    missing = [s for s in range(1, end + 1) if s not in train]
    if missing:
        problems.append(f"{len(missing)} steps missing from metrics.jsonl (first {missing[0]})")
    if 1 in train and end in train and not train[end]["loss"] < train[1]["loss"]:
        problems.append("the loss did not fall")
    if reference and mid is not None:
        before, after = compare(train, reference, range(1, mid + 1)), compare(train, reference, range(mid + 1, end + 1))
        out["vs_reference"] = {"tolerance": tol, "before_stop": before, "after_resume": after}
        if after["steps"] == 0:
            problems.append("no resumed step to set against the reference")
        elif after["max_abs_diff"] > tol:
            problems.append(f"the resumed curve left the uninterrupted one: |loss difference| "
                            f"{after['max_abs_diff']:.4g} at step {after['at_step']} > {tol:g}")
    elif mid is not None:
        out["vs_reference"] = "no reference run (the backends stage did not leave DDP's curve)"
    return out


def summarize_backend(train: dict[int, dict[str, Any]], rc: int | None, steps: int,
                      reference: dict[int, dict[str, Any]] | None, tol: float) -> dict[str, Any]:
    """One backend's uninterrupted run of `steps` steps, set against DDP's curve (None: it is DDP)."""
    out: dict[str, Any] = {"exit": "timeout" if rc is None else rc, "steps_logged": len(train), "problems": []}
    problems: list[str] = out["problems"]
    if rc != 0:
        problems.append("timed out" if rc is None else f"exited {rc}")
    if not train:
        problems.append("no metrics.jsonl rows")
        return out
    out.update(_speed(train, 1, steps))
    out["loss_first_last"] = [round(train[s]["loss"], 4) for s in (1, steps) if s in train]
    missing = [s for s in range(1, steps + 1) if s not in train]
    if missing:
        problems.append(f"{len(missing)} steps missing (first {missing[0]})")
    if 1 in train and steps in train and not train[steps]["loss"] < train[1]["loss"]:
        problems.append("the loss did not fall")
    if reference is not None:
        c = compare(train, reference, range(1, steps + 1))
        out["vs_ddp"] = {**c, "tolerance": tol}
        if c["steps"] == 0:
            problems.append("no step to set against DDP's curve")
        elif c["max_abs_diff"] > tol:
            problems.append(f"|loss difference| from DDP {c['max_abs_diff']:.4g} at step {c['at_step']} > {tol:g}")
    return out


# ---- the report ----------------------------------------------------------------------------------
def cell(value: Any) -> str:
    """A table cell: integers as they are, other numbers as bench/run_all.py writes them."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else fmt("", value)


def _percent(fraction: float | None) -> float | None:
    return None if fraction is None else 100 * fraction


def _pairs(d: dict[str, Any], keys: tuple[str, ...]) -> list[str]:
    """A two-column table of d's keys that are there; an MFU (a fraction) shown as a percentage."""
    return ["| | |", "|---|---|", *(f"| {k.replace('_mfu', '_mfu_%')} | {cell(_percent(d[k]) if k.endswith('_mfu') else d[k])} |"
                                    for k in keys if k in d)]


def render(c: _Check, device_command: str) -> str:
    """bench/RESULTS-gpu.md as it stands (rewritten after every stage, so a kill keeps what was done)."""
    env = next((s.data for s in c.stages if s.name == "env"), {})
    lines = ["# GPU check results", "",
             f"Written by `bench/gpu_check.py` (issue 12) on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}"
             f"{' - DRY RUN on the CPU (GPU_CHECK_DRY=1), not a GPU measurement' if c.dry else ''}; "
             f"{c.elapsed():.0f} s so far (deadline {c.deadline:.0f} s). On the GPU machine:", "",
             f"    {device_command}", "", "## Machine", "", *_pairs(env, (
                 "gpu", "gpu_memory_gib", "torch", "cuda_runtime", "python", "cpus", "deepspeed_accelerator",
                 "tokenizer", "git_commit"))]
    if env.get("packages"):
        lines += ["", "| package | version (folder) |", "|---|---|"]
        lines += [f"| {k} | {cell(v)} |" for k, v in env["packages"].items()]
    lines += ["", "## Stages", "", "| stage | status | s | budget s | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.budget:.0f} | {cell(s.note)} |" for s in c.stages]
    where = "dry" if c.dry else "gpu"
    for s in c.stages:
        if s.name == "tests" and s.data.get("tests"):
            lines += ["", "## Tests: `pytest -m gpu tests/test_gpu.py`", "", "| test | outcome | s | message |",
                      "|---|---|---:|---|"]
            lines += [f"| {t['test']} | {t['outcome']} | {fmt('', t['seconds'])} | {fmt('', t['message'])} |"
                      for t in s.data["tests"]]
        if s.name == "bench" and s.data.get("rows"):
            lines += ["", "## Benchmark: `python -m bench.bench_gpu`", "", table(s.data["rows"])]
        if s.name == "backends" and s.data.get("runs"):
            lines += ["", "## Each backend at world size 1: `main.py` under torchrun, uninterrupted", "",
                      s.data.get("what", ""), "",
                      f"DDP's run is the reference for the resumed run below; FSDP's and ZeRO-2's curves are held "
                      f"to within {TOLERANCE['backend'][where]:g} of DDP's at every step.", "",
                      "| backend | exit | steps | loss step 1, last | tokens/s | MFU % | first step s | vs DDP | problems |",
                      "|---|---|---:|---|---:|---:|---:|---|---|"]
            for name, r in s.data["runs"].items():
                vs = r.get("vs_ddp")
                vs_text = ("reference" if vs is None else
                           f"max {cell(vs['max_abs_diff'])} at step {vs['at_step']}"
                           f"{' (bitwise)' if vs['bitwise'] else ''}")
                lines.append(f"| {name} | {r['exit']} | {r['steps_logged']} | {cell(r.get('loss_first_last'))} | "
                             f"{cell(r.get('tokens_per_s'))} | {cell(_percent(r.get('mfu')))} | {cell(r.get('first_step_s'))} | "
                             f"{vs_text} | {cell(r['problems'])} |")
        if s.name == "run" and s.data:
            d = s.data
            lines += ["", "## Training run: `main.py`, a USR2, a resume", "", d.get("what", ""), "",
                      *_pairs(d, ("loss_at", "signalled_after_step", "resumed_at", "steps_logged",
                                  "first_tokens_per_s", "resume_tokens_per_s", "first_mfu", "resume_mfu",
                                  "first_first_step_s", "resume_first_step_s", "peak_mem_mb", "problems"))]
            vs = d.get("vs_reference")
            if isinstance(vs, dict):
                b, a = vs["before_stop"], vs["after_resume"]
                lines += ["", f"Against the uninterrupted DDP run (tolerance {vs['tolerance']:g} per step, after the "
                          "resume): the steps before the stop show how far two fresh processes drift apart "
                          "on this device, the steps after it what the resume added.", "",
                          "| steps | compared | max abs loss difference | at step | bitwise |", "|---|---:|---:|---:|---|",
                          f"| before the stop | {b['steps']} | {cell(b['max_abs_diff'])} | {b['at_step']} | "
                          f"{'yes' if b['bitwise'] else 'no'} |",
                          f"| after the resume | {a['steps']} | {cell(a['max_abs_diff'])} | {a['at_step']} | "
                          f"{'yes' if a['bitwise'] else 'no'} |"]
            elif vs:
                lines += ["", f"Against the uninterrupted run: {vs}."]
    failed = [s for s in c.stages if s.status in ("failed", "timeout")]
    if failed:
        lines += ["", "## What failed (last lines of each stage's output; all of it in gpu_check.log)"]
        for s in failed:
            tail = "\n".join(s.output.strip().splitlines()[-40:])
            lines += ["", f"### {s.name}: {s.status}", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"
