"""DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 train as one process does, on 2 gloo ranks (issue 4).

Three kinds of test, cheapest first:
- the DeepSpeed JSON is completed from the trainer config, and a contradiction is refused (no processes);
- tests/dist_worker.py trains every backend in one 2-rank process group on a synthetic corpus and
  compares per-step losses with single-process training on the same global batch; a second,
  fresh group (and a single process) loads the checkpoints it saved and continues;
- the original project's commands (`python main.py`, `torchrun`, the `deepspeed` launcher) train on
  real shards, and the distributed runs agree with the single-process one.
Process launches are few and shared through module fixtures: each costs seconds of imports.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from gpt2.backends.deepspeed import DeepSpeedConfigError, build_ds_config
from gpt2.config import TrainerSettings
from gpt2.model import GPT, GPT2Config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKER = ROOT / "tests" / "dist_worker.py"
TIMEOUT_S = 900  # generous: a loaded 2-core machine; a hang still ends
RTOL = 1e-4  # fp32: the backends differ from one process only in reduction order
BACKENDS = ["ddp", "fsdp", "zero1", "zero2", "zero3"]


# ---- launching ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # one thread per rank: two ranks share two cores
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", GPT2_DIST_TIMEOUT_S="300", **extra)
    return env


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def _start_ranks(args: list[str], world: int, logs: Path, tag: str) -> list[tuple[subprocess.Popen, Path]]:
    """`world` worker processes with the environment torchrun would give them (or none at world 1)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        dist = {} if world == 1 else dict(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        log = logs / f"{tag}_rank{rank}.log"
        procs.append((_start([sys.executable, str(WORKER), *args], log, _env(**dist)), log))
    return procs


def _wait(procs: list[tuple[subprocess.Popen, Path]]) -> None:
    """Wait for all; on a failure or a hang, kill the rest and fail with the failing log's tail."""
    failed: list[str] = []
    for proc, log in procs:
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if rc != 0:
            failed.append(f"{log.name} exited {rc}:\n" + "\n".join(log.read_text().splitlines()[-25:]))
            for other, _ in procs:
                if other.poll() is None:
                    other.kill()
                    other.wait()
    assert not failed, "\n\n".join(failed)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---- the DeepSpeed JSON ---------------------------------------------------------------------------
def _settings(tmp_path: Path, ds: dict[str, Any], **kw: Any) -> TrainerSettings:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return TrainerSettings(deepspeed_config=str(path), **kw)


def test_shipped_deepspeed_configs_take_batch_and_clipping_from_the_trainer() -> None:
    s = TrainerSettings(batch_size=3, grad_accumulation_steps=4, grad_clip=0.5, use_mixed_precision=True)
    for stage in (1, 2, 3):
        ds = build_ds_config(replace(s, deepspeed_config=f"deepspeed_configs/zero{stage}.json"), 2)
        assert ds["zero_optimization"]["stage"] == stage
        assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 4, 24)
        assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True
        assert "optimizer" not in ds and "scheduler" not in ds


@pytest.mark.parametrize(("ds", "words"), [
    ({"train_micro_batch_size_per_gpu": 8}, ["train_micro_batch_size_per_gpu=8", "2", "trainer.config.batch_size"]),
    ({"gradient_accumulation_steps": 4}, ["gradient_accumulation_steps=4", "1"]),
    ({"train_batch_size": 64}, ["train_batch_size=64", "4"]),
    ({"gradient_clipping": 0.3}, ["gradient_clipping=0.3", "1.0", "trainer.config.grad_clip"]),
    ({"bf16": {"enabled": True}}, ["bf16.enabled=True", "use_mixed_precision=False"]),
    ({"bfloat16": {"enabled": True}}, ["bf16.enabled=True", "use_mixed_precision=False"]),
    ({"fp16": {"enabled": True}}, ["fp16", "bf16"]),
    ({"optimizer": {"type": "AdamW"}}, ["'optimizer'", "trainer.config"]),
    ({"scheduler": {"type": "WarmupLR"}}, ["'scheduler'"]),
])
def test_a_deepspeed_json_that_contradicts_the_trainer_is_refused(tmp_path: Path, ds: dict, words: list[str]) -> None:
    with pytest.raises(DeepSpeedConfigError) as err:
        build_ds_config(_settings(tmp_path, {"zero_optimization": {"stage": 1}, **ds}, batch_size=2), 2)
    for word in words:
        assert word in str(err.value)
    assert "\n" not in str(err.value)


def test_a_deepspeed_json_may_repeat_the_trainer_values(tmp_path: Path) -> None:
    ds = build_ds_config(_settings(tmp_path, {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
                                              "bf16": {"enabled": False}, "fp16": {"enabled": "auto"}},
                                   batch_size=2), 2)
    assert ds["train_batch_size"] == 4 and ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False


@pytest.mark.parametrize(("text", "words"), [
    (b"\xff\xfe\x00", "not UTF-8 text"),  # was a UnicodeDecodeError
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # was a RecursionError
    (b'{"zero_optimisation": {"stage": 2}}', "unknown key 'zero_optimisation': did you mean 'zero_optimization'?"),
    (b'{"steps_per_print": "x"}', "steps_per_print 'x' is not a number of steps"),  # a TypeError mid-training
    (b'{"gradient_clipping": NaN}', "not valid JSON"),
])
def test_a_damaged_or_misspelt_deepspeed_json_is_one_line(tmp_path: Path, text: bytes, words: str) -> None:
    """Found by fuzzing; DeepSpeed itself ignores an unknown key, so a misspelt zero_optimization ran ZeRO-0."""
    path = tmp_path / "ds.json"
    path.write_bytes(text)
    with pytest.raises(DeepSpeedConfigError) as err:
        build_ds_config(TrainerSettings(deepspeed_config=str(path)), 1)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_a_missing_deepspeed_json_names_the_choices() -> None:
    with pytest.raises(DeepSpeedConfigError, match="zero1.json"):
        build_ds_config(TrainerSettings(deepspeed_config="deepspeed_configs/nope.json"), 1)


# ---- every backend in one 2-rank process group ------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """One 2-rank worker run: every variant, checkpoints of each backend at step SAVE_AT."""
    out = tmp_path_factory.mktemp("backends")
    _wait(_start_ranks(["train", "--out", str(out)], 2, out / "logs", "train"))
    return json.loads((out / "train_w2.json").read_text()), out


@pytest.fixture(scope="module")
def resumed(trained: tuple[dict[str, Any], Path]) -> dict[int, dict[str, Any]]:
    """Fresh process groups load those checkpoints: 2 ranks (every backend) and 1 rank (DDP, FSDP) at once."""
    _, out = trained
    procs = _start_ranks(["resume", "--out", str(out)], 2, out / "logs", "resume_w2")
    procs += _start_ranks(["resume", "--out", str(out), "--only", "ddp", "fsdp"], 1, out / "logs", "resume_w1")
    _wait(procs)
    return {w: json.loads((out / f"resume_w{w}.json").read_text()) for w in (2, 1)}


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_two_ranks_match_one_process_on_the_same_global_batch(trained: tuple[dict, Path], name: str) -> None:
    result, _ = trained
    ref, got = result["reference"], result["variants"][name]["loss"]
    assert len(got) == len(ref) == 20
    assert ref[-1] < ref[0] - 0.1  # it learns: a wrong update would show
    worst = max(_rel(a, b) for a, b in zip(got, ref))
    assert worst < RTOL, f"{name}: per-step loss differs from one process by up to {worst:.2e}"
    # the pre-clipping norm: AdamW hides a gradient's scale from the loss, the norm does not
    norms, ref_norms = result["variants"][name]["grad_norm"], result["reference_grad_norm"]
    assert max(_rel(a, b) for a, b in zip(norms, ref_norms)) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_k_micro_batches_equal_one_batch_k_times_larger(trained: tuple[dict, Path], name: str) -> None:
    result, _ = trained
    got, ref = result["variants"][f"{name}_accum"]["loss"], result["reference"]
    assert max(_rel(a, b) for a, b in zip(got, ref)) < RTOL
    # AdamW hardly sees the scale of a gradient, so compare the norm too: a sum where a mean is due shows there
    norms, ref_norms = result["variants"][f"{name}_accum"]["grad_norm"], result["reference_grad_norm"]
    assert max(_rel(a, b) for a, b in zip(norms, ref_norms)) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp_bf16", "fsdp_bf16", "zero1_bf16", "zero3_bf16"])
def test_bf16_is_honoured_and_stays_close_to_fp32(trained: tuple[dict, Path], name: str) -> None:
    result, _ = trained
    got, ref = result["variants"][name]["loss"], result["reference"]
    diffs = [_rel(a, b) for a, b in zip(got, ref)]
    assert max(diffs) > 0, f"{name}: bit-identical to fp32, so bf16 was not used"
    assert max(diffs) < 1e-2


@pytest.mark.slow
def test_sharded_backends_hold_less_parameter_and_optimizer_memory(trained: tuple[dict, Path]) -> None:
    v = trained[0]["variants"]
    held = {n: max(v[n]["state_bytes"]) for n in BACKENDS}
    # DDP: weights + 2 AdamW moments, whole, on each rank. FSDP and ZeRO-3 split all three across 2 ranks
    # (a few small ZeRO-3 tensors stay whole); ZeRO-1/2 split only the optimizer side.
    assert held["fsdp"] <= 0.55 * held["ddp"]
    assert held["zero3"] <= 0.6 * held["ddp"]
    assert held["zero1"] < 0.9 * held["ddp"] and held["zero2"] < 0.9 * held["ddp"]
    for name in BACKENDS:
        assert len(v[name]["rss_mb"]) == 2 and all(mb > 0 for mb in v[name]["rss_mb"])  # per rank


@pytest.mark.slow
def test_full_state_dict_is_the_whole_model_in_its_own_layout(trained: tuple[dict, Path]) -> None:
    v = trained[0]["variants"]
    keys = sorted(GPT(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512)).state_dict())
    for name in ("ddp", "fsdp", "zero1", "zero3"):
        full = v[name]["full_state_dict"]
        assert full["keys"] == keys and full["tied"], name
        assert _rel(full["norm"], v["ddp"]["full_state_dict"]["norm"]) < 1e-5, name
    for name in ("fsdp_bf16", "zero1_bf16"):  # bf16 compute, but the export is the fp32 master weights
        full = v[name]["full_state_dict"]
        assert full["keys"] == keys and not full["bf16_only"], name
    assert v["ddp"]["full_state_dict"]["bf16_only"] is False


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKENDS)
def test_a_fresh_process_group_loads_the_checkpoint_and_continues(
        trained: tuple[dict, Path], resumed: dict[int, dict], name: str) -> None:
    after = trained[0]["variants"][name]["loss"][10:]  # dist_worker.SAVE_AT = 10
    got = resumed[2]["variants"][name]["loss"]
    assert len(got) == len(after) == 10
    assert max(_rel(a, b) for a, b in zip(got, after)) < RTOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_a_two_rank_checkpoint_continues_on_one_rank(
        trained: tuple[dict, Path], resumed: dict[int, dict], name: str) -> None:
    after = trained[0]["variants"][name]["loss"][10:]
    got = resumed[1]["variants"][name]["loss"]
    assert max(_rel(a, b) for a, b in zip(got, after)) < RTOL  # FSDP's DCP checkpoint reshards 2 -> 1


# ---- the original project's commands ---------------------------------------------------------------
def _tiny(data: Path, run_dir: Path, steps: int, batch: int) -> list[str]:
    return [
        "model.config.n_layer=2", "model.config.n_head=2", "model.config.n_embd=64", "model.config.block_size=64",
        "dataset.seq_len=32", f"dataset.train_dataset.data_root={data}", f"dataset.val_dataset.data_root={data}",
        f"trainer.config.max_steps={steps}", f"trainer.config.batch_size={batch}", "trainer.config.warmup_steps=2",
        "trainer.config.lr=3e-3", "trainer.config.eval_interval=0", "wandb.mode=disabled", "run.device=cpu",
        "trainer.config.checkpoint_strategy.config.interval=0",
        "trainer.config.checkpoint_strategy.config.save_on_finish=false", f"run.dir={run_dir}",
    ]


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step" in r]  # events (an attempt's start and end) have no step
    assert all(r["peak_mem_mb"] > 0 for r in rows)
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_the_original_commands_train_and_agree(pydoc_shards: Path, tmp_path: Path) -> None:
    """python main.py (batch 4) against torchrun DDP, the deepspeed launcher (ZeRO-1) and torchrun FSDP
    under bf16, each with 2 ranks of batch 2: the same windows per step (gpt2/data.py's contract)."""
    steps, bf16_steps = 6, 2  # bf16 matmuls are slow on a CPU without bf16 units
    runs = {
        "single": ([sys.executable, "main.py", "trainer=ddp"], steps, 4),
        "ddp": ([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}", "main.py",
                 "trainer=ddp"], steps, 2),
        "zero1": ([str(BIN / "deepspeed"), "--num_gpus=2", f"--master_port={_free_port()}", "main.py",
                   "trainer=deepspeed", "trainer.config.deepspeed_config=deepspeed_configs/zero1.json"], steps, 2),
        "fsdp_bf16": ([str(BIN / "torchrun"), "--nproc_per_node=2", f"--master_port={_free_port()}", "main.py",
                       "trainer=fsdp", "trainer.config.use_mixed_precision=true"], bf16_steps, 2),
    }
    procs = [(_start([*cmd, *_tiny(pydoc_shards, tmp_path / name, n, b)], tmp_path / f"{name}.log", _env()),
              tmp_path / f"{name}.log") for name, (cmd, n, b) in runs.items()]
    _wait(procs)
    ref = _losses(tmp_path / "single")
    assert len(ref) == steps and ref[-1] < ref[0]
    for name in ("ddp", "zero1"):
        got = _losses(tmp_path / name)
        assert len(got) == steps and max(_rel(a, b) for a, b in zip(got, ref)) < RTOL, name
    got = _losses(tmp_path / "fsdp_bf16")
    assert len(got) == bf16_steps and max(_rel(a, b) for a, b in zip(got, ref)) < 1e-2
    for name in ("ddp", "zero1", "fsdp_bf16"):  # each rank logs its own peak memory
        for rank in (0, 1):
            log = (tmp_path / name / "logs" / f"rank{rank}.log").read_text()
            assert "peak mem" in log and "MB" in log, (name, rank)


def test_the_thread_check_counts_process_group_threads_not_autograd_workers() -> None:
    """distributed.destroy() warns about threads that outlive the group; autograd's per-device workers
    (pt_autograd_N: a CUDA build of torch starts them, with or without a GPU) live as long as the
    process by design and hold no group, so they are not counted; a NCCL watchdog is."""
    import ctypes
    import threading

    from gpt2.distributed import process_group_threads

    libc, release, named = ctypes.CDLL(None), threading.Event(), threading.Barrier(3)

    def thread_named(name: bytes) -> threading.Thread:
        def body() -> None:
            libc.prctl(15, ctypes.c_char_p(name), 0, 0, 0)  # PR_SET_NAME: what /proc/self/task/*/comm shows
            named.wait()
            release.wait()

        t = threading.Thread(target=body, daemon=True)
        t.start()
        return t

    threads = [thread_named(b"pt_autograd_0"), thread_named(b"pt_nccl_watchdg")]
    named.wait()
    try:
        assert process_group_threads(settle_s=0) == ["pt_nccl_watchdg"]
    finally:
        release.set()
        for t in threads:
            t.join()
    assert process_group_threads() == []
