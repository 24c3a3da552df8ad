"""Experiments and profiles: grid expansion, strict parsing, bad input (exit 2, nothing written),
the composer's fast path against its full resolve, plan numbers, job-side decisions."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import billion_laughs

from gpt2.compose import load_config
from gpt2.config import ConfigError, config_hash, to_dict
from gpt2.errors import UserError
from launch import experiment as xp
from launch import sweep
from launch.executors import array_chunks
from launch.job import classify
from launch.plan import make_plan, param_count, signal_lead_s
from launch.rank_env import master_port

ROOT = Path(__file__).resolve().parent.parent


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "runs"
    monkeypatch.setenv("RUNS_DIR", str(root))
    return root


# ---- expansion -------------------------------------------------------------------------------


def test_grid_and_list_expand_to_named_jobs(tmp_path: Path) -> None:
    exp = xp.load_experiment(str(write(tmp_path / "e.yaml", """
overrides: {model: tiny, trainer.config.max_steps: 5}
sweep:
  grid: {trainer.config.lr: [3e-4, 1.0e-3], model.config.n_layer: [2, 4]}
  list: [{trainer: ddp}, {trainer: fsdp}]
""")))
    assert len(exp.jobs) == 8
    assert exp.jobs[0].name == "trainer=ddp,lr=0.0003,n_layer=2"
    assert exp.jobs[-1].name == "trainer=fsdp,lr=0.001,n_layer=4"
    assert len({j.name for j in exp.jobs}) == 8
    assert exp.jobs[0].overrides == ["model=tiny", "trainer.config.max_steps=5", "trainer=ddp",
                                     "trainer.config.lr=0.0003", "model.config.n_layer=2"]


def test_no_axes_is_one_job_named_main(tmp_path: Path) -> None:
    exp = xp.load_experiment(str(write(tmp_path / "e.yaml", "overrides: [model=tiny]\n")))
    assert [(j.name, j.overrides) for j in exp.jobs] == [("main", ["model=tiny"])]


def test_short_names_clash_uses_full_keys() -> None:
    jobs = xp.expand({"trainer.config.lr": [1], "other.lr": [2]}, [])
    assert jobs[0][0] == "trainer.config.lr=1,other.lr=2"


def test_cli_overrides_pin_axes_and_change_resources(tmp_path: Path) -> None:
    exp = xp.load_experiment(str(write(tmp_path / "e.yaml", """
sweep: {grid: {trainer.config.lr: [1e-4, 2e-4], run.seed: [1, 2]}}
resources: {time: "01:30:00"}
""")), ["trainer.config.lr=5e-4", "resources.nodes=2", "resources.time=2:00:00", "cluster=example"])
    assert [j.name for j in exp.jobs] == ["lr=5e-4,seed=1", "lr=5e-4,seed=2"]
    assert exp.jobs[0].overrides[-1] == "trainer.config.lr=5e-4"
    assert (exp.resources.nodes, exp.resources.time, exp.cluster) == (2, 120, "example")


def test_override_values_survive_hydra_quoting() -> None:
    for s in ["runs/x/lr=0.0003,n_layer=2", "it's \"q\"", "a\\b", "$(touch /tmp/x); echo", "a\\", "b\\'c"]:
        assert load_config([f"wandb.name={xp.override_value(s)}"]).wandb.name == s
    assert xp.override_value(3e-4) == "0.0003" and xp.override_value(True) == "true"


def test_time_parsing_and_yaml_without_base60() -> None:
    assert [xp.parse_time(v) for v in (90, "90", "01:30:00", "1-00:00:00", "30:00")] == [90, 90, 90, 1440, 30]
    assert xp.yaml_value("24:00:00") == "24:00:00" and xp.yaml_value("3e-4") == 3e-4


def test_array_chunks_respect_max_array_size_and_parallelism() -> None:
    assert array_chunks(2500, 1001, 64) == [(0, 1001, 21), (1001, 2002, 21), (2002, 2500, 21)]
    assert array_chunks(3, 1001, 2) == [(0, 3, 2)]


# ---- bad input -------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = sweep.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_unknown_experiment_lists_the_existing_ones(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["jobs/nope.yaml"], capsys)
    assert code == 2 and "unknown experiment 'jobs/nope.yaml'" in err and "debug_local" in err
    assert len(err.strip().splitlines()) == 1 and not runs.exists()


@pytest.mark.parametrize("args, needle", [
    (["trainer.config.lrr=1"], "unknown key 'trainer.config.lrr'"),
    (["trainer.config.max_steps=abc"], "trainer.config.max_steps"),
    (["model=gpt9"], "unknown model 'gpt9'"),
    (["noequals"], "is not key=value"),
    (["resources.gpu=1"], "unknown key 'gpu'"),
    (["resources.gpus_per_node=16", "cluster=example", "--executor", "slurm"], "has 8 GPUs per node"),
    (["resources.gpus_per_node=1"], "this machine has 0"),
    (["resources.nodes=3", "--executor", "slurm"], "has 2 nodes"),
    (["--executor", "slurm", "resources.partition=gpu"], "partition 'gpu' is not in cluster profile 'local'"),
    (["cluster=mars"], "unknown cluster profile 'mars'"),
    (["dataset.train_dataset.data_root=/nonexistent/x"], "does not exist"),
    ([f"resources.partition={billion_laughs(flow=True)}"], "resources.partition expands through its YAML aliases"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    runs: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, args: list[str], needle: str
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    code, out, err = run_cli(["jobs/debug_local.yaml", *args], capsys)
    assert code == 2, (out, err)
    assert needle in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not runs.exists()


def test_missing_sbatch_is_a_user_error(runs: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch/srun anywhere
    code, _, err = run_cli(["jobs/sweep_lr_model.yaml", "--executor", "slurm"], capsys)
    assert code == 2 and "`sbatch` is not on PATH" in err and not runs.exists()


def test_strict_experiment_keys(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown key 'sweeps'"):
        xp.load_experiment(str(write(tmp_path / "e.yaml", "sweeps: {}\n")))
    with pytest.raises(UserError, match="resources: .nodes.: Value .two. of type .str. could not be converted to Integer"):
        xp.load_experiment(str(write(tmp_path / "e.yaml", "resources: {nodes: two}\n")))
    with pytest.raises(UserError, match="not valid YAML"):
        xp.load_experiment(str(write(tmp_path / "e.yaml", "a: [\n")))


@pytest.mark.parametrize("text, needle", [
    (b"\x00\x01\xff\xfe\x80description: x\n", "not UTF-8 text"),
    (b"a: &a [*a]\n", "nested too deeply (more than 32 levels) or refers to itself"),  # an alias in its anchor
    (b"overrides: " + b"[" * 200 + b"]" * 200 + b"\n", "nested too deeply"),
    (b"sweep: {grid: {trainer.config.lr: &a [1, *a]}}\n", "refers to itself"),  # axis values skip structured()
    (b"sweep: {list: [{1: 2}]}\n", "sweep.list key 1 (YAML read it as a number) is not a config key"),
    (b"sweep: {grid: {1: [1, 2]}}\n", "sweep.grid key 1 (YAML read it as a number) is not a config key"),
    (b"sweep: {grid: {null: [1]}}\n", "sweep.grid key None (YAML read it as null) is not a config key"),
    (b'sweep: {grid: {trainer.config.lr: [1e-3]}, search: {metric: "a\\nb"}}\n',
     "sweep.search.metric 'a\\nb' contains the control character '\\n'"),
    (b"resources: {time: 99999999999999}\n", "is more than SLURM can hold"),  # was written into #SBATCH --time
    (billion_laughs().encode(), "expands through its YAML aliases to more than 100,000 values"),  # minutes, GBs
], ids=["not utf-8", "alias loop", "200 deep", "axis loop", "list key int", "grid key int", "grid key null",
        "metric newline", "time past SLURM", "billion laughs"])
def test_a_damaged_experiment_file_is_one_line_naming_it(
    text: bytes, needle: str, tmp_path: Path, runs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "e.yaml"
    path.write_bytes(text)
    code, out, err = run_cli([str(path), "--dry-run"], capsys)
    assert code == 2, (out, err)
    assert err.startswith(f"error: {path}: ") and needle in err and len(err.strip().splitlines()) == 1, err
    assert not runs.exists()


def test_structured_refuses_a_value_that_holds_itself() -> None:
    from gpt2.config import structured

    loop: list = []
    loop.append(loop)
    with pytest.raises(ConfigError, match=r"^x.yaml: nested too deeply or refers to itself$"):
        structured(xp.ExperimentFile, {"overrides": loop}, "x.yaml")


@pytest.mark.parametrize("name", xp.experiment_names())
def test_shipped_experiments_dry_run(name: str, runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli([f"jobs/{name}.yaml", "--dry-run"], capsys)
    assert code == 0, err
    assert "--- plan" in out and "--- resolved config" in out and not runs.exists()
    if "executor slurm" in out:
        assert "#SBATCH --signal=USR2@" in out and "#SBATCH --requeue" in out


# ---- configs ---------------------------------------------------------------------------------


OVERRIDE_SETS = [
    ["model=tiny", "trainer.config.lr=0.001", "model.config.n_layer=2"],
    ["model=tiny", "trainer=fsdp", "trainer.config.use_mixed_precision=true", "dataset.seq_len=64"],
    ["trainer=deepspeed", "trainer.config.deepspeed_config=deepspeed_configs/zero2.json",
     "trainer.config.lr_decay_steps=500", "wandb.project=null", "run.seed=7", "trainer.config.time_budget_s=30"],
    ["model=gpt2_124m", "trainer.config.lr=1e-3", "trainer.config.grad_clip=0", "trainer.config.warmup_steps=0"],
    ["trainer.config.max_steps=5", "model=gpt2_350m", "dataset.train_dataset.data_root=/elsewhere"],
]


def _tree_only(monkeypatch: pytest.MonkeyPatch) -> xp.Composer:
    """A composer that applies every override to the unresolved tree (the path interpolations need)."""
    composer = xp.Composer()
    monkeypatch.setattr(composer, "_needs_tree", lambda *a: True)
    return composer


@pytest.mark.parametrize("overrides", OVERRIDE_SETS)
def test_fast_path_matches_the_full_resolve(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    shared = xp.Composer()
    shared.compose(["model=tiny", "trainer.config.lr=0.5"])  # a cached base must not leak into the next job
    fast = shared.compose(overrides)
    full = _tree_only(monkeypatch).compose(overrides)
    assert to_dict(fast) == to_dict(full)
    assert type(fast.trainer.config.lr) is float and type(fast.trainer.config.warmup_steps) is int
    assert config_hash(fast) == config_hash(full)


def test_one_composition_per_set_of_group_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2 import compose as gc

    calls: list[list[str]] = []
    real = gc._hydra_compose
    monkeypatch.setattr(gc, "_hydra_compose", lambda groups: calls.append(groups) or real(groups))
    composer = xp.Composer()
    lrs = [composer.compose(["model=tiny", f"trainer.config.lr={i}e-4", "trainer=ddp"]).trainer.config.lr
           for i in range(1, 6)]
    composer.compose(["trainer=ddp", "model=tiny", "run.seed=3"])  # the same choices in another order
    composer.compose(["model=gpt2_124m"])
    assert lrs == [1e-4, 2e-4, 3e-4, 4e-4, 5e-4]
    assert calls == [["model=tiny", "trainer=ddp"], ["model=gpt2_124m"]]


def test_a_later_group_choice_wins() -> None:
    """An experiment says model=tiny, the command line model=gpt2_124m: the command line wins."""
    assert load_config(["model=tiny", "model=gpt2_124m"]).model.name == "gpt2_124m"


@pytest.mark.parametrize("overrides", [
    ["trainer.config.lrr=1"], ["trainer.config.max_steps=1.5"], ["trainer.config.max_steps=abc"],
    ["trainer.config.max_steps=0"],  # the schema's own checks, after composition
    ["model.config.n_head=5"],  # n_embd 128 is not divisible by 5
])
def test_every_path_rejects_the_same(overrides: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError):
        load_config(overrides)
    with pytest.raises(ConfigError):
        xp.Composer().compose(["model=tiny", *overrides])
    with pytest.raises(ConfigError):
        _tree_only(monkeypatch).compose(["model=tiny", *overrides])


# ---- plan and job-side decisions -------------------------------------------------------------


def test_param_count_matches_the_model() -> None:
    from gpt2.model import GPT, GPT2Config

    cfg = load_config(["model=tiny", "model.config.n_layer=2", "model.config.bias=false", "model.config.vocab_size=1000"])
    m = cfg.model.config
    model = GPT(GPT2Config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                           vocab_size=m.vocab_size, bias=m.bias))
    assert param_count(m) == model.num_params()


def test_plan_shards_states_and_sizes_the_lead() -> None:
    ddp = make_plan(load_config(["model=gpt2_350m"]), 16)
    fsdp = make_plan(load_config(["model=gpt2_350m", "trainer=fsdp"]), 16)
    assert fsdp.states_gib < ddp.states_gib / 8 and ddp.tokens_per_step == 8 * 1024 * 16
    assert abs(ddp.params / 1e6 - 354.8) < 1
    assert signal_lead_s(ddp, time_min=600, min_lead_s=60, write_mb_s=200) > 60  # ~4 GiB to save
    assert signal_lead_s(ddp, time_min=2, min_lead_s=60, write_mb_s=200) == 60  # at most half the limit


def test_timeout_or_preemption() -> None:
    hour = 3600.0
    assert classify("time_budget", 10, hour, 120, "slurm") == "timeout"
    assert classify("SIGTERM", hour, hour, 120, "slurm") == "preemption"
    assert classify("USR2", hour - 130, hour, 120, "slurm") == "timeout"
    assert classify("USR2", 600, hour, 120, "slurm") == "preemption"
    assert classify("USR2", 5, 60, 30, "local") == "timeout"
    assert classify("USR2", 5, None, 30, "debug") == "preemption"
    # SLURM's own time left wins over elapsed time: its warning can come up to a minute early
    assert classify("USR2", 18, 60, 20, "slurm", time_left_s=42) == "timeout"
    assert classify("USR2", hour - 130, hour, 120, "slurm", time_left_s=1800) == "preemption"


def test_parse_slurm_duration() -> None:
    from launch.slurm import parse_duration as parse_slurm_duration

    assert parse_slurm_duration("1-02:03:04") == ((24 + 2) * 60 + 3) * 60 + 4
    assert parse_slurm_duration("02:03:04") == 2 * 3600 + 3 * 60 + 4
    assert parse_slurm_duration("3:04\n") == 184
    assert parse_slurm_duration("UNLIMITED") is None


def test_master_port_differs_per_array_task() -> None:
    ports = {master_port(str(j)) for j in range(5000, 5100)}
    assert len(ports) == 100 and all(20000 <= p < 60000 for p in ports)


def test_render_cli_is_a_script(tmp_path: Path) -> None:
    env = {**os.environ, "RUNS_DIR": "runs"}
    res = subprocess.run([sys.executable, "launch/render.py", "jobs/nope.yaml"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: unknown experiment")
