"""Preemption and exact resume with real processes (2 gloo ranks on CPU), for DDP, FSDP and ZeRO-2.

Each test starts ranks as separate processes (RANK/WORLD_SIZE/MASTER_* in the environment, as
torchrun would) running this file as a script: `main.main()` with test-only patches and checks applied
from outside the production code (see `_worker`):
- GPT2_TEST_SIGNAL_AT_STEP=k, GPT2_TEST_SIGNAL_RANK=r, GPT2_TEST_SIGNAL=USR2|TERM: rank r sends
  itself the signal right after computing step k, so only that rank receives it;
- GPT2_TEST_PAUSE_AT_STEP=s, GPT2_TEST_PAUSE_MARKER=path: rank 0 stops inside the save of step s,
  after every file is written and before the manifest, and touches the marker; the test then
  kills every rank with SIGKILL;
- after `main.main()` returns, the worker exits 3 if any process-group thread (gloo, NCCL, TCPStore)
  is still running: those abort a rank at interpreter exit now and then, so every launch below
  checks that every exit path ended them;
- GPT2_TEST_DUMP_FULL_STATE=1: after each save, rank 0 writes `backend.full_state_dict()` (the
  backend's own gather of the whole model) to `<run.dir>/full_state_<step>.pt`, the reference
  for what export reads from the checkpoint files;
- GPT2_TEST_STORAGE_ERROR=path, GPT2_TEST_STORAGE_RANK=r: on rank r every open of that path fails
  with EIO (`conftest.failing_storage`), as a dying disk or a stale NFS mount would;
- GPT2_TEST_SWITCH=path, GPT2_TEST_SWITCH_AFTER_STEP=k, GPT2_TEST_SWITCH_RANK=r: rank r creates
  the file right after step k: the switch of a real failing file system (tests/failing_fs.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FailingMount

ROOT = Path(__file__).resolve().parent.parent
N, K = 4, 2  # steps in all; the step after which the signal arrives
TINY = [
    "model.config.n_layer=2", "model.config.n_head=2", "model.config.n_embd=64", "model.config.block_size=64",
    "model.config.dropout=0.1",  # dropout draws random numbers: the RNG state must come back too
    "dataset.seq_len=32", "trainer.config.batch_size=2", "trainer.config.warmup_steps=2",
    "trainer.config.eval_interval=0", f"trainer.config.max_steps={N}", "run.device=cpu",
    "trainer.config.checkpoint_strategy.config.interval=0",
]
EXIT_REQUEUE = 75
EXIT_FAILURE = 76  # an infrastructure failure: retried
EVERY = "trainer.config.checkpoint_strategy.config.interval"
LEFT_THREADS = 3  # the worker's exit code when process-group threads outlive main() (see _worker)

pytestmark = pytest.mark.slow


# ---- the worker (runs in the rank processes) -------------------------------------------------
def _worker(argv: list[str]) -> int:  # PYTHONPATH names the repository root, for `main`
    import main as entry
    from gpt2 import train
    from gpt2.checkpoint import manager as checkpoint

    at, who = int(os.environ.get("GPT2_TEST_SIGNAL_AT_STEP", "0")), int(os.environ.get("GPT2_TEST_SIGNAL_RANK", "0"))
    if at and int(os.environ["RANK"]) == who:
        sig = getattr(signal, "SIG" + os.environ.get("GPT2_TEST_SIGNAL", "USR2"))
        train_step = train._Trainer.train_step

        def signalling_step(self: train._Trainer) -> tuple[float, float]:
            out = train_step(self)
            if self.step + 1 == at:  # self.step counts completed steps: this was step `at`
                os.kill(os.getpid(), sig)
            return out

        train._Trainer.train_step = signalling_step  # type: ignore[method-assign]

    if os.environ.get("GPT2_TEST_DUMP_FULL_STATE"):
        save = train._Trainer.save

        def save_and_dump(self: train._Trainer, final: bool = False) -> None:
            save(self, final)
            full = self.backend.full_state_dict()  # collective: the backend's own view of the whole model
            if self.dist.is_main:
                torch.save(full, self.run_dir / f"full_state_{self.step}.pt")

        train._Trainer.save = save_and_dump  # type: ignore[method-assign]

    pause = int(os.environ.get("GPT2_TEST_PAUSE_AT_STEP", "0"))
    if pause:
        commit = checkpoint.CheckpointManager._commit

        def paused_commit(self: checkpoint.CheckpointManager, tmp: Path, final: Path, step: int,
                          *args: object) -> None:
            if step == pause:
                Path(os.environ["GPT2_TEST_PAUSE_MARKER"]).write_text(str(tmp))
                time.sleep(600)  # killed here
            commit(self, tmp, final, step, *args)

        checkpoint.CheckpointManager._commit = paused_commit  # type: ignore[method-assign]
    switch, after = os.environ.get("GPT2_TEST_SWITCH"), int(os.environ.get("GPT2_TEST_SWITCH_AFTER_STEP", "0"))
    if switch and int(os.environ["RANK"]) == int(os.environ.get("GPT2_TEST_SWITCH_RANK", "0")):
        step_before = train._Trainer.train_step

        def switching_after(self: train._Trainer) -> tuple[float, float]:
            out = step_before(self)
            if self.step + 1 == after:
                Path(switch).touch()  # the file system of tests/failing_fs.py fails every read from now on
            return out

        train._Trainer.train_step = switching_after  # type: ignore[method-assign]
    failing = os.environ.get("GPT2_TEST_STORAGE_ERROR")
    with contextlib.ExitStack() as storage:
        if failing and int(os.environ["RANK"]) == int(os.environ.get("GPT2_TEST_STORAGE_RANK", "0")):
            from conftest import failing_storage  # this script's own folder is on sys.path

            storage.enter_context(failing_storage(Path(failing)))
        code = entry.main(argv)
    # Every exit path must have ended the process group's C++ threads by now: one still running when
    # the interpreter finalizes can abort the rank (SIGABRT, "terminate called without an active
    # exception") instead of letting it exit with `code`, a few times in a hundred.
    from gpt2.distributed import process_group_threads

    if left := process_group_threads():
        print(f"process-group threads still running after main() returned {code}: {left}", flush=True)
        return LEFT_THREADS
    return code


# ---- launching ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPT2_TEST_", "SLURM_", "TORCHELASTIC"))}
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", GPT2_DIST_TIMEOUT_S="120", WANDB_SILENT="true",
               PYTHONPATH=str(ROOT), GPT2_LOG_LEVEL="WARNING")
    env.update(extra)
    return env


def start(world: int, args: list[str], logdir: Path, **extra: str) -> list[subprocess.Popen[bytes]]:
    """Start `world` rank processes of the worker with these overrides; output to logdir/out<rank>.txt."""
    logdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for r in range(world):
        out = open(logdir / f"out{r}.txt", "ab")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=_env(r, world, port, extra),
                                      stdout=out, stderr=subprocess.STDOUT))
        out.close()
    return procs


def wait(procs: list[subprocess.Popen[bytes]], logdir: Path, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"ranks did not finish in {timeout} s:\n{_tail(logdir)}")


def wait_for_marker(procs: list[subprocess.Popen[bytes]], marker: Path, what: str, logdir: Path,
                    timeout: float = 240) -> None:
    """Wait until the ranks write `marker` (a test hook holding them at a point); fail with
    `what` and the ranks' logs if one exits first or it takes longer than `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"{what}\n{_tail(logdir)}")
        time.sleep(0.2)


def _tail(logdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(logdir.glob("out*.txt")))


def launch(world: int, args: list[str], logdir: Path, expect: int, **extra: str) -> None:
    codes = wait(start(world, args, logdir, **extra), logdir)
    assert codes == [expect] * world, f"exit codes {codes}, expected {expect} on every rank\n{_tail(logdir)}"


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl; a row written after a restart supersedes the earlier one."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from gpt2.checkpoint.manager import resolve
    from gpt2.export import load_model_state

    return load_model_state(resolve(run_dir))


def log_text(run_dir: Path) -> str:
    return "".join(p.read_text() for p in sorted((run_dir / "logs").glob("rank*.log")))


# ---- fixtures -----------------------------------------------------------------------------------
SIGNALS = {"ddp": "USR2", "fsdp": "TERM", "deepspeed": "USR2"}  # both signals get exercised


@pytest.fixture(scope="module")
def common(pydoc_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    ds = tmp_path_factory.mktemp("ds") / "zero2.json"  # one path for every run: the config must match
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    return [*TINY, f"dataset.train_dataset.data_root={pydoc_shards}", f"dataset.val_dataset.data_root={pydoc_shards}",
            f"trainer.config.deepspeed_config={ds}"]


class Runs:
    """Runs made once per module and backend (processes are the expensive part); copy before changing."""

    def __init__(self, common: list[str], factory: pytest.TempPathFactory):
        self.common, self.factory = common, factory
        self.made: dict[tuple[str, str], Path] = {}

    def args(self, backend: str, run: Path, wandb: str = "disabled") -> list[str]:
        return [*self.common, f"trainer={backend}", f"run.dir={run}", f"wandb.mode={wandb}"]

    def baseline(self, backend: str) -> Path:
        """N uninterrupted steps on 2 ranks."""
        if ("base", backend) not in self.made:
            run = self.factory.mktemp(f"base_{backend}")
            launch(2, self.args(backend, run), run / "out", 0, GPT2_TEST_DUMP_FULL_STATE="1")
            self.made["base", backend] = run
        return self.made["base", backend]

    def interrupted(self, backend: str) -> Path:
        """2 ranks; a signal to rank 1 only after step K; every rank saves step K and exits 75.
        DDP logs to W&B (offline), so the resume can show that the run id survives."""
        if ("stop", backend) not in self.made:
            run = self.factory.mktemp(f"stop_{backend}")
            wandb = "offline" if backend == "ddp" else "disabled"
            launch(2, self.args(backend, run, wandb), run / "out", EXIT_REQUEUE, GPT2_TEST_SIGNAL_AT_STEP=str(K),
                   GPT2_TEST_SIGNAL_RANK="1", GPT2_TEST_SIGNAL=SIGNALS[backend])
            self.made["stop", backend] = run
        return self.made["stop", backend]

    def every_step(self, backend: str) -> Path:
        """K uninterrupted steps on 2 ranks with a checkpoint after each (copy it to change it)."""
        if ("every", backend) not in self.made:
            run = self.factory.mktemp(f"every_{backend}")
            launch(2, [*self.args(backend, run), f"{EVERY}=1", f"trainer.config.max_steps={K}"], run / "out", 0)
            self.made["every", backend] = run
        return self.made["every", backend]


@pytest.fixture(scope="module")
def runs(common: list[str], tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(common, tmp_path_factory)


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("out"))
    return dst


# ---- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_signal_to_one_rank_then_resume_is_bitwise_identical(backend: str, runs: Runs, tmp_path: Path) -> None:
    stopped = runs.interrupted(backend)
    step_k = f"step_{K:08d}"
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir() if p.name.startswith("step_")) == [step_k]
    manifest = json.loads((stopped / "checkpoints" / step_k / "MANIFEST.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == backend and manifest["step"] == K
    reason = "SIGTERM" if SIGNALS[backend] == "TERM" else "USR2"
    assert f"stopping at step {K} ({reason})" in log_text(stopped)

    run = clone(stopped, tmp_path / "run")
    wandb = "offline" if backend == "ddp" else "disabled"
    launch(2, runs.args(backend, run, wandb), tmp_path / "out", 0)
    assert f"resumed from {run / 'checkpoints' / step_k} at step {K} (" in log_text(run)
    base = runs.baseline(backend)
    got, want = losses(run), losses(base)
    assert sorted(want) == list(range(1, N + 1))
    assert got == want  # bitwise: the same floats
    a, b = final_weights(run), final_weights(base)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and export reads from the files exactly the model the backend holds (FSDP/ZeRO shards merged)
    full = torch.load(base / f"full_state_{N}.pt", weights_only=True)
    assert a.keys() == full.keys() and all(torch.equal(a[k], full[k].float()) for k in a)

    if backend == "ddp":  # the requeued job continued the same W&B run
        wid = (run / "wandb_id.txt").read_text().strip()
        assert manifest["wandb_id"] == wid
        sessions = sorted((run / "wandb").glob("offline-run-*"))
        assert len(sessions) == 2 and all(p.name.endswith("-" + wid) for p in sessions), sessions


def test_sigkill_during_checkpoint_write_resumes_from_previous(runs: Runs, tmp_path: Path) -> None:
    run = tmp_path / "run"
    marker = tmp_path / "paused"
    args = [*runs.args("ddp", run), f"{EVERY}=1"]
    procs = start(2, args, tmp_path / "first", GPT2_TEST_PAUSE_AT_STEP=str(K), GPT2_TEST_PAUSE_MARKER=str(marker))
    wait_for_marker(procs, marker, f"the save of step {K} never paused", tmp_path / "first")
    for p in procs:
        p.send_signal(signal.SIGKILL)
    assert [p.wait() for p in procs] == [-signal.SIGKILL] * 2
    ckdir = run / "checkpoints"
    assert (ckdir / f"step_{K:08d}.tmp").is_dir() and (ckdir / f"step_{K - 1:08d}" / "MANIFEST.json").is_file()

    launch(2, args, tmp_path / "second", 0)
    text = log_text(run)
    assert f"removing unfinished checkpoint step_{K:08d}.tmp" in text
    assert f"resumed from {ckdir / f'step_{K - 1:08d}'} at step {K - 1} (" in text  # the previous checkpoint
    assert losses(run) == losses(runs.baseline("ddp"))  # and nothing was lost


def test_time_budget_saves_and_requeues_without_a_signal(common: list[str], tmp_path: Path) -> None:
    """In this process (world size 1): a budget shorter than one step and a save stops after step 1."""
    import main as entry

    args = [*common, "trainer=ddp", f"run.dir={tmp_path}", "wandb.mode=disabled"]
    assert entry.main([*args, "trainer.config.time_budget_s=0.5"]) == EXIT_REQUEUE
    assert "stopping at step 1 (time_budget)" in log_text(tmp_path)
    assert entry.main(args) == 0  # the requeued job (no budget now) finishes
    assert f"resumed from {tmp_path / 'checkpoints' / 'step_00000001'} at step 1 (" in log_text(tmp_path)
    assert sorted(losses(tmp_path)) == list(range(1, N + 1))


def _craft(ckpt: Path, rel: str, change: object) -> None:
    """Rewrite one file of a checkpoint and fix its MANIFEST entry to match: a crafted or mis-written
    file that verification cannot tell (its sha256 matches); only the live model and optimizer can."""
    import hashlib
    import pickle

    dcp = rel.endswith(".metadata")  # DCP's metadata is a plain pickle
    obj = pickle.loads((ckpt / rel).read_bytes()) if dcp else torch.load(ckpt / rel, weights_only=False)
    change(obj)  # type: ignore[operator]
    if dcp:
        (ckpt / rel).write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, ckpt / rel)
    data = (ckpt / rel).read_bytes()
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def _short_wpe(sd: dict) -> None:
    sd["transformer.wpe.weight"] = sd["transformer.wpe.weight"][:3].clone()


def _short_moment(sd: dict) -> None:
    state = sd["optimizer_state_dict"]["base_optimizer_state"]["state"][0]
    state["exp_avg"] = state["exp_avg"][:100].clone()


def _short_dcp_wpe(metadata: object) -> None:
    entry = metadata.state_dict_metadata["model.transformer.wpe.weight"]  # type: ignore[attr-defined]
    entry.size = entry.chunks[0].sizes = torch.Size([3, 64])


UNFIT = {  # backend, the file, its change, what the warning says
    "ddp model.pt": ("ddp", "model.pt", _short_wpe, "model.pt does not fit this run's model (transformer.wpe.weight"),
    "fsdp metadata": ("fsdp", "dcp/.metadata", _short_dcp_wpe, "dcp is unreadable (rank 0: ValueError: Size "
                      "mismatch between saved torch.Size([3, 64]) and current: torch.Size([64, 64]) for "
                      "model.transformer.wpe.weight)"),
    "deepspeed module": ("deepspeed", "deepspeed/mp_rank_00_model_states.pt", lambda sd: _short_wpe(sd["module"]),
                         "deepspeed does not fit this run's model (Error(s) in loading state_dict for GPT: size "
                         "mismatch for transformer.wpe.weight"),
    "deepspeed moment": ("deepspeed", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", _short_moment,
                         "deepspeed holds exp_avg of shape (100,) for a parameter of shape"),
}


@pytest.mark.parametrize("kind", list(UNFIT))
def test_a_checkpoint_that_does_not_fit_the_model_falls_back_unless_none_does(kind: str, runs: Runs,
                                                                               tmp_path: Path) -> None:
    """The newest checkpoint verifies but does not load (DeepSpeed: or its AdamW moments would fail
    the first step): both ranks agree, resume from the one before (bitwise the same curve) and
    quarantine it. When no checkpoint loads, every rank stops with one line and nothing is moved: a
    change that no checkpoint fits never starts the run over."""
    backend, rel, change, needle = UNFIT[kind]
    run = clone(runs.every_step(backend), tmp_path / "run")
    _craft(run / "checkpoints" / f"step_{K:08d}", rel, change)
    launch(2, [*runs.args(backend, run), f"{EVERY}=1"], tmp_path / "out2", 0)
    text = log_text(run)
    assert f"step_{K:08d}: {needle}" in text, text[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{K - 1:08d}'} at step {K - 1} (" in text
    assert losses(run) == losses(runs.baseline(backend))  # bitwise: nothing lost but the unfit step's work
    (moved,) = [p for p in (run / "checkpoints" / "quarantine").glob(f"step_{K:08d}-*") if p.is_dir()]
    assert (moved / rel).is_file()  # kept as found
    assert needle in Path(f"{moved}.QUARANTINE_REASON.txt").read_text()
    if backend != "ddp":
        return

    none = clone(runs.every_step(backend), tmp_path / "none")
    ckdir = none / "checkpoints"
    for step in range(1, K + 1):  # none fits now
        _craft(ckdir / f"step_{step:08d}", rel, change)

    def files() -> dict[str, bytes]:  # the checkpoints and the curve, as they are
        return {str(p): p.read_bytes() for p in [*ckdir.rglob("*"), none / "metrics.jsonl"]
                if p.is_file() and p.name != ".lock"}

    before = files()
    codes = wait(start(2, [*runs.args(backend, none), f"{EVERY}=1"], tmp_path / "out3"), tmp_path / "out3")
    assert codes == [2, 2], _tail(tmp_path / "out3")
    assert f"step_{K:08d}/model.pt does not fit this run's model" in (tmp_path / "out3" / "out0.txt").read_text()
    assert files() == before and not (ckdir / "quarantine").exists()


@pytest.mark.parametrize("when", ["read", "write"])
def test_a_storage_error_is_a_retry_not_a_damaged_checkpoint(when: str, runs: Runs, tmp_path: Path) -> None:
    """On rank 1 the file system fails (EIO) the newest checkpoint's model.pt as it is read to
    resume, or the checkpoint of step K as it is written: every rank exits 76, a retry, and the
    report says storage_error (what the launcher requeues without blaming a node). Nothing is
    skipped, fallen back past, quarantined or committed half-written. The retry, with the file
    system back, resumes from the newest whole checkpoint: the same curve, bitwise."""
    from gpt2.checkpoint.files import committed_steps, parse_step
    from gpt2.watchdog import first_failure

    run, ckdir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    args = [*runs.args("ddp", run), f"{EVERY}=1"]
    if when == "read":
        clone(runs.every_step("ddp"), run)
    newest = ckdir / f"step_{K:08d}"
    failing, resumed = (newest / "model.pt", newest) if when == "read" else (ckdir / f"{newest.name}.tmp", None)

    def files() -> dict[str, bytes]:
        return {str(p): p.read_bytes() for p in ckdir.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    procs = start(2, args, tmp_path / "out2", GPT2_TEST_STORAGE_ERROR=str(failing), GPT2_TEST_STORAGE_RANK="1")
    assert wait(procs, tmp_path / "out2") == [EXIT_FAILURE] * 2, _tail(tmp_path / "out2")
    said = [(tmp_path / "out2" / f"out{r}.txt").read_text() for r in range(2)]
    assert str(failing) in said[1] and ": a storage error (EIO: input/output error); nothing was changed" in said[1], \
        said[1]
    failure = first_failure(run, 0)
    assert failure is not None and failure["kind"] == "storage_error", failure
    assert not (ckdir / "quarantine").exists() and "trying the checkpoint before it" not in log_text(run)
    if when == "read":
        assert files() == before
    else:  # rank 0 learns of it at the same poll: a storage error there too, not a crash of its own
        assert "a storage error (EIO: input/output error)" in said[0], said[0]
        assert committed_steps(ckdir) == [K - 1]
        resumed = ckdir / f"step_{K - 1:08d}"

    launch(2, args, tmp_path / "out3", 0)
    assert f"resumed from {resumed} at step {parse_step(resumed.name)} (" in log_text(run)
    assert losses(run) == losses(runs.baseline("ddp"))


def test_a_storage_error_reading_shard_headers_is_a_retry(runs: Runs, pydoc_shards: Path, tmp_path: Path) -> None:
    """From the start the file system fails (EIO) every open of rank 1's token shards: every rank
    exits 76, and the report says storage_error, naming a shard (a retry, no node blamed), not a
    bad shard, which would end the job. The retry, with the file system back, trains the same curve."""
    from gpt2.watchdog import first_failure

    shards = shutil.copytree(pydoc_shards, tmp_path / "shards")  # the paths that fail
    run = tmp_path / "run"
    args = [*runs.args("ddp", run), f"dataset.train_dataset.data_root={shards}", f"dataset.val_dataset.data_root={shards}"]
    procs = start(2, args, tmp_path / "out2", GPT2_TEST_STORAGE_ERROR=str(shards), GPT2_TEST_STORAGE_RANK="1")
    assert wait(procs, tmp_path / "out2") == [EXIT_FAILURE] * 2, _tail(tmp_path / "out2")
    failure = first_failure(run, 0)
    assert failure is not None and (failure["kind"], failure["rank"]) == ("storage_error", 1), failure
    said = (tmp_path / "out2" / "out1.txt").read_text()
    assert f"{shards}/pydoc_" in said and ": a storage error (EIO: input/output error)" in said, said
    launch(2, args, tmp_path / "out3", 0)
    assert losses(run) == losses(runs.baseline("ddp"))


def test_a_file_system_that_fails_mid_run_under_the_shards_is_a_retry_that_continues_the_curve(
        runs: Runs, pydoc_shards: Path, failing_mount_direct: FailingMount, tmp_path: Path) -> None:
    """The token shards on a real file system that starts failing after step K (FUSE, every read
    EIO from the kernel, no page cache: tests/failing_fs.py), files the loader holds open included:
    every rank exits 76 and the first report says storage_error, naming a shard: a retry, with no
    node blamed. Read through memory maps, a rank died of SIGBUS instead: a crash the other rank
    blamed on its node. The retry, with the file system back, resumes from the newest committed
    checkpoint: the same curve, bitwise."""
    from gpt2.watchdog import first_failure

    fs = failing_mount_direct
    for shard in pydoc_shards.glob("*.bin"):
        shutil.copy(shard, fs.source)
    run = tmp_path / "run"
    args = [*runs.args("ddp", run), f"{EVERY}=1", f"dataset.train_dataset.data_root={fs.mount}",
            f"dataset.val_dataset.data_root={fs.mount}"]
    procs = start(2, args, tmp_path / "out2", GPT2_TEST_SWITCH=str(fs.switch), GPT2_TEST_SWITCH_AFTER_STEP=str(K),
                  GPT2_TEST_SWITCH_RANK="1")
    assert wait(procs, tmp_path / "out2") == [EXIT_FAILURE] * 2, _tail(tmp_path / "out2")
    failure = first_failure(run, 0)
    assert failure is not None and (failure["kind"], failure["step"]) == ("storage_error", K + 1), failure
    said = (tmp_path / "out2" / f"out{failure['rank']}.txt").read_text()
    assert f"{fs.mount}/pydoc_train_0000" in said and ": a storage error (EIO: input/output error)" in said, said

    fs.switch.unlink()
    launch(2, args, tmp_path / "out3", 0)
    # step K's save was still being written when step K + 1 failed: committed, or not (then K - 1)
    assert any(f"resumed from {run / 'checkpoints' / f'step_{k:08d}'} at step {k} (" in log_text(run)
               for k in (K - 1, K)), log_text(run)
    assert losses(run) == losses(runs.baseline("ddp"))


@pytest.mark.parametrize("backend,world", [("ddp", 1), ("fsdp", 1), ("fsdp", 4)])
def test_checkpoint_from_two_ranks_resumes_on_another_world_size(
    backend: str, world: int, runs: Runs, tmp_path: Path
) -> None:
    run = clone(runs.interrupted(backend), tmp_path / "run")
    launch(world, runs.args(backend, run), tmp_path / "out", 0)
    assert f"resumed from {run / 'checkpoints' / f'step_{K:08d}'} at step {K} (" in log_text(run)
    got = losses(run)
    assert sorted(got) == list(range(1, N + 1)) and all(0 < v < 20 for v in got.values())
    manifest = json.loads((run / "checkpoints" / f"step_{N:08d}" / "MANIFEST.json").read_text())
    assert manifest["world_size"] == world and manifest["trainer_state"]["step"] == N


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
