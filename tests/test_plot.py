"""Pictures and reports of runs: launch/plot.py (the sweep PNG) and bench/run_all.py (RESULTS.md).

The benchmark report is tested with fake benchmark modules, never by running real benchmarks.
"""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import pytest

from bench import run_all  # bench/ is not installed: pytest's pythonpath (the repository root) finds it
from launch import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _train(step: int, restart: int = 0, loss: float | None = None) -> dict:
    return {"step": step, "loss": loss if loss is not None else 10.0 - step * 0.1, "tokens": step * 64,
            "tokens_per_s": 1000.0, "restart": restart}


# A run that trained to step 6, was requeued and resumed from its step-4 checkpoint (steps 5-6
# replayed), then requeued once more without losing steps.
REQUEUED = ([_train(s) for s in range(1, 7)]
            + [{"step": 6, "val_loss": 9.7, "tokens": 384, "restart": 0}]
            + [_train(s, 1, loss=1.0 * s) for s in range(5, 9)]
            + [_train(s, 2) for s in range(9, 11)])


# ---- shaping -----------------------------------------------------------------------------------


def test_sessions_split_where_restart_rises_or_step_goes_back() -> None:
    assert [len(s) for s in plot.sessions(REQUEUED)] == [7, 4, 2]
    no_count = [_train(1), _train(2), _train(1)]  # rows without a restart bump, step went back
    for r in no_count:
        r.pop("restart")
    assert [len(s) for s in plot.sessions(no_count)] == [2, 1]
    assert plot.restart_marks(REQUEUED) == [(5, 320, 1), (9, 576, 2)]


def test_series_keeps_the_last_write_per_step_and_reports_the_replaced_ones() -> None:
    s = plot.series(REQUEUED, "loss")
    assert s.step == list(range(1, 11))
    assert s.value[4:8] == [5.0, 6.0, 7.0, 8.0]  # the replay of steps 5-6 won
    assert s.replaced == [([5, 6], [320, 384], [pytest.approx(9.5), pytest.approx(9.4)])]
    val = plot.series(REQUEUED, "val_loss")
    assert (val.step, val.value, val.tokens) == ([6], [9.7], [384])  # no replay of the eval: kept


def test_read_metrics_skips_a_torn_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "metrics.jsonl"
    _write(path, [_train(1), _train(2)], tail='{"step": 3, "lo')
    assert [r["step"] for r in plot.read_metrics(path)] == [1, 2]
    assert "skipped 1" in capsys.readouterr().err


def test_read_metrics_passes_over_event_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "metrics.jsonl"
    discarded = {"event": "discarded", "restart": 0, "steps": [3, 4], "train_s": 0.5, "time": 9.0}
    _write(path, [_train(1), _train(2), discarded, _train(3, restart=1), {"event": "save", "step": 3}])
    assert [r["step"] for r in plot.read_metrics(path)] == [1, 2, 3]
    assert capsys.readouterr().err == ""
    assert plot.read_discarded(path) == [(3, 4)]
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "loss.png")]) == 0  # the span shaded
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)


HUGE = "1" * 5000  # valid JSON; past Python's 4,300-digit limit for int()
DAMAGED = {  # name: (line appended to a good metrics.jsonl, whether read_metrics counts it as unreadable)
    "byte 0xff": (b'{"step": 3, "loss": 1.0}\xff\n', True),  # not UTF-8
    "5000 digits": (b'{"step": 3, "loss": ' + HUGE.encode() + b'}\n', True),
    "loss 1e308": (b'{"step": 3, "loss": 1e308}\n', True),  # finite, but matplotlib's axis arithmetic overflows
    "loss a string": (b'{"step": 3, "loss": "abc"}\n', True),  # the smoothing multiplied it
    "step infinite": (b'{"step": Infinity, "loss": 1.0}\n', True),
    "step a bool": (b'{"step": true, "loss": 1.0}\n', True),
    "restart a string": (b'{"step": 3, "loss": 1.0, "restart": "x"}\n', True),
    "tokens a list": (b'{"step": 3, "loss": 1.0, "tokens": [1]}\n', True),
    # event rows: read_metrics passes over them, read_discarded takes only two finite step numbers
    "discarded infinite": (b'{"event": "discarded", "restart": 0, "steps": [Infinity, 5], "train_s": 1}\n', False),
    "discarded a bool": (b'{"event": "discarded", "restart": 0, "steps": [true, 5], "train_s": 1}\n', False),
    "discarded one step": (b'{"event": "discarded", "restart": 0, "steps": [1], "train_s": 1}\n', False),
}


@pytest.mark.parametrize("line, unreadable", DAMAGED.values(), ids=DAMAGED)
def test_a_damaged_line_is_skipped_never_a_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 line: bytes, unreadable: bool) -> None:
    path = tmp_path / "metrics.jsonl"
    _write(path, [_train(1), _train(2)])
    with path.open("ab") as f:
        f.write(line)
    assert [r["step"] for r in plot.read_metrics(path)] == [1, 2]
    assert plot.read_discarded(path) == []
    assert ("skipped 1 unreadable line(s)" in capsys.readouterr().err) == unreadable


def test_a_diverged_loss_is_drawn_and_damage_leaves_the_png(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job" / "metrics.jsonl"
    _write(path, [_train(1), _train(2)])
    with path.open("ab") as f:
        f.write(b'{"step": 3, "loss": NaN, "val_loss": Infinity, "tokens": 192, "restart": 0}\n')
        f.write(b"".join(line for line, _ in DAMAGED.values()))
    assert [r["step"] for r in plot.read_metrics(path)] == [1, 2, 3]  # NaN is how a diverged loss is written
    assert plot.main([str(tmp_path), "--out", str(tmp_path / "loss.png")]) == 0
    err = capsys.readouterr().err
    assert f"skipped {sum(u for _, u in DAMAGED.values())} unreadable line(s)" in err and "Traceback" not in err
    assert (tmp_path / "loss.png").read_bytes().startswith(PNG_MAGIC)


# ---- the PNG -----------------------------------------------------------------------------------


def test_plot_a_sweep_into_one_png(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    _write(sweep / "job_a" / "metrics.jsonl", REQUEUED)
    _write(sweep / "job_b" / "metrics.jsonl", [_train(s) for s in range(1, 11)])
    (sweep / "not_a_job").mkdir()
    assert list(plot.find_runs(sweep)) == ["job_a", "job_b"]
    assert plot.main([str(sweep), "--out", str(tmp_path / "out" / "loss.png")]) == 0
    png = (tmp_path / "out" / "loss.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 20_000


def test_plot_adds_a_goodput_bar_per_job_with_events_in_the_file(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    sweep = tmp_path / "sweep"
    for name, stop_at in (("job_a", 3), ("job_b", 6)):
        rows = [{"event": "start", "restart": 0, "resumed_step": 0, "startup_s": 2.0, "time": 100.0}]
        rows += [{**_train(s), "step_time": 1.0, "train_s": 1.0, "time": 100.0 + s} for s in range(1, 7)]
        rows.insert(stop_at + 1, {"event": "end", "status": "preempted", "restart": 0, "time": 100.5 + stop_at})
        _write(sweep / name / "metrics.jsonl", rows)
    ledgers = plot.job_ledgers(sweep, plot.find_runs(sweep))
    assert list(ledgers) == ["job_a", "job_b"] and ledgers["job_a"].productive == pytest.approx(6.0)
    assert plot.main([str(sweep)]) == 0
    assert "skipped" not in capsys.readouterr().err  # event rows are no unreadable lines
    assert (sweep / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_plot_a_single_run_dir_defaults_next_to_it(tmp_path: Path) -> None:
    run = tmp_path / "job_a"
    _write(run / "metrics.jsonl", REQUEUED)
    assert plot.main([str(run)]) == 0
    assert (run / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_nothing_to_plot_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "metrics.jsonl").write_text("")
    assert plot.main([str(tmp_path)]) == 2
    assert "no metrics.jsonl with rows" in capsys.readouterr().err
    assert plot.main([str(tmp_path / "missing")]) == 2


# ---- bench/run_all.py --------------------------------------------------------------------------


def _fake(monkeypatch: pytest.MonkeyPatch, name: str, run: object, doc: str = "") -> None:
    mod = types.ModuleType(f"bench.{name}", doc)
    mod.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, f"bench.{name}", mod)


def test_run_all_writes_machine_and_one_table_per_benchmark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def good(quick: bool = False) -> list[dict]:
        assert quick
        return [{"name": "step | ours", "value": 1234.5, "unit": "tokens/s", "goal": ">= 1.0x", "ratio": 1.07},
                {"name": "MFU", "value": 0.0123, "unit": "%", "note": "no ratio, no goal"}]

    def bad(quick: bool = False) -> list[dict]:
        raise RuntimeError("disk full\nsecond line")

    _fake(monkeypatch, "bench_model", good, "Training-step speed.\n\nMore text.")
    _fake(monkeypatch, "bench_data", bad)
    monkeypatch.setitem(sys.modules, "bench.bench_launch", None)  # import fails as if absent
    out = tmp_path / "RESULTS.md"
    code = run_all.main(["--out", str(out), "--quick", "--only", "bench_model,bench_data,bench_launch"])
    text = out.read_text()
    assert code == 1  # bench_data failed, and the report was still written
    for key in ("| CPU |", "| cores |", "| memory |", "| GPU |", "| torch |", "| date (UTC) |"):
        assert key in text, key
    assert "## bench_model: Training-step speed." in text
    assert "| name | value | unit | goal | ratio | note |" in text
    assert "| step \\| ours | 1,234 | tokens/s | >= 1.0x | 1.07x |  |" in text
    assert "| MFU | 0.0123 | % |  |  | no ratio, no goal |" in text
    assert "## bench_data" in text and "RuntimeError: disk full |" in text and "FAILED" in text
    assert "## bench_launch" in text  # missing modules are listed, not fatal


@pytest.mark.slow
def test_the_quick_benchmarks_of_seconds_run_for_real(tmp_path: Path) -> None:
    """A smoke test of three benchmarks as `make bench` runs them (--quick): the model step against the
    plain-PyTorch GPT (issue 12's ratio), token shards, and the launcher; the others take minutes."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "bench.run_all", "--quick", "--out", str(out), "--only",
                           "bench_model,bench_data,bench_launch"], cwd=root, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    text = out.read_text()
    assert "FAILED" not in text and "error" not in text
    assert text.count("\nTook ") == 3
    row = next(line for line in text.splitlines() if line.startswith("| train step fp32: ours |"))
    value, ratio = row.split("|")[2].strip(), row.split("|")[5].strip()
    assert float(value.replace(",", "")) > 0 and ratio.endswith("x") and float(ratio[:-1]) > 0


def test_run_all_marks_missing_modules_and_unknown_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sec = run_all.run_benchmark("bench_does_not_exist", quick=True)
    assert sec.status == "missing" and sec.rows == []
    assert run_all.main(["--out", str(tmp_path / "r.md"), "--only", "nope"]) == 2
    assert "unknown benchmark nope" in capsys.readouterr().err


def test_cell_format() -> None:
    assert [run_all.fmt("value", v) for v in (None, 12345.6, 3.14159, 0.000123, True, "a|b")] == [
        "", "12,346", "3.14", "0.000123", "True", "a\\|b"]
    assert run_all.fmt("ratio", 2) == "2.00x"


def test_bench_gpu_reports_no_gpu_on_cpu_and_its_step_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from bench import bench_gpu

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rows = bench_gpu.run(quick=True)
    assert rows[0]["note"] == "no GPU"
    # the measured step itself, on CPU with the tiny model (the GPU path adds compile and flash)
    r = bench_gpu.measure("tiny", torch.device("cpu"), batch=1, steps=1, warmup=0, compile=False,
                          bf16=False, seq_len=8)
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and math.isnan(r["first_step_s"])  # no warm-up step
    r = bench_gpu.measure("tiny", torch.device("cpu"), batch=1, steps=1, warmup=1, compile=False, bf16=False, seq_len=8)
    assert r["first_step_s"] > 0  # the first warm-up step's time: on the GPU, compiled, the compilation


def test_smoothing_is_a_debiased_moving_average() -> None:
    assert plot.smooth([]) == []
    assert plot.smooth([5.0, 5.0, 5.0]) == pytest.approx([5.0, 5.0, 5.0])  # constant stays constant
    assert plot.smooth([4.0, 2.0], weight=0.5) == pytest.approx([4.0, (0.25 * 4 + 0.5 * 2) / 0.75])
    noisy = [5.0 + (0.5 if i % 2 else -0.5) - i * 0.01 for i in range(100)]
    tail = plot.smooth(noisy)[50:]
    assert max(tail) - min(tail) < 0.5 * (max(noisy[50:]) - min(noisy[50:]))  # the noise shrinks
