"""Job chains (launch/chain.py): checked in the experiment file, queued on SLURM with the right
dependencies (sbatch faked at the launcher's one seam), and run in order by the local executor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gpt2.errors import UserError
from launch import chain, record, slurm
from launch.experiment import load_experiment

ROOT = Path(__file__).resolve().parent.parent
AFTER = """
after:
  - {name: export, module: gpt2.export, args: ["{best}", "--out", "{sweep}/export", "--no_checksums"]}
  - {name: sample, module: gpt2.generate, args: ["{best}", "--max_new_tokens", "5", "--device", "cpu"], after: export}
"""


def experiment(tmp_path: Path, after: str, shards: Path | None = None) -> Path:
    data = (f"  dataset.train_dataset.data_root: {shards}\n  dataset.val_dataset.data_root: {shards}\n"
            if shards else "")
    p = tmp_path / "chained.yaml"
    p.write_text(f"""
cluster: local
executor: local
overrides:
  model: tiny
  model.config.n_layer: 1
  model.config.n_head: 2
  model.config.n_embd: 32
  model.config.block_size: 32
  dataset.seq_len: 32
{data}  trainer.config.batch_size: 2
  trainer.config.max_steps: 3
  trainer.config.warmup_steps: 1
  trainer.config.eval_interval: 3
  trainer.config.eval_steps: 1
  trainer.config.log_interval: 1
  trainer.config.checkpoint_strategy.config.interval: 0
  wandb.mode: disabled
sweep:
  grid: {{trainer.config.lr: [1.0e-3, 1.0e-2]}}
resources: {{nodes: 1, gpus_per_node: 0, tasks_per_node: 1, time: 10}}
{after}""")
    return p


def test_the_chain_is_read_and_checked(tmp_path: Path) -> None:
    exp = load_experiment(str(experiment(tmp_path, AFTER)))
    assert [(s.name, s.module, s.after) for s in exp.after] == [("export", "gpt2.export", None),
                                                               ("sample", "gpt2.generate", "export")]


@pytest.mark.parametrize("after, words", [
    ('after: [{name: x, module: os.system, args: []}]', "module 'os.system' is not one of"),
    ('after: [{name: x, module: gpt2.export, after: y}]', "after 'y' is not an earlier step"),
    ('after: [{name: x, module: gpt2.export}, {name: x, module: gpt2.export}]', "two steps are named 'x'"),
    ('after: [{name: "a/b", module: gpt2.export}]', "step name 'a/b'"),
    ('after: [{name: x, module: gpt2.export, when: later}]', "unknown key"),
])
def test_a_bad_chain_is_one_line(tmp_path: Path, after: str, words: str) -> None:
    with pytest.raises(UserError) as exc:
        load_experiment(str(experiment(tmp_path, after)))
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_slurm_queues_the_steps_with_their_dependencies_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "sweep"
    d.mkdir()
    exp = load_experiment(str(experiment(tmp_path, AFTER)))
    record.write_sweep_meta(d, {"name": "chained", "executor": "slurm", "cluster": "local",
                                "resources": {"partition": "low", "account": None},
                                "after": [vars(s) for s in exp.after]})
    (d / record.RECORD).write_text("")
    calls: list[list[str]] = []
    monkeypatch.setattr(slurm, "run_cmd", fake_slurm(calls, {}))
    assert chain.submit_slurm(d, ["77", "78", "77"]) == {"export": "501", "sample": "502"}
    calls = [c for c in calls if c[0] == "sbatch"]
    assert "--dependency=afterany:77:78" in calls[0] and "--dependency=afterok:501" in calls[1]
    assert "--partition=low" in calls[0] and not any(a.startswith("--account") for a in calls[0])
    assert calls[1][-1].endswith("chain " + str(d.absolute()) + " --run sample")
    assert chain.submit_slurm(d, ["77"]) == {"export": "501", "sample": "502"} and len(calls) == 2  # once
    assert any("sample: python -m gpt2.generate (after export succeeds, job 502): PENDING" in x
               for x in chain.chain_lines(d))


def fake_slurm(calls: list[list[str]], queue: dict[str, str]) -> Callable[..., str]:
    """sbatch answers 501, 502, ... and queues the job with its --comment; squeue prints id|comment."""
    def run_cmd(argv: list[str], timeout: float = 60.0) -> str:
        calls.append(list(argv))
        if argv[0] == "squeue":
            return "".join(f"{i}|{c}\n" for i, c in queue.items())
        job = str(500 + sum(1 for c in calls if c[0] == "sbatch"))
        queue[job] = next((a.split("=", 1)[1] for a in argv if a.startswith("--comment=")), "")
        return f"{job}\n"
    return run_cmd


def test_a_controller_killed_after_queueing_a_step_leaves_it_adopted_not_queued_twice(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "sweep"
    d.mkdir()
    exp = load_experiment(str(experiment(tmp_path, AFTER)))
    record.write_sweep_meta(d, {"name": "chained", "executor": "slurm", "cluster": "local", "resources": {},
                                "after": [vars(s) for s in exp.after]})
    (d / record.RECORD).write_text("")
    calls: list[list[str]] = []
    queue: dict[str, str] = {"90": "a user's own job"}
    monkeypatch.setattr(slurm, "run_cmd", fake_slurm(calls, queue))
    first = chain.submit_slurm(d, [])
    (d / chain.CHAIN / chain.SUBMITTED).unlink()  # as if killed before either id was written
    queue.pop(first["sample"])  # the sample step ran already and left the queue: its state names its job
    chain._write_state(d, "sample", state=record.COMPLETED, job_id=first["sample"])
    assert chain.submit_slurm(d, []) == first
    assert sum(1 for c in calls if c[0] == "sbatch") == 2  # no step queued twice
    monkeypatch.setattr(slurm, "run_cmd", lambda argv, timeout=60.0: (_ for _ in ()).throw(slurm.CommandError("down")))
    (d / chain.CHAIN / chain.SUBMITTED).unlink()
    with pytest.raises(UserError, match="squeue failed, so whether a job tagged gpt2-chain:.* is queued already"):
        chain.submit_slurm(d, [])


@pytest.mark.slow
def test_the_local_executor_runs_the_chain_after_the_sweep_in_order(tmp_path: Path, pydoc_shards: Path) -> None:
    runs = tmp_path / "runs"
    env = {**os.environ, "RUNS_DIR": str(runs), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "launch/sweep.py", str(experiment(tmp_path, AFTER, pydoc_shards))],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    sweep = runs / "chained"
    best = chain.best_trial(sweep)
    export, sample = chain.step_state(sweep, "export"), chain.step_state(sweep, "sample")
    assert export["state"] == sample["state"] == record.COMPLETED and export["best"] == sample["best"] == best
    assert export["time"] < sample["time"]  # in order
    assert (sweep / "export" / "model.safetensors").is_file()
    assert json.loads((sweep / "export" / "export.json").read_text())
    assert "chain step sample: COMPLETED" in res.stdout
    st = subprocess.run([sys.executable, "launch/sweep.py", "status", str(sweep)], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
    assert f"sample: python -m gpt2.generate (after export succeeds): COMPLETED on {best}" in st.stdout
    assert len((sweep / "chain" / "sample.log").read_text().splitlines()) > 1  # the command, then a sample
