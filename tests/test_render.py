"""Job scripts are a public surface: golden text for the plain template and for submitit's
script, the dry run prints exactly what gets submitted, and no config value can inject shell."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2.compose import load_config
from launch import executors as ex
from launch import render, sweep
from launch.experiment import load_experiment, load_profile, override_value
from tests.fake_slurm import install_fake_slurm

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"
EXP = GOLDEN / "golden_exp.yaml"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with UPDATE_GOLDEN=1 once and review it"
    assert text == path.read_text(), f"{name} changed: if intended, UPDATE_GOLDEN=1 and review the diff"


def golden_render(*overrides: str) -> str:
    exp = load_experiment(str(EXP.relative_to(ROOT)), list(overrides))
    return render.render(exp, load_profile(exp.cluster), Path("runs") / exp.name, lead_s=120)


def test_plain_sbatch_golden() -> None:
    text = golden_render()
    check_golden("golden_exp.sbatch", text)
    assert "#SBATCH --array=0-3%3" in text and "#SBATCH --constraint='a100&ib'" in text


def test_submitit_sbatch_golden() -> None:
    exp = load_experiment(str(EXP))
    params = ex.slurm_parameters("golden_exp", exp.resources, load_profile(exp.cluster), 120, Path("/SNAPSHOT"))
    text = ex.sbatch_script(params, Path("/SWEEP/logs/%j"), map_count=4, python="/PYTHON")
    check_golden("golden_exp.submitit.sbatch", text)
    for line in ("#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=USR2@120",
                 "#SBATCH --requeue", "#SBATCH --chdir=/SNAPSHOT", "--kill-on-bad-exit=1"):
        assert line in text


def test_dry_run_prints_the_script_that_is_submitted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    env = install_fake_slurm(tmp_path / "fake")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("RUNS_DIR", str(tmp_path / "runs"))
    data = tmp_path / "data"
    data.mkdir()
    args = [str(EXP), "cluster=local", "resources.gpus_per_node=0", "resources.tasks_per_node=2",
            "resources.nodes=1", "resources.cpus_per_task=1", "resources.mem=null", "resources.time=30",
            f"dataset.train_dataset.data_root={data}", f"dataset.val_dataset.data_root={data}"]
    assert sweep.main([*args, "--dry-run"]) == 0
    printed = capsys.readouterr().out.split("(submitit writes it to", 1)[1].split("\n", 1)[1]
    assert not (tmp_path / "runs").exists()
    assert sweep.main(args) == 0
    submitted = next((tmp_path / "fake" / "state").glob("script_*.sh")).read_text()
    assert "#SBATCH --comment=gpt2-submission:TOKEN:0" in printed  # each submission's token (launch/intent.py)
    submitted = re.sub(r"(?m)^(#SBATCH --comment=gpt2-submission:)[0-9a-f]{16}:", r"\1TOKEN:", submitted)
    assert submitted.rstrip() == printed.rstrip()


def test_config_values_cannot_inject_shell(tmp_path: Path) -> None:
    evil = f"$(touch {tmp_path}/a)'; touch {tmp_path}/b; echo '`touch {tmp_path}/c`\""
    text = golden_render(f"wandb.name={override_value(evil)}")  # resources: refused (tests/test_hostile.py)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                  f"open({str(tmp_path / 'argv.json')!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    (bin_dir / "srun").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_ARRAY_TASK_ID": "3"}
    res = subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert not any((tmp_path / f).exists() for f in "abc")
    argv = json.loads((tmp_path / "argv.json").read_text())
    overrides = argv[argv.index("--") + 1:]
    assert argv[argv.index("--job") + 1] == "n_layer=4,lr=0.001"
    cfg = load_config(overrides)  # Hydra reads back exactly what the experiment said
    assert cfg.wandb.name == evil and cfg.run.job == "n_layer=4,lr=0.001" and cfg.trainer.config.lr == 1e-3
    assert cfg.run.dir == "runs/golden_exp/n_layer=4,lr=0.001"


def test_render_cli_writes_the_script(tmp_path: Path) -> None:
    out = tmp_path / "x.sbatch"
    env = {**os.environ, "RUNS_DIR": str(tmp_path / "runs")}
    res = subprocess.run([sys.executable, "launch/render.py", str(EXP), "-o", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.read_text().startswith("#!/bin/bash") and (tmp_path / "runs" / "golden_exp" / "logs").is_dir()
    res = subprocess.run(["bash", "-n", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
