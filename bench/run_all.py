"""Run every benchmark of the project and write one markdown report (`make bench`).

    python -m bench.run_all --out bench/RESULTS.md [--quick] [--only bench_model,bench_gpu]

Each benchmark is a module `bench.<name>` with `run(quick: bool = False) -> list[dict]`; a row
has name, value, unit, goal and ratio (any may be missing; extra keys such as "note" or
"error" become extra columns). Each benchmark measures its own ratios side by side in one run.
A module that does not exist yet is listed as missing; one that raises is recorded as an error
row and the others still run. The report starts with the machine's description and is rewritten
after every benchmark, so a crash keeps what was measured. Exit code: 0, or 1 when a benchmark
failed (the report is written either way).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# In report order; bench_gpu reports "no GPU" on a machine without one.
BENCHMARKS = ("bench_model", "bench_backends", "bench_data", "bench_checkpoint", "bench_launch", "bench_failures",
              "bench_storm", "bench_gpu")
COLUMNS = ("name", "value", "unit", "goal", "ratio")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Section:
    """One benchmark's outcome: status is "ok", "missing" or "failed"."""

    name: str
    status: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    seconds: float = 0.0


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def run_benchmark(name: str, quick: bool) -> Section:
    """Import `bench.<name>` and call its run(quick); never raises (but KeyboardInterrupt)."""
    modname = f"bench.{name}"
    t0 = time.perf_counter()
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as exc:
        if exc.name == modname:
            return Section(name, "missing", title="not written yet")
        return Section(name, "failed", [{"name": f"{name}: import", "error": _error_text(exc)}])
    except Exception as exc:
        return Section(name, "failed", [{"name": f"{name}: import", "error": _error_text(exc)}])
    title = ((mod.__doc__ or "").strip().splitlines() or [""])[0]
    try:
        rows = [dict(r) for r in mod.run(quick=quick)]
        status = "ok"
    except (Exception, SystemExit) as exc:
        traceback.print_exc()
        rows, status = [{"name": f"{name}: run", "error": _error_text(exc)}], "failed"
    return Section(name, status, rows, title, time.perf_counter() - t0)


# ---- the machine ----------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except ImportError:
        return None


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict[str, str]:
    """What the numbers were measured on: CPU, cores, memory, GPU, versions, load, date."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = _memory_gib()
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpu = ", ".join(f"{n} x{names.count(n)}" for n in dict.fromkeys(names))
        cuda = torch.version.cuda or "?"
    else:
        gpu, cuda = "no GPU", "-"
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable, torch threads {torch.get_num_threads()}",
        "memory": f"{mem:.1f} GiB" if mem is not None else "unknown",
        "GPU": gpu,
        "OS": platform.platform(),
        "Python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {cuda})",
        "load average (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load) if load else "unknown",
        "commit": _git_commit(),
    }


# ---- markdown -------------------------------------------------------------------------------


def fmt(key: str, value: Any) -> str:
    """One table cell: ratios as 1.23x, numbers to a readable precision, None as empty."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float):
        if key == "ratio":
            return f"{value:.2f}x"
        v = float(value)
        if v != v:  # NaN
            return "nan"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: the standard columns, then any other keys in first-seen order."""
    extra: list[str] = []
    for r in rows:
        extra += [k for k in r if k not in COLUMNS and k not in extra]
    cols = [*COLUMNS, *extra]
    align = {"value": "---:", "ratio": "---:"}
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(align.get(c, "---") for c in cols) + "|"]
    lines += ["| " + " | ".join(fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def render(sections: list[Section], info: dict[str, str], quick: bool,
           pending: tuple[str, ...] | list[str] = ()) -> str:
    """The whole report: machine, then one section per benchmark (and the ones still to run)."""
    mode = "quick" if quick else "full"
    out = ["# Benchmark results", "",
           f"Written by `python -m bench.run_all` ({mode} run). Every ratio compares two measurements "
           "taken side by side in this run.", "", "## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {fmt('', v)} |" for k, v in info.items()]
    for s in sections:
        out += ["", f"## {s.name}" + (f": {s.title}" if s.title and s.status != "missing" else ""), ""]
        if s.status == "missing":
            out.append(f"`bench/{s.name}.py` does not exist yet.")
            continue
        out.append(f"{'FAILED' if s.status == 'failed' else 'Took'} {s.seconds:.0f} s.")
        out += ["", table(s.rows) if s.rows else "(no rows)"]
    for name in pending:
        out += ["", f"## {name}", "", "not run yet (the run stopped before it)."]
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def run_all(out: Path, quick: bool = False, names: tuple[str, ...] | list[str] = BENCHMARKS) -> list[Section]:
    """Run `names` in order, rewriting `out` after each one; return their sections."""
    info = machine()
    sections: list[Section] = []
    for i, name in enumerate(names):
        print(f"== {name} ...", flush=True)
        sec = run_benchmark(name, quick)
        sections.append(sec)
        print(f"== {name}: {sec.status} ({sec.seconds:.0f} s)", flush=True)
        if sec.rows:
            print(table(sec.rows), flush=True)
        _write(out, render(sections, info, quick, list(names[i + 1:])))
    if not names:
        _write(out, render(sections, info, quick))
    return sections


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md", help="markdown report to write")
    p.add_argument("--quick", action="store_true", help="each benchmark's short mode (smoke test)")
    p.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    args = p.parse_args(argv)
    names = tuple(n.strip() for n in args.only.split(",") if n.strip()) or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"error: unknown benchmark {', '.join(unknown)}: choose from {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    sections = run_all(args.out, args.quick, names)
    failed = [s.name for s in sections if s.status == "failed"]
    print(f"wrote {args.out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
