"""Doors that hostile input cannot get through: every value that could reach a job script, and every
name that becomes a path, is refused with exit 2 and one line on stderr, before anything is written.
Legitimate values still render byte-identically to tests/golden/ (tests/test_render.py)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.errors import UserError
from launch import experiment as xp
from launch import record, render, sweep
from launch.executors import setup_lines
from launch.paths import child
from launch.slurm import check_sbatch_option, one_line

ROOT = Path(__file__).resolve().parent.parent
EXP = ROOT / "tests" / "golden" / "golden_exp.yaml"

# control characters: refused in every field, config overrides included
CONTROL = ["a\n#SBATCH --partition=evil", "a\r#SBATCH --x", "a\x00b", "a\tb", "a\u2028echo pwn", "a\u2029b",
           "a\x85b", "a\u202eb", "a\x0bb"]
# shell syntax: refused in every #SBATCH value (config values are quoted and reach Hydra intact)
SHELL = ["x; rm -rf ~", "$(touch /tmp/pwned)", "`id`", "x'\"y", "a b", "x&&y", "x|>y", "x>y"]
HOSTILE = CONTROL + SHELL
SBATCH_FIELDS = ["partition", "account", "qos", "constraint", "mem", "time", "nodes", "gpus_per_node",
                 "tasks_per_node", "cpus_per_task", "array_parallelism", "max_timeouts", "signal_lead_s", "requeue"]


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("RUNS_DIR", str(root))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    return root


def refused(main: object, argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """Run a CLI main in this process: exit 2, nothing on stdout, one printable line on stderr."""
    code = main(argv)  # type: ignore[operator]
    out, err = capsys.readouterr()
    assert code == 2, (argv, out, err)
    assert out == "" and err.startswith("error: ") and err.endswith("\n"), (argv, out, err)
    line = err[:-1]
    assert "\n" not in line and one_line(line) == line, repr(err)  # no raw control character
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def experiment_file(tmp_path: Path, **fields: object) -> Path:
    """A copy of the golden experiment with top-level or resources.* fields replaced (JSON is YAML)."""
    raw = xp.yaml_value(EXP.read_text())
    for key, value in fields.items():
        if key.startswith("resources."):
            raw["resources"][key.split(".", 1)[1]] = value
        else:
            raw[key] = value
    path = tmp_path / "hostile.yaml"
    path.write_text(json.dumps(raw))
    return path


# ---- one place decides ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["job-name", "partition", "account", "qos", "reservation", "constraint", "mem",
                                    "time", "nodes", "gpus-per-node", "signal", "nodelist", "exclude", "array",
                                    "output", "chdir"])
@pytest.mark.parametrize("value", HOSTILE)
def test_check_sbatch_option_refuses_hostile_values(option: str, value: str) -> None:
    if (option in ("output", "chdir") and value in SHELL):
        check_sbatch_option(option, value)  # any printable path: submitit and render.py quote it
        return
    with pytest.raises(UserError) as err:
        check_sbatch_option(option, value, "the field")
    msg = str(err.value)
    assert msg.startswith("the field") and one_line(msg) == msg


@pytest.mark.parametrize(("option", "value"), [
    ("partition", "gpu,preempt"), ("account", "ml-team"), ("qos", "high"), ("constraint", "a100&ib"),
    ("constraint", "[rack1|rack2]*2"), ("mem", "500G"), ("time", 720), ("time", "1-00:00:00"), ("nodes", "2-4"),
    ("gpus-per-node", "a100:8"), ("signal", "B:USR2@120"), ("nodelist", "n[1-4],gpu7"), ("array", "0-99%8"),
    ("job-name", "n_layer=4,lr=0.001"), ("output", "/runs/my sweep/logs/%j.out"), ("requeue", True),
])
def test_check_sbatch_option_accepts_what_slurm_takes(option: str, value: object) -> None:
    assert check_sbatch_option(option, value) == value


# ---- launch/sweep.py --dry-run and launch/render.py ----------------------------------------------


@pytest.mark.parametrize("field", SBATCH_FIELDS)
@pytest.mark.parametrize("value", HOSTILE)
def test_every_resource_from_the_command_line(field: str, value: str, runs: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    argv = [str(EXP), f"resources.{field}={value}"]
    refused(sweep.main, [*argv, "--dry-run"], capsys)
    refused(render.main, argv, capsys)
    assert not runs.exists()


@pytest.mark.parametrize("field", ["resources.partition", "resources.account", "resources.qos",
                                   "resources.constraint", "resources.mem", "resources.time", "name", "cluster",
                                   "description"])
@pytest.mark.parametrize("value", HOSTILE)
def test_every_field_of_the_experiment_file(field: str, value: str, tmp_path: Path, runs: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    exp = experiment_file(tmp_path, **{field: value})
    if field == "description" and value in SHELL:  # a comment line of the rendered script
        e = xp.load_experiment(str(exp))
        assert f"# hostile: {value}\n" in render.render(e, xp.load_profile(e.cluster), runs / "h", 120)
        return
    if field != "description":  # not written into submitit's script
        refused(sweep.main, [str(exp), "--dry-run"], capsys)
    refused(render.main, [str(exp), "-o", str(tmp_path / "x.sbatch")], capsys)
    assert not runs.exists() and not (tmp_path / "x.sbatch").exists()


@pytest.mark.parametrize("value", CONTROL)
def test_config_overrides_with_control_characters(value: str, tmp_path: Path, runs: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    refused(sweep.main, [str(EXP), f"wandb.name={value}", "--dry-run"], capsys, "command-line override")
    refused(render.main, [str(EXP), f"wandb.name={value}"], capsys, "command-line override")
    exp = experiment_file(tmp_path, overrides={"model": "tiny", "wandb.name": value})
    refused(sweep.main, [str(exp), "--dry-run"], capsys, "override")
    refused(render.main, [str(exp)], capsys, "override")
    assert not runs.exists()


@pytest.mark.parametrize("value", HOSTILE + ["..", ".", "../x", "a/b", "-rf", ".hidden"])
def test_sweep_names_from_flags(value: str, tmp_path: Path, runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(sweep.main, [str(EXP), f"--name={value}", "--dry-run"], capsys, "--name")
    out = tmp_path / "x.sbatch"
    refused(render.main, [str(EXP), f"--name={value}", "-o", str(out)], capsys, "--name")
    assert not runs.exists() and not out.exists() and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("value", HOSTILE + ["../x", "..", "/etc/passwd", "local/../local"])
def test_cluster_names(value: str, runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refused(sweep.main, [str(EXP), f"cluster={value}", "--dry-run"], capsys)
    refused(render.main, [str(EXP), f"cluster={value}"], capsys)
    with pytest.raises(UserError, match="cluster .* is not a plain name"):
        xp.load_profile(value)


def test_the_cli_itself_refuses_with_one_line(tmp_path: Path) -> None:
    """The real scripts, as the README runs them (a newline cannot hide in argv's one line)."""
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs")}
    for cmd in (["launch/sweep.py", str(EXP), "resources.account=a\n#SBATCH --qos=evil", "--dry-run"],
                ["launch/render.py", str(EXP), "resources.constraint=$(touch x)"],
                ["launch/sweep.py", str(EXP), "--name", "..", "--dry-run"]):
        res = subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
        assert res.returncode == 2 and res.stdout == "", res
        assert res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "runs").exists()


# ---- cluster profiles ------------------------------------------------------------------------------


PROFILE_FIELDS = ["name", "description", "partition", "setup", "env"]


def write_profile(folder: Path, field: str, value: str) -> None:
    raw = xp.yaml_value((ROOT / "slurm_templates" / "example.yaml").read_text())
    raw["name"] = "hostile"  # the file's name
    if field == "partition":
        raw["partitions"][value] = raw["partitions"].pop("gpu")
    elif field == "setup":
        raw["setup"] = ["module purge", value]
    elif field == "env":
        raw["env"]["NCCL_DEBUG"] = value
    else:
        raw[field] = value
    (folder / "hostile.yaml").write_text(json.dumps(raw))


@pytest.mark.parametrize("field", PROFILE_FIELDS)
@pytest.mark.parametrize("value", HOSTILE)
def test_every_field_of_a_cluster_profile(field: str, value: str, tmp_path: Path, runs: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(xp, "PROFILES_DIR", tmp_path)
    monkeypatch.setattr(xp, "ROOT", tmp_path.parent)
    write_profile(tmp_path, field, value)
    if value in SHELL and field in ("description", "setup", "env"):
        # setup lines are shell by design; env values are quoted; a description is text
        # (a name other than the file's is refused whatever it holds: a profile is named by its file)
        lines = setup_lines(xp.load_profile("hostile"))
        assert (f"export NCCL_DEBUG={shlex.quote(value)}" if field == "env" else "module purge") in lines
        return
    with pytest.raises(UserError) as err:
        xp.load_profile("hostile")
    assert one_line(str(err.value)) == str(err.value)
    refused(sweep.main, [str(EXP), "cluster=hostile", "--dry-run"], capsys, "hostile")
    refused(render.main, [str(EXP), "cluster=hostile"], capsys, "hostile")
    assert not runs.exists()


# ---- names in a sweep's record ---------------------------------------------------------------------


def damaged_sweep(runs: Path, job: str = "ok", job_id: str = "123") -> Path:
    sweep_dir = runs / "rec"
    sweep_dir.mkdir(parents=True)
    meta = {"name": "rec", "experiment": str(EXP), "cluster": "local", "executor": "local",
            "resources": {"nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1, "time": 10}, "cli_overrides": []}
    (sweep_dir / record.SWEEP_META).write_text(json.dumps(meta))
    rec = record.JobRecord(job=job, overrides=["model=tiny"], config_hash="x", executor="local", job_id=job_id,
                       state=record.FAILED)
    (sweep_dir / record.RECORD).write_text(rec.to_json() + "\n")
    return sweep_dir


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.name.endswith(".lock")}


def skipped(argv: list[str], capsys: pytest.CaptureFixture[str], needle: str) -> None:
    """The crafted record line is skipped with a warning naming it (a damaged line never locks a
    sweep); the command goes on with the rest, which here is nothing (logs: no such job, exit 2)."""
    code = sweep.main(argv)
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if needle in line]
    assert warnings and all(w.startswith("warning: ") and "record.jsonl line 1" in w for w in warnings), err
    assert "Traceback" not in out + err and code == (2 if argv[0] == "logs" else 0), (argv, code, err)


@pytest.mark.parametrize("job", ["../../x", "..", "../rec2", "/tmp/x", "a\nb"])
def test_a_job_named_outside_its_sweep(job: str, tmp_path: Path, runs: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = damaged_sweep(runs, job=job)
    line = (sweep_dir / record.RECORD).read_text()
    before = tree(tmp_path)
    for argv in (["status", str(sweep_dir)], ["cancel", str(sweep_dir)], ["resubmit", str(sweep_dir), "--failed"],
                 ["logs", str(sweep_dir), "0"]):
        skipped(argv, capsys, "is not a plain name")
    assert tree(tmp_path) == before and not Path("/tmp/x").exists()
    assert (sweep_dir / record.RECORD).read_text() == line  # kept for a person to see


@pytest.mark.parametrize("job_id", ["../../../x", "..", "1/../../x"])
def test_a_job_id_outside_the_log_folder(job_id: str, runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sweep_dir = damaged_sweep(runs, job_id=job_id)
    skipped(["logs", str(sweep_dir), "ok"], capsys, "is not a job id")


def test_a_symbolic_link_cannot_lead_outside(tmp_path: Path, runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (runs / "link").symlink_to(tmp_path / "elsewhere")
    refused(sweep.main, [str(EXP), "--name", "link", "--dry-run"], capsys, "leads outside")
    with pytest.raises(UserError, match="leads outside"):
        child(runs, "link", "sweep")
    assert child(runs, "n_layer=4,lr=0.001", "job") == runs / "n_layer=4,lr=0.001"
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("job_id", ["--me", "-u", "1;id", "12 13", "", "1_x", "\u0663"])
def test_what_is_no_slurm_job_id_never_reaches_a_slurm_command(job_id: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A damaged record's job id `--me` once reached `scancel --me`: every command that takes ids checks them."""
    from launch import slurm
    from tests.fake_slurm import install_fake_slurm

    for k, v in install_fake_slurm(tmp_path / "fake").items():
        monkeypatch.setenv(k, v)
    calls = [lambda: slurm.cancel(["7", job_id]), lambda: slurm.cancel_quietly([job_id]),
             lambda: slurm.requeue(job_id), lambda: slurm.signal_job(job_id), lambda: slurm.release(job_id),
             lambda: slurm.exclude_nodes(job_id, ["n1"]), lambda: slurm.show_job(job_id),
             lambda: slurm.time_left_s(job_id), lambda: slurm.attempts(job_id),
             lambda: slurm.accounting_states([job_id]), lambda: slurm.attempt_times([job_id])]
    for call in calls:
        with pytest.raises(UserError, match="is not a SLURM job id"):
            call()
    assert not (tmp_path / "fake" / "state" / "scancel.log").exists()  # nothing was run, not even for "7"


@pytest.mark.parametrize("ref", ["\u00b2", "9" * 5000, ""])
def test_a_job_reference_that_is_no_index_is_one_line(ref: str) -> None:
    recs = {"a": record.JobRecord(job="a", overrides=[], config_hash="h")}
    with pytest.raises(UserError, match="no single job"):
        sweep.pick(recs, ref, Path("s"))


@pytest.mark.parametrize("poll", ["nan", "-1", "0"])
def test_advance_refuses_a_poll_that_is_no_wait(poll: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        sweep.main(["advance", "somewhere", "--watch", "--poll", poll])
    assert info.value.code == 2 and "--poll" in capsys.readouterr().err
