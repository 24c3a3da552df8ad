"""Loss and speed of every job of a sweep in one PNG.

    python launch/plot.py SWEEP_DIR [--out loss.png] [--title TEXT]
    make plot SWEEP=runs/<sweep>

SWEEP_DIR is a sweep directory (each subdirectory with a metrics.jsonl is one job) or a single
run directory. The PNG has train loss (lines) and val loss (dots) against step (top left) and
tokens (top right), tokens/s against step below, and at the bottom where each job's wall time went
(the goodput ledger, launch/goodput.py: one stacked bar per job). A restart is where a row's "restart" count
rises or its step goes back (the job resumed from an older checkpoint); each is marked by a
dashed vertical line in the job's colour. A restart that trains steps again replaces their rows
in metrics.jsonl (gpt2/metrics_file.py: one value per step, event rows say what was discarded):
the steps whose first training was thrown away are shaded. In files written before that the
replayed steps appear twice: the last row written for a step wins and the replaced stretch is
drawn faint. Exit codes: 0 written, 2 nothing to plot or a bad path (one line).
"""

from __future__ import annotations

if __name__ == "__main__" and not __package__:  # run as a script: make `gpt2` importable
    import sys as _sys
    from pathlib import Path as _Path

    _sys.path.insert(0, str(_Path(__file__).resolve().parent.parent))

import contextlib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2 import safe_read, strict_json
from gpt2.errors import ArgumentParser, UserError, report
from launch.advance import rung_steps
from launch.goodput import BUCKETS, Ledger, run_ledger
from launch.record import SweepRecord

METRICS = "metrics.jsonl"
Row = dict[str, Any]


# ---- reading ---------------------------------------------------------------------------------


VALUES = ("loss", "val_loss", "tokens_per_s")  # NaN or infinite when a run diverged: drawn as a gap
VALUE_LIMIT = 1e300  # a finite value past this is damage (matplotlib's axis arithmetic overflows on it)


def _real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _count(v: Any) -> bool:
    """A step, a restart count or a token count as our writers write them: a finite number in 64 bits."""
    return _real(v) and math.isfinite(v) and abs(v) < strict_json.INT_LIMIT


def _value(v: Any) -> bool:
    """A drawn value: a number, NaN or infinite (a diverged loss), but no finite number past VALUE_LIMIT."""
    return _real(v) and not (math.isfinite(v) and abs(v) > VALUE_LIMIT)


def _step_row(row: Any) -> bool:
    """A step row whose drawn fields hold numbers: a "step", and each of "restart", "tokens", "loss",
    "val_loss" and "tokens_per_s" absent, null (not "restart") or a number of its kind."""
    return (isinstance(row, dict) and _count(row.get("step")) and ("restart" not in row or _count(row["restart"]))
            and (row.get("tokens") is None or _count(row["tokens"]))
            and all(row.get(k) is None or _value(row[k]) for k in VALUES))


def read_metrics(path: Path) -> list[Row]:
    """The step rows of one metrics.jsonl, in file order. Events (an attempt's start and end, rows
    a resume discarded: the ledger's) are passed over; lines that do not parse to an object with a
    numeric "step" and numbers where numbers belong (a torn last line from a killed process, a
    damaged byte, an infinite step, a string for a loss) are skipped with a warning."""
    rows, bad = [], 0
    with safe_read.text_lines(path) as f:  # a damaged byte spoils its line, not the file
        for line in f:
            if not line.strip():
                continue
            try:
                row = strict_json.loads(line, nonfinite=True)  # a diverged loss is NaN
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict) and "event" in row:
                continue
            if _step_row(row):
                rows.append(row)
            else:
                bad += 1
    if bad:
        print(f"warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return rows


def read_discarded(path: Path) -> list[tuple[int, int]]:
    """(first, last) step of each "discarded" row of one metrics.jsonl: steps whose training an
    interruption threw away (they were trained again). A damaged row is passed over."""
    out = []
    with safe_read.text_lines(path) as f:
        for line in f:
            if '"discarded"' not in line:
                continue
            with contextlib.suppress(json.JSONDecodeError):
                row = strict_json.loads(line, nonfinite=True)
                if not (isinstance(row, dict) and row.get("event") == "discarded"):
                    continue
                steps = row.get("steps")
                if isinstance(steps, list) and len(steps) == 2 and all(map(_count, steps)):
                    out.append((int(steps[0]), int(steps[1])))
    return out


def find_runs(path: Path) -> dict[str, Path]:
    """Job name -> metrics file: `path` itself when it is a run directory, else each of its
    subdirectories that holds a metrics.jsonl, sorted by name."""
    if (path / METRICS).is_file():
        return {path.resolve().name: path / METRICS}
    if not path.is_dir():
        return {}
    return {d.name: d / METRICS for d in sorted(path.iterdir()) if (d / METRICS).is_file()}


# ---- shaping ---------------------------------------------------------------------------------


def sessions(rows: list[Row]) -> list[list[Row]]:
    """Rows split into the sessions of a run: a new one starts where "restart" changes or the
    step goes back. (An eval row repeating its train row's step stays in the same session.)"""
    out: list[list[Row]] = []
    for row in rows:
        if out:
            prev = out[-1][-1]
            if row.get("restart", 0) != prev.get("restart", 0) or row["step"] < prev["step"]:
                out.append([row])
                continue
            out[-1].append(row)
        else:
            out.append([row])
    return out


@dataclass
class Series:
    """One metric of one run: the kept points (last write per step wins), sorted by step, and
    the points a later session replaced."""

    step: list[float] = field(default_factory=list)
    tokens: list[float | None] = field(default_factory=list)
    value: list[float] = field(default_factory=list)
    replaced: list[tuple[list[float], list[float | None], list[float]]] = field(default_factory=list)


def series(rows: list[Row], key: str) -> Series:
    """The kept and replaced points of `key` over a run's rows (rows without the key ignored)."""
    latest: dict[float, tuple[int, Row]] = {}
    runs = sessions(rows)
    for i, sess in enumerate(runs):
        for row in sess:
            if row.get(key) is not None:
                latest[row["step"]] = (i, row)
    s = Series()
    for step in sorted(latest):
        row = latest[step][1]
        s.step.append(step)
        s.tokens.append(row.get("tokens"))
        s.value.append(row[key])
    for i, sess in enumerate(runs):
        gone = [r for r in sess if r.get(key) is not None and latest[r["step"]][0] != i]
        if gone:
            s.replaced.append(([r["step"] for r in gone], [r.get("tokens") for r in gone], [r[key] for r in gone]))
    return s


SMOOTHING = 0.8  # weight of the past in the drawn train-loss line (TensorBoard's slider, debiased)


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing: the first point is itself, and a
    constant series stays constant. One batch's loss is noisy (about +-0.5 nats for the tiny model
    on pydoc); the smoothed line shows the trend, the raw points stay visible beside it."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))
    return out


def restart_marks(rows: list[Row]) -> list[tuple[float, float | None, int]]:
    """(step, tokens, restart count) at the first row of every session after the first."""
    return [(s[0]["step"], s[0].get("tokens"), int(s[0].get("restart", 0))) for s in sessions(rows)[1:]]


# ---- drawing ---------------------------------------------------------------------------------


def _with_tokens(tokens: list[float | None], values: list[float]) -> tuple[list, list]:
    """The (tokens, value) pairs whose tokens are known, as two lists."""
    pts = [(t, v) for t, v in zip(tokens, values) if t is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


BUCKET_COLORS = {"queue": "#bbbbbb", "startup": "#f0a830", "productive": "#2ca02c", "replayed": "#d62728",
                 "save": "#1f77b4", "eval": "#9467bd", "gap": "#7f7f7f", "other": "#e0e0e0"}


def plot_goodput(ax: Any, ledgers: dict[str, Ledger]) -> None:
    """One horizontal bar per job: its wall time stacked by bucket, its goodput at the bar's end."""
    names = list(ledgers)
    longest = max(led.total for led in ledgers.values())
    unit, per = ("hours", 3600.0) if longest >= 7200 else ("minutes", 60.0) if longest >= 120 else ("seconds", 1.0)
    for b in BUCKETS:
        left = [sum(getattr(ledgers[n], x) for x in BUCKETS[:BUCKETS.index(b)]) / per for n in names]
        ax.barh(names, [getattr(ledgers[n], b) / per for n in names], left=left, color=BUCKET_COLORS[b], label=b)
    for n in names:
        g = ledgers[n].goodput
        ax.annotate(f" {g:.2f}" if g is not None else " -", (ledgers[n].total / per, n), va="center", fontsize=8)
    ax.set(xlabel=unit, title="where the wall time went (goodput at the end of each bar)")
    ax.set_xlim(0, longest / per * 1.08)
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=7, ncol=len(BUCKETS), frameon=False)


def plot_runs(runs: dict[str, list[Row]], out: Path, title: str = "",
              discarded: dict[str, list[tuple[int, int]]] | None = None,
              ledgers: dict[str, Ledger] | None = None, rungs: list[int] | tuple[int, ...] = ()) -> None:
    """Draw every run into one PNG at `out` (parent directories created); `discarded`: per run,
    the step ranges whose first training was thrown away (`read_discarded`), shaded; the goodput
    panel when `ledgers` has any job; `rungs`: the steps where an early-stopping sweep compared
    its trials (launch/advance.py:rung_steps), dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    from matplotlib.ticker import EngFormatter

    fig = plt.figure(figsize=(13, 11 if ledgers else 8.5), constrained_layout=True)
    grid = fig.add_gridspec(3 if ledgers else 2, 2, height_ratios=[3, 2, 2] if ledgers else [3, 2])
    ax_step, ax_tok = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_tok.sharey(ax_step)
    ax_tps = fig.add_subplot(grid[1, :])
    ax_tps.sharex(ax_step)
    colors = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors  # type: ignore[attr-defined]
    handles = []
    for i, (name, rows) in enumerate(runs.items()):
        c = colors[i % len(colors)]
        loss, val, tps = series(rows, "loss"), series(rows, "val_loss"), series(rows, "tokens_per_s")
        ema = smooth(loss.value)
        ax_step.plot(loss.step, loss.value, color=c, lw=0.8, alpha=0.35)
        ax_step.plot(loss.step, ema, color=c, lw=1.6)
        ax_tok.plot(*_with_tokens(loss.tokens, loss.value), color=c, lw=0.8, alpha=0.35)
        ax_tok.plot(*_with_tokens(loss.tokens, ema), color=c, lw=1.6)
        ax_step.plot(val.step, val.value, "o", color=c, ms=5, mec="black", mew=0.6)
        ax_tok.plot(*_with_tokens(val.tokens, val.value), "o", color=c, ms=5, mec="black", mew=0.6)
        ax_tps.plot(tps.step, tps.value, color=c, lw=1.0)
        for s, t, v in loss.replaced:
            ax_step.plot(s, v, color=c, lw=0.8, alpha=0.3)
            ax_tok.plot(*_with_tokens(t, v), color=c, lw=0.8, alpha=0.3)
        for s, _, v in tps.replaced:
            ax_tps.plot(s, v, color=c, lw=0.8, alpha=0.3)
        for first, last in (discarded or {}).get(name, []):
            for ax in (ax_step, ax_tps):
                ax.axvspan(first - 0.5, last + 0.5, color=c, alpha=0.12, lw=0)
        for step, tokens, restart in restart_marks(rows):
            for ax, x in ((ax_step, step), (ax_tok, tokens), (ax_tps, step)):
                if x is not None:
                    ax.axvline(x, color=c, ls="--", lw=1.0, alpha=0.8)
            ax_step.annotate(f"r{restart}", (step, 1.0), xycoords=("data", "axes fraction"),
                             xytext=(2, -10), textcoords="offset points", color=c, fontsize=8)
        last = f" {loss.value[-1]:.3f}" if loss.value else ""
        handles.append(Line2D([], [], color=c, lw=2, label=f"{name}{last}"))
    for r in rungs:
        ax_step.axvline(r, color="black", ls=":", lw=1.0, alpha=0.6)
        ax_step.annotate(f"rung {r}", (r, 0.0), xycoords=("data", "axes fraction"), xytext=(2, 4),
                         textcoords="offset points", fontsize=8)
    ax_step.set(xlabel="step", ylabel="loss", title="loss vs step")
    ax_tok.set(xlabel="tokens", title="loss vs tokens")
    ax_tok.xaxis.set_major_formatter(EngFormatter())
    ax_tps.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax_tps.set_ylim(bottom=0)
    for ax in (ax_step, ax_tok, ax_tps):
        ax.grid(alpha=0.3)
    keys = [Line2D([], [], color="gray", lw=1.6, label=f"train loss (smoothed {SMOOTHING})"),
            Line2D([], [], color="gray", lw=0.8, alpha=0.35, label="train loss (logged)"),
            Line2D([], [], color="gray", marker="o", ls="", mec="black", label="val loss"),
            Line2D([], [], color="gray", ls="--", label="restart"),
            Patch(color="gray", alpha=0.25, label="trained again (first run thrown away)")] + (
                [Line2D([], [], color="black", ls=":", label="rung (early stopping)")] if rungs else [])
    ax_step.legend(handles=keys, loc="upper right", fontsize=8)
    ax_tok.legend(handles=handles, loc="upper right", fontsize=8, title="job, last loss", title_fontsize=8)
    if ledgers:
        plot_goodput(fig.add_subplot(grid[2, :]), ledgers)
    if title:
        fig.suptitle(title)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def job_ledgers(sweep_dir: Path, found: dict[str, Path]) -> dict[str, Ledger]:
    """Each job's goodput ledger; the sweep record's submission times give the queue waits."""
    submitted: dict[str, float | None] = {}
    with contextlib.suppress(OSError, UserError):
        submitted = {n: r.submitted_at for n, r in SweepRecord(sweep_dir).read().items()}
    out = {}
    for name, path in found.items():
        led = run_ledger(path.parent, submitted.get(name))
        if led is not None and led.total > 0:
            out[name] = led
    return out


# ---- the door --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="launch/plot.py", description="Plot loss and tokens/s of every job of a sweep.")
    p.add_argument("sweep_dir", type=Path, help="a sweep directory, or one run directory")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: SWEEP_DIR/loss.png)")
    p.add_argument("--title", default=None, help="figure title (default: the directory's name)")
    args = p.parse_args(argv)
    try:
        found = find_runs(args.sweep_dir)
        runs = {name: rows for name, path in found.items() if (rows := read_metrics(path))}
        if not runs:
            raise UserError(f"no {METRICS} with rows in {args.sweep_dir} or its subdirectories: "
                            f"pass a sweep directory or a run directory")
        out = args.out or args.sweep_dir / "loss.png"
        try:
            plot_runs(runs, out, args.title if args.title is not None else args.sweep_dir.resolve().name,
                      {name: read_discarded(found[name]) for name in runs}, job_ledgers(args.sweep_dir, found),
                      rungs=rung_steps(args.sweep_dir))
        except OSError:  # a full disk: no half-written PNG is left behind
            with contextlib.suppress(OSError):
                Path(out).unlink(missing_ok=True)
            raise
    except (UserError, OSError) as exc:
        return report(exc)
    print(f"wrote {out} ({len(runs)} job{'s' if len(runs) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
