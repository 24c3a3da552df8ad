"""The GPU check's own machinery, proven on the CPU before a GPU is ever lent (issue 12).

- its dry mode (`GPU_CHECK_DRY=1 make gpu-check`) runs every stage end to end with tiny shapes:
  the CUDA tests skip, the benchmark and the three backends run on the CPU, a USR2 stops a real
  `main.py` and a second one resumes it onto the uninterrupted curve, bit for bit in fp32;
- without a GPU and without the dry mode, nothing is hidden: the check fails and says where;
- its verdicts (bench/gpu_report.py) catch a resume that did not happen or left the curve;
- the wheelhouse check (bench/wheelhouse.py) refuses what the device machine cannot install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bench import gpu_check, gpu_report, wheelhouse

ROOT = Path(__file__).resolve().parent.parent


# ---- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_dry_mode_runs_every_stage_end_to_end_through_make(tmp_path: Path) -> None:
    work, results = tmp_path / "work", tmp_path / "RESULTS-gpu-dry.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", "GPU_CHECK_DRY=1",
                           f"ARGS=--work {work} --results {results}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    summary = json.loads((work / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in summary["stages"]}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert summary["dry"] is True
    assert {n: s["status"] for n, s in stages.items()} == dict.fromkeys(gpu_check.BUDGET, "ok")

    # the CUDA tests were collected and skipped, not left out
    tests = stages["tests"]["data"]["tests"]
    assert len(tests) >= 8 and {t["outcome"] for t in tests} == {"skipped"}
    # the benchmark ran its rows on the CPU: eager and compiled
    names = [r["name"] for r in stages["bench"]["data"]["rows"]]
    assert any("compile" in n for n in names) and all(r.get("value") for r in stages["bench"]["data"]["rows"])

    runs = stages["backends"]["data"]["runs"]
    assert set(runs) == {"ddp", "fsdp", "zero2"} and all(r["problems"] == [] for r in runs.values())
    for name in ("fsdp", "zero2"):
        assert runs[name]["vs_ddp"]["steps"] == gpu_check.BACKEND_STEPS["dry"]
        assert runs[name]["vs_ddp"]["max_abs_diff"] <= gpu_report.TOLERANCE["backend"]["dry"]

    run = stages["run"]["data"]
    end, at = gpu_check.RUN_STEPS["dry"], gpu_check.RUN_SIGNAL_AT["dry"]
    assert run["first_exit"] == 75 and run["problems"] == []
    assert at <= run["signalled_after_step"] <= run["resumed_at"] < end
    after = run["vs_reference"]["after_resume"]
    assert after["steps"] == end - run["resumed_at"] and after["bitwise"] is True  # fp32 on a CPU: to the bit
    report = results.read_text()
    assert "DRY RUN on the CPU" in report and "| after the resume |" in report


@pytest.mark.slow
def test_without_a_gpu_the_real_check_fails_and_lists_what_did_not_run(tmp_path: Path) -> None:
    # not the dry mode, on a machine with no CUDA: every GPU stage must fail visibly, none pass quietly
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_DRY"}
    env["PYTHONPATH"] = str(ROOT)
    # (the tests stage, where a CUDA test skips: the test below)
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--stages", "env,bench,run", "--work",
                           str(tmp_path / "w"), "--results", str(tmp_path / "r.md")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    stages = {s["name"]: s for s in json.loads((tmp_path / "w" / "gpu_check.json").read_text())["stages"]}
    assert proc.returncode == 1
    assert list(stages) == ["env", "bench", "data", "run"]  # data: the run needs it
    assert stages["env"]["status"] == "failed" and "no CUDA device" in stages["env"]["note"]
    assert stages["bench"]["status"] == "failed" and stages["data"]["status"] == "ok"
    assert stages["run"]["status"] == "failed" and "exited 2" in stages["run"]["note"]  # run.device=cuda: bad input
    assert "## What failed" in (tmp_path / "r.md").read_text()


def test_the_gpu_runs_accept_the_data_the_data_stage_makes(tmp_path: Path) -> None:
    """The data stage's shards, as prepared on the device, hold at least one global batch of the GPU
    runs' shape (block 1024, their batch) in each split: the loaders the run makes accept them."""
    from gpt2.compose import load_config
    from gpt2.train import make_loaders

    data = tmp_path / "pydoc"
    subprocess.run([sys.executable, "data_prep/download.py", *gpu_check.data_args(data, dry=False)], cwd=ROOT,
                   check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    for trainer in gpu_check.BACKENDS.values():
        overrides = gpu_check.train_overrides(data, tmp_path / "run", False, 60, trainer)
        cfg = load_config([*overrides, "run.device=cpu"])  # where it runs does not change the data it needs
        train, val = make_loaders(cfg, rank=0, world_size=1)
        assert (train.batch_size, train.seq_len) == (gpu_check.GPU_BATCH, gpu_check.GPU_BLOCK)
        assert val.num_windows >= val.batch_size and train.num_windows >= 4 * train.batch_size


def test_the_benchmark_halves_a_batch_that_does_not_fit_and_says_which_ran() -> None:
    import torch

    from bench import bench_gpu

    tried: list[int] = []

    def measure_at(batch: int) -> dict[str, float]:
        tried.append(batch)
        if batch > 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
        return {"tokens_per_s": 1000.0 * batch}

    assert bench_gpu.fitting(measure_at, 64) == ({"tokens_per_s": 16000.0}, 16) and tried == [64, 32, 16]
    tried.clear()
    with pytest.raises(torch.OutOfMemoryError):  # never below MIN_BATCH: then the row fails, and says so
        bench_gpu.fitting(lambda b: measure_at(b * 100), 32)
    assert tried == [3200, 1600, 800, 400] and bench_gpu.MIN_BATCH == 4  # batches 32, 16, 8, 4
    with pytest.raises(ValueError):  # anything else is not retried
        bench_gpu.fitting(lambda b: (_ for _ in ()).throw(ValueError("a compile error")), 64)


def test_on_a_gpu_machine_a_cuda_test_that_skips_fails_the_tests_stage(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text('<testsuite><testcase name="test_a"/><testcase name="test_b"><skipped message="needs a CUDA GPU"/>'
                     '</testcase></testsuite>')
    for dry, status, note in ((True, "ok", ""), (False, "failed", "; on a GPU machine no CUDA test may skip")):
        check = gpu_check.Check(SimpleNamespace(dry=dry, work=str(tmp_path), deadline=60.0, stages=["tests"]))
        check.sh = lambda st, cmd, timeout: 0  # type: ignore[method-assign] - pytest "passed", one test skipped
        st = gpu_check.Stage("tests", budget=60.0)
        check.run_tests(st)
        assert (st.status, st.note) == (status, "1 passed, 1 skipped" + note), dry


def test_the_dry_training_stages_run_one_thread_per_process_so_their_curves_can_agree_to_the_bit(
        tmp_path: Path) -> None:
    """The dry mode demands a bitwise resume against a reference run in another process; a CPU's
    kernels round by how they split work across threads, so both must run with one thread."""
    dry = gpu_check.Check(SimpleNamespace(dry=True, work=str(tmp_path), deadline=60.0, stages=["run"]))
    assert (dry.train_env["OMP_NUM_THREADS"], dry.train_env["MKL_NUM_THREADS"]) == ("1", "1")
    gpu = gpu_check.Check(SimpleNamespace(dry=False, work=str(tmp_path), deadline=60.0, stages=["run"]))
    assert gpu.train_env is gpu.env  # on the device: the machine's threads (the GPU does the work)


def test_a_deadline_skips_the_stages_it_leaves_no_time_for_and_still_writes_the_report(tmp_path: Path) -> None:
    code = gpu_check.main(["--dry", "--deadline", "2", "--work", str(tmp_path / "w"),
                           "--results", str(tmp_path / "r.md"), "--out", str(tmp_path / "out")])
    assert code == 1
    stages = json.loads((tmp_path / "out" / "gpu_check.json").read_text())["stages"]
    assert [s["status"] for s in stages] == ["skipped"] * len(gpu_check.BUDGET)
    assert (tmp_path / "out" / "r.md").read_text().count("| skipped |") == len(gpu_check.BUDGET)


# ---- verdicts ----------------------------------------------------------------------------------
def rows(losses: dict[int, float], restart_from: int | None = None) -> dict[int, dict[str, Any]]:
    """Train rows as gpt2/logs.py writes them; steps after `restart_from` by restart 1."""
    return {s: {"step": s, "loss": v, "tokens_per_s": 1000.0, "mfu": 0.4, "step_time": 0.1, "peak_mem_mb": 10.0,
                "restart": int(restart_from is not None and s > restart_from)} for s, v in losses.items()}


CURVE = {s: 10.0 - 0.1 * s for s in range(1, 21)}
RESUMED = "2026-11-30 | resumed from /r/checkpoints/step_000011 at step 11\n"


def test_a_resume_onto_the_same_curve_passes_and_says_bitwise() -> None:
    d = gpu_report.summarize_run(rows(CURVE, 11), RESUMED, 20, 10, rows(CURVE), tol=0.0)
    assert d["problems"] == [] and d["resumed_at"] == 11
    assert d["vs_reference"]["after_resume"] == {"steps": 9, "max_abs_diff": 0.0, "at_step": 12, "bitwise": True}


def test_a_resumed_curve_off_the_reference_is_a_problem_and_within_tolerance_is_not() -> None:
    off = {**CURVE, 15: CURVE[15] + 0.05}
    bad = gpu_report.summarize_run(rows(off, 11), RESUMED, 20, 10, rows(CURVE), tol=0.02)
    assert any("left the uninterrupted one" in p and "step 15" in p for p in bad["problems"])
    near = {**CURVE, 15: CURVE[15] + 0.01}
    ok = gpu_report.summarize_run(rows(near, 11), RESUMED, 20, 10, rows(CURVE), tol=0.02)
    assert ok["problems"] == [] and ok["vs_reference"]["after_resume"]["bitwise"] is False


@pytest.mark.parametrize("output, signalled, restart_from, losses, expect", [
    ("", 10, 11, CURVE, "did not say it resumed"),
    (RESUMED, None, 11, CURVE, "USR2 was never sent"),
    (RESUMED.replace("step 11", "step 4"), 10, 4, CURVE, "not just after the USR2"),
    (RESUMED, 10, None, CURVE, "step 12 was not logged by the restarted process"),
    (RESUMED, 10, 11, {s: v for s, v in CURVE.items() if s != 17}, "1 steps missing"),
    (RESUMED, 10, 11, {s: 10.0 for s in CURVE}, "the loss did not fall"),
])
def test_what_a_failed_resume_looks_like_is_named(output: str, signalled: int | None, restart_from: int | None,
                                                   losses: dict[int, float], expect: str) -> None:
    d = gpu_report.summarize_run(rows(losses, restart_from), output, 20, signalled, None, tol=0.0)
    assert any(expect in p for p in d["problems"]), d["problems"]


def test_a_backend_that_timed_out_or_drifted_from_ddp_is_a_problem() -> None:
    ddp = rows(CURVE)
    assert gpu_report.summarize_backend(rows(CURVE), 0, 20, ddp, tol=1e-3)["problems"] == []
    assert "timed out" in gpu_report.summarize_backend(rows(CURVE), None, 20, ddp, tol=1e-3)["problems"]
    drift = gpu_report.summarize_backend(rows({**CURVE, 3: CURVE[3] + 0.5}), 0, 20, ddp, tol=0.1)
    assert any("from DDP 0.5 at step 3" in p for p in drift["problems"])


def test_test_outcomes_come_from_the_verbose_lines_when_pytest_was_killed(tmp_path: Path) -> None:
    out = "tests/test_gpu.py::test_a PASSED\ntests/test_gpu.py::test_b[ddp] FAILED\n"
    got = gpu_report.parse_tests(tmp_path / "missing.xml", out)
    assert [(t["test"], t["outcome"]) for t in got] == [("test_a", "passed"), ("test_b[ddp]", "failed")]


def test_the_report_shows_the_tail_of_a_failed_stage() -> None:
    stage = gpu_check.Stage("run", status="failed", note="exit 1", output="a\nTraceback\nValueError: boom\n")
    check = SimpleNamespace(dry=False, stages=[stage], elapsed=lambda: 12.0, deadline=360.0)
    text = gpu_report.render(check, "python3 bench/gpu_check.py")  # type: ignore[arg-type]
    assert "| run | failed |" in text and "### run: failed" in text and "ValueError: boom" in text


# ---- the wheelhouse ----------------------------------------------------------------------------
def fake_wheel(folder: Path, filename: str, requires: tuple[str, ...] = ()) -> None:
    name, version = filename.split("-")[:2]
    with zipfile.ZipFile(folder / filename, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: {}\n{}".format(name, "".join(f"Requires-Dist: {r}\n" for r in requires)))


def test_the_wheelhouse_check_refuses_what_the_device_cannot_install(tmp_path: Path) -> None:
    (tmp_path / "gpt2.tiktoken").write_text("ranks")
    fake_wheel(tmp_path, "omegaconf-2.3.1-py3-none-any.whl", ("antlr4-python3-runtime==4.9.*", "PyYAML>=5.1.0"))
    fake_wheel(tmp_path, "antlr4_python3_runtime-4.9.3-py3-none-any.whl")
    fake_wheel(tmp_path, "fast-1.0-cp312-cp312-manylinux2014_x86_64.whl", ("colorama; sys_platform == 'win32'",))
    assert wheelhouse.check(tmp_path) == []  # device-installed and other-platform needs are fine

    fake_wheel(tmp_path, "torch-2.13.0-cp312-cp312-manylinux2014_x86_64.whl")
    fake_wheel(tmp_path, "slow-1.0-cp311-cp311-manylinux2014_x86_64.whl")
    fake_wheel(tmp_path, "needy-1.0-py3-none-any.whl", ("nowhere>=1", "omegaconf>=3"))
    fake_wheel(tmp_path, "omegaconf-2.4.0-py3-none-any.whl")
    (tmp_path / "gpt2.tiktoken").unlink()
    problems = "\n".join(wheelhouse.check(tmp_path))
    for expected in ("torch must not be in the wheelhouse", "slow-1.0-cp311", "needs nowhere>=1",
                     "two versions of omegaconf", "gpt2.tiktoken is missing"):
        assert expected in problems


def test_the_wheelhouse_check_holds_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "gpt2.tiktoken").write_bytes(b"x" * 3 * 2**20)
    monkeypatch.setattr(wheelhouse, "MAX_MB", 2)
    assert any("over the 2 MiB limit" in p for p in wheelhouse.check(tmp_path))
