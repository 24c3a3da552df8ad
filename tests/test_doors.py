"""Every door answers bad input with one line on stderr and exit code 2, never a traceback.

One table: each row runs a door (main.py, every launch/sweep.py subcommand, launch/render.py,
launch/plot.py, gpt2.export, gpt2.generate, data_prep/download.py) as a subprocess, the way a
person types it, with one bad input: a missing or wrong-type path, a file that is no run or
sweep, a YAML of the wrong shape, a DeepSpeed JSON that is not an object or asks for what the
trainer does not support, a read-only folder and a full disk.

A read-only folder and a full disk are real: tests run as root, and chmod does not stop root,
so the fixture mounts two small tmpfs filesystems, one remounted read-only (EROFS even for root)
and one filled to the last byte (ENOSPC). Without the right to mount, those rows are skipped
with the reason. After a full-disk row no temporary file may be left on that filesystem.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from gpt2 import shards
from launch import record

ROOT = Path(__file__).resolve().parent.parent


# ---- the world the rows point at -------------------------------------------------------------


@dataclass
class World:
    w: Path  # plain files and folders
    ro: Path | None  # a read-only filesystem (None: mounting is not permitted here)
    full: Path | None  # a full filesystem
    small: Path | None  # a 1 MiB filesystem: a run's small files fit, a checkpoint does not
    why_no_mount: str = ""
    env: dict[str, str] = field(default_factory=dict)


def _mount(path: Path, *opts: str) -> str | None:
    """Mount a tmpfs at `path`; the error text when that is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(opts), "tmpfs", str(path)],
                         capture_output=True, text=True, check=False)
    return None if res.returncode == 0 else (res.stderr.strip() or f"mount exited {res.returncode}")


def _fill(fs: Path) -> None:
    """Write zeros into `fs` until the filesystem says it is full."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    with pytest.raises(OSError):
        (fs / "probe").write_bytes(b"x")


EXPERIMENT = """
cluster: local
executor: local
overrides:
  model: tiny
  dataset.train_dataset.data_root: {data}
  dataset.val_dataset.data_root: {data}
  run.device: cpu
sweep: {{grid: {{trainer.config.lr: [3e-4]}}}}
resources: {{nodes: 1, gpus_per_node: 0, tasks_per_node: 1, time: 10}}
"""


def _sweep(d: Path, data: Path) -> None:
    """A finished one-job sweep, as `launch/sweep.py` leaves it."""
    (d / "main").mkdir(parents=True)
    record.write_sweep_meta(d, {"name": d.name, "experiment": "jobs/x.yaml", "cluster": "local",
                                "executor": "local", "resources": {"nodes": 1, "gpus_per_node": 0}})
    rec = record.JobRecord(job="main", overrides=[f"dataset.train_dataset.data_root={data}"], config_hash="h",
                           executor="local", job_id="4242", state=record.COMPLETED, last_step=2, last_loss=9.0)
    (d / record.RECORD).write_text(rec.to_json() + "\n")
    (d / f"{record.RECORD}.lock").write_text("")
    record.write_state(d / "main", record.RunState(state=record.COMPLETED, executor="local", step=2, loss=9.0))
    (d / "main" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.5, "tokens_per_s": 10.0}\n'
                                              '{"step": 2, "loss": 9.0, "tokens_per_s": 10.0}\n')


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = tmp_path_factory.mktemp("doors")
    data = w / "data"
    data.mkdir()
    for split in ("train", "val"):
        shards.write_shard(data / f"tiny_{split}_000000.bin", (np.arange(8192) % 1000).astype(np.uint16))
    (w / "exp.yaml").write_text(EXPERIMENT.format(data=data))
    (w / "list.yaml").write_text("- model: tiny\n- executor: local\n")
    (w / "scalar.yaml").write_text("just a sentence\n")
    (w / "empty").mkdir()
    (w / "run").mkdir()
    (w / "run" / "config.yaml").write_text("run: {dir: x}\n")
    record.write_state(w / "run", record.RunState(state=record.COMPLETED))
    (w / "txt").mkdir()
    (w / "txt" / "a.txt").write_text("The quick brown fox jumps over the lazy dog.\n" * 400)
    (w / "ds_list.json").write_text("[1, 2]\n")
    (w / "ds_invalid.json").write_text('{"zero_optimization": {"stage": 1,}\n')
    (w / "ds_optimizer.json").write_text('{"optimizer": {"type": "Adam", "params": {"lr": 0.001}}}\n')
    (w / "ds_stage7.json").write_text('{"zero_optimization": {"stage": 7}}\n')
    (w / "ds_offload.json").write_text(json.dumps({"zero_optimization": {
        "stage": 2, "offload_optimizer": {"device": "cpu"}}}))
    _sweep(w / "sweep", data)

    mounted: list[Path] = []
    why = ""
    ro, full, small = w / "ro", w / "full", w / "small"
    for fs, size in ((ro, "1m"), (full, "256k"), (small, "1m")):
        err = _mount(fs, f"size={size}")
        if err:
            why = f"cannot mount a tmpfs here ({err})"
            break
        mounted.append(fs)
    if not why:
        _sweep(ro / "archived", data)
        (ro / "runs").mkdir()
        (ro / "out").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        for sub in ("runs", "out"):
            (full / sub).mkdir()
        _fill(full)
    env = {"RUNS_DIR": str(w / "runs"), "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    yield World(w, ro if not why else None, full if not why else None, small if not why else None, why, env)
    for fs in reversed(mounted):
        subprocess.run(["umount", "-l", str(fs)], check=False, capture_output=True)


# ---- the table -------------------------------------------------------------------------------

SWEEP, RENDER, PLOT = "launch/sweep.py", "launch/render.py", "launch/plot.py"
EXPORT, GENERATE, DOWNLOAD, MAIN = ["-m", "gpt2.export"], ["-m", "gpt2.generate"], "data_prep/download.py", "main.py"
TRAIN = ["model=tiny", "dataset.train_dataset.data_root={w}/data", "dataset.val_dataset.data_root={w}/data",
         "run.device=cpu", "trainer.config.max_steps=2", "trainer.config.batch_size=2", "dataset.seq_len=32",
         "trainer.config.grad_accumulation_steps=1"]
DS = [*TRAIN, "trainer=deepspeed", "run.dir={w}/run_ds"]


@dataclass
class Row:
    argv: list[str]  # after `python`; {w}, {ro}, {full}, {small} are filled in
    says: str = ""  # a word the one line must hold
    env: dict[str, str] = field(default_factory=dict)
    started: bool = False  # training ran first: its log lines come before the one error line


ROWS: dict[str, Row | tuple[Row, pytest.MarkDecorator]] = {
    # launch/sweep.py submit
    "submit_missing_experiment": Row([SWEEP, "{w}/nope.yaml"], "nope.yaml"),
    "submit_experiment_is_a_list": Row([SWEEP, "{w}/list.yaml"], "list.yaml"),
    "submit_experiment_is_a_sentence": Row([SWEEP, "{w}/scalar.yaml"], "scalar.yaml"),
    "submit_experiment_is_a_folder": Row([SWEEP, "{w}/empty"], "empty"),
    "submit_unknown_flag": Row([SWEEP, "{w}/exp.yaml", "--bogus"], "--bogus"),
    "submit_bad_name": Row([SWEEP, "{w}/exp.yaml", "--name", "a/b"], "--name"),
    "submit_read_only_runs": Row([SWEEP, "{w}/exp.yaml", "--detach"], "read-only", {"RUNS_DIR": "{ro}/runs"}),
    "submit_full_disk": Row([SWEEP, "{w}/exp.yaml", "--detach"], "disk is full", {"RUNS_DIR": "{full}/runs"}),
    # status, cancel, resubmit, logs
    "status_no_argument": Row([SWEEP, "status"], "sweep_dir"),
    "status_missing_dir": Row([SWEEP, "status", "{w}/nope"], "not a sweep"),
    "status_of_a_file": Row([SWEEP, "status", "{w}/list.yaml"], "not a sweep"),
    "status_of_a_run": Row([SWEEP, "status", "{w}/run"], "not a sweep"),
    "cancel_of_a_run": Row([SWEEP, "cancel", "{w}/run"], "not a sweep"),
    "cancel_unknown_job": Row([SWEEP, "cancel", "{w}/sweep", "zzz"], "zzz"),
    "cancel_read_only_sweep": Row([SWEEP, "cancel", "{ro}/archived"], "read-only"),
    "resubmit_of_a_file": Row([SWEEP, "resubmit", "{w}/list.yaml", "--failed"], "not a sweep"),
    "resubmit_without_which": Row([SWEEP, "resubmit", "{w}/sweep"], "--failed"),
    "logs_of_an_empty_dir": Row([SWEEP, "logs", "{w}/empty", "main"], "not a sweep"),
    "logs_unknown_job": Row([SWEEP, "logs", "{w}/sweep", "zzz"], "zzz"),
    "logs_lines_not_a_number": Row([SWEEP, "logs", "{w}/sweep", "main", "-n", "many"], "many"),
    # launch/render.py
    "render_missing_experiment": Row([RENDER, "{w}/nope.yaml"], "nope.yaml"),
    "render_experiment_is_a_list": Row([RENDER, "{w}/list.yaml"], "list.yaml"),
    "render_into_read_only": Row([RENDER, "{w}/exp.yaml", "-o", "{ro}/out/job.sbatch"], "read-only"),
    "render_into_full_disk": Row([RENDER, "{w}/exp.yaml", "-o", "{full}/out/job.sbatch"], "disk is full"),
    # launch/plot.py
    "plot_missing_dir": Row([PLOT, "{w}/nope"], "nope"),
    "plot_of_a_file": Row([PLOT, "{w}/list.yaml"], "list.yaml"),
    "plot_of_an_empty_dir": Row([PLOT, "{w}/empty"], "metrics.jsonl"),
    "plot_into_read_only": Row([PLOT, "{w}/sweep", "--out", "{ro}/out/loss.png"], "read-only"),
    "plot_into_full_disk": Row([PLOT, "{w}/sweep", "--out", "{full}/out/loss.png"], "disk is full"),
    # gpt2.export, gpt2.generate
    "export_missing_path": Row([*EXPORT, "{w}/nope", "--out", "{w}/hf"], "nope"),
    "export_of_an_empty_dir": Row([*EXPORT, "{w}/empty", "--out", "{w}/hf"], "empty"),
    "export_of_a_run_without_checkpoints": Row([*EXPORT, "{w}/run", "--out", "{w}/hf"], "run"),
    "export_without_out": Row([*EXPORT, "{w}/run"], "--out"),
    "generate_missing_path": Row([*GENERATE, "{w}/nope"], "nope"),
    "generate_of_a_file": Row([*GENERATE, "{w}/list.yaml"], "list.yaml"),
    "generate_zero_samples": Row([*GENERATE, "{w}/run", "--num_samples", "0"], "--num_samples"),
    "generate_unknown_device": Row([*GENERATE, "{w}/run", "--device", "tpu"], "tpu"),
    # data_prep/download.py
    "download_unknown_dataset": Row([DOWNLOAD, "--dataset", "nope", "--dir", "{w}/d1"], "nope"),
    "download_shard_size_zero": Row([DOWNLOAD, "--dataset", "text:{w}/txt/*.txt", "--shard_size", "0",
                                     "--dir", "{w}/d2"], "--shard_size"),
    "download_dir_is_a_file": Row([DOWNLOAD, "--dataset", "text:{w}/txt/*.txt", "--dir", "{w}/list.yaml"],
                                  "list.yaml"),
    "download_no_matching_text": Row([DOWNLOAD, "--dataset", "text:{w}/txt/*.none", "--dir", "{w}/d3"], ""),
    "verify_missing_dir": Row([DOWNLOAD, "verify", "{w}/nope"], "nope"),
    "download_into_read_only": Row([DOWNLOAD, "--dataset", "text:{w}/txt/*.txt", "--shard_size", "1000",
                                    "--dir", "{ro}/out/shards"], "read-only"),
    "download_into_full_disk": Row([DOWNLOAD, "--dataset", "text:{w}/txt/*.txt", "--shard_size", "1000",
                                    "--dir", "{full}/out"], "disk is full"),
    # main.py
    "main_missing_data": Row([MAIN, *TRAIN, "dataset.train_dataset.data_root={w}/nope", "run.dir={w}/r1"], "nope"),
    "main_deepspeed_json_is_a_list": Row([MAIN, *DS, "trainer.config.deepspeed_config={w}/ds_list.json"], "list"),
    "main_deepspeed_json_invalid": Row([MAIN, *DS, "trainer.config.deepspeed_config={w}/ds_invalid.json"],
                                       "not valid JSON"),
    "main_deepspeed_json_sets_optimizer": Row([MAIN, *DS, "trainer.config.deepspeed_config={w}/ds_optimizer.json"],
                                              "optimizer"),
    "main_deepspeed_json_rejected_by_deepspeed": Row([MAIN, *DS, "trainer.config.deepspeed_config={w}/ds_stage7.json"],
                                                     "stage: Input should be"),  # DeepSpeed's pydantic check
    "main_deepspeed_json_offload": Row([MAIN, *DS, "trainer.config.deepspeed_config={w}/ds_offload.json"],
                                       "offload"),
    "main_read_only_run_dir": Row([MAIN, *TRAIN, "run.dir={ro}/out/run"], "read-only"),
    "main_run_dir_name_too_long": Row([MAIN, *TRAIN, "run.dir={w}/" + "y" * 300], "too long"),  # ENAMETOOLONG
    "main_checkpoint_on_a_full_disk": Row([MAIN, *TRAIN, "run.dir={small}/run"], "disk is full", started=True),
    "main_unresolvable_interpolation": Row([MAIN, *TRAIN, "run.dir=${{nope.missing}}"], "nope"),
    "main_unset_environment_variable": Row([MAIN, *TRAIN, "run.dir=${{oc.env:GPT2_TEST_UNSET_VAR}}"],
                                           "GPT2_TEST_UNSET_VAR"),
    "main_nonexistent_device": Row([MAIN, *TRAIN, "run.device=tpu", "run.dir={w}/r2"], "tpu"),
    "main_device_not_on_this_machine": Row([MAIN, *TRAIN, "run.device=cuda:7", "run.dir={w}/r3"], "cuda:7"),
    "main_sweep_syntax": Row([MAIN, *TRAIN, "trainer.config.lr=1e-3,1e-4"], "sweep"),
    "main_unknown_key": Row([MAIN, *TRAIN, "trainer.config.lrr=1"], "trainer.config.lrr"),
    "main_wrong_type": Row([MAIN, *TRAIN, "trainer.config.max_steps=many"], "max_steps"),
}


def _params() -> list[object]:
    return [pytest.param(row, id=name) for name, row in ROWS.items()]


def _fill_in(text: str, world: World) -> str:
    return text.format(w=world.w, ro=world.ro, full=world.full, small=world.small)


def _tmp_files(fs: Path) -> list[Path]:
    return [p for p in fs.rglob("*") if p.is_file() and (".tmp" in p.name or p.name.endswith(".tmp"))]


@pytest.mark.parametrize("row", _params())
def test_bad_input_is_one_line_and_exit_2(world: World, row: Row) -> None:
    text = " ".join(row.argv) + " ".join(row.env.values())
    if any(k in text for k in ("{ro}", "{full}", "{small}")) and world.ro is None:
        pytest.skip(world.why_no_mount)
    argv = [sys.executable, *(_fill_in(a, world) for a in row.argv)]
    env = {**os.environ, **world.env, **{k: _fill_in(v, world) for k, v in row.env.items()}}
    res = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = res.stderr.strip().splitlines()
    if row.started:  # the trainer's own log lines first; then one error line, the last
        lines = [line for line in lines if not line.startswith("20")]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith("error: ") and row.says in lines[0], lines[0]
    for fs in (world.full, world.small):
        if fs is not None and fs.as_posix() in text.replace("{full}", str(world.full)).replace(
                "{small}", str(world.small)):
            assert _tmp_files(fs) == [], _tmp_files(fs)
    if "disk is full" in row.says:
        left = [p for fs in (world.full, world.small) if fs for p in _tmp_files(fs)]
        left += [p for fs in (world.full, world.small) if fs for p in fs.rglob("step_*")]
        assert left == [], left
        if world.full is not None:  # nothing half-written where the outputs go (a PNG, a script, shards)
            assert list((world.full / "out").iterdir()) == []


def test_status_of_a_read_only_archived_sweep_just_works(world: World) -> None:
    if world.ro is None:
        pytest.skip(world.why_no_mount)
    sweep = world.ro / "archived"
    with pytest.raises(OSError):
        (sweep / "probe").write_text("x")  # really read-only, even for root
    for argv in (["status", str(sweep)], ["status", str(sweep), "--json"], ["logs", str(sweep), "main"]):
        res = subprocess.run([sys.executable, SWEEP, *argv], cwd=ROOT, env={**os.environ, **world.env},
                             capture_output=True, text=True, timeout=120, check=False)
        assert res.returncode == 0 and res.stderr == "", res.stderr
    res = subprocess.run([sys.executable, SWEEP, "status", str(sweep)], cwd=ROOT, env={**os.environ, **world.env},
                         capture_output=True, text=True, timeout=120, check=False)
    assert "1 COMPLETED" in res.stdout and "9.0000" in res.stdout, res.stdout


def test_the_full_disk_is_really_full(world: World) -> None:
    """The full-disk rows mean something only if a write there fails with ENOSPC."""
    if world.full is None:
        pytest.skip(world.why_no_mount)
    with pytest.raises(OSError) as err:
        (world.full / "runs" / "x").write_bytes(b"x" * 8192)
    assert err.value.errno == 28
    assert shutil.disk_usage(world.full).free < 8192
