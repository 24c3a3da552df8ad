"""Checkpoints that trust nothing (issue 14, part 5): crafted files, malformed manifests, crashes
during retention, quarantine, and DeepSpeed's own zero_to_fp32 on our checkpoints (the writer
lease: tests/test_lease.py).

In-process tests build checkpoints with a fake backend (tests/test_checkpoint.py's); the slow ones
run the real backends as 2 gloo processes (tests/test_resume.py's launcher and worker).
A crafted pickle here runs `touch <marker>` when unpickled: every test checks the marker is absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_checkpoint / test_resume, also as a script


# ---- helpers -----------------------------------------------------------------------------------
class Evil:
    """Unpickling this runs a shell command: what a crafted checkpoint file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def evil_torch(marker: Path) -> bytes:
    """A torch archive (torch.save: GLOBAL opcodes) whose pickle calls os.system."""
    import io

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2), "x": Evil(marker)}, buf)
    return buf.getvalue()


def evil_plain(marker: Path) -> bytes:
    """A plain protocol-4 pickle (STACK_GLOBAL, memoized strings), like DCP's .metadata."""
    return pickle.dumps({"meta": Evil(marker)}, protocol=4)


def rewrite(ckpt: Path, rel: str, data: bytes) -> None:
    """Replace a checkpoint file and fix its MANIFEST entry, as an attacker who can write both would."""
    (ckpt / rel).write_bytes(data)
    edit_manifest(ckpt, lambda m: m["files"].__setitem__(rel, {"size": len(data),
                                                              "sha256": hashlib.sha256(data).hexdigest()}))


def edit_manifest(ckpt: Path, change: object) -> None:
    path = ckpt / "MANIFEST.json"
    m = json.loads(path.read_text())
    change(m)  # type: ignore[operator]
    path.write_text(json.dumps(m))


def two_steps(root: Path) -> tuple[Path, Path]:
    from test_checkpoint import manager, save

    m = manager(root)
    return save(m, 1), save(m, 2)


def falls_back(root: Path, warnings: list[str], *needles: str) -> None:
    """A fresh start finds step 1, having logged why step 2 is invalid, and quarantined step 2."""
    from test_checkpoint import manager

    resume = manager(root).find_latest()
    assert resume is not None and resume.step == 1, warnings
    why = next((w for w in warnings if w.startswith("skipping damaged checkpoint: step_00000002")), None)
    assert why is not None and "\n" not in why, warnings
    for needle in needles:
        assert needle in why, (needle, why)
    assert not (root / "step_00000002").exists()
    (moved,) = [p for p in (root / "quarantine").glob("step_00000002-*") if p.is_dir()]
    assert os.path.lexists(moved / "MANIFEST.json")  # kept whole, as found


def export_refused(path: Path, out: Path, capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    from gpt2 import export

    assert export.main([str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (out / "model.safetensors").exists()
    return err


# ---- verification opens only regular files inside the checkpoint ------------------------------
def _outside(ckpt: Path, tmp: Path) -> str:
    target = tmp / "secret.txt"
    target.write_text("not part of any checkpoint")
    (ckpt / "link.pt").symlink_to(target)
    return "link.pt"


def _fifo(ckpt: Path, tmp: Path) -> str:
    os.mkfifo(ckpt / "pipe.pt")
    return "pipe.pt"


def _directory(ckpt: Path, tmp: Path) -> str:
    (ckpt / "sub").mkdir()
    return "sub"


BAD_ENTRIES = {
    "symlink out": (_outside, "outside the checkpoint"),
    "dotdot": (lambda ckpt, tmp: "../step_00000001/model.pt", "climbs out with '..'"),
    "absolute": (lambda ckpt, tmp: str(ckpt / "model.pt"), "is an absolute path"),
    "fifo": (_fifo, "is a FIFO"),
    "directory": (_directory, "is a directory"),
}


@pytest.mark.parametrize("kind", list(BAD_ENTRIES))
def test_manifest_entry_outside_or_special_invalidates(kind: str, tmp_path: Path, warnings: list[str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    make, needle = BAD_ENTRIES[kind]
    root = tmp_path / "ck"
    _, newest = two_steps(root)
    rel = make(newest, tmp_path)
    edit_manifest(newest, lambda m: m["files"].__setitem__(rel, {"size": 0, "sha256": None}))
    # a FIFO would block whoever opens it: verification must answer without opening it
    without_blocking(export_refused, newest, tmp_path / "hf", capsys, "step_00000002", needle)
    without_blocking(falls_back, root, warnings, needle)


def without_blocking(fn, *args: object) -> None:  # noqa: ANN001
    """Run fn(*args) on a thread; fail (instead of hanging) if it has not returned within 2 minutes."""
    failed: list[BaseException] = []

    def call() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # handed to the test's thread
            failed.append(exc)

    done = threading.Thread(target=call, daemon=True)
    done.start()
    done.join(120)
    assert not done.is_alive(), f"{fn.__name__} blocked (it opened a FIFO)"
    if failed:
        raise failed[0]


def test_fifo_manifest_is_never_opened(tmp_path: Path, warnings: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ck"
    _, newest = two_steps(root)
    (newest / "MANIFEST.json").unlink()
    os.mkfifo(newest / "MANIFEST.json")
    without_blocking(export_refused, newest, tmp_path / "hf", capsys, "unreadable MANIFEST.json (not a regular file)")
    without_blocking(falls_back, root, warnings, "not a regular file")


# ---- a manifest with the wrong structure or types ---------------------------------------------
def _set(path: str, value: object):  # noqa: ANN202 - a manifest edit
    def change(m: dict) -> None:
        *parents, last = path.split("/")
        for p in parents:
            m = m[p]
        if value is KeyError:
            del m[last]
        else:
            m[last] = value
    return change


MALFORMED = {
    "missing size": (_set("files/model.pt", {"sha256": None}), "has no whole-number size"),
    "size is a string": (_set("files/model.pt", {"size": "12", "sha256": None}), "has no whole-number size"),
    "no trainer_state": (_set("trainer_state", KeyError), "no trainer_state"),
    "trainer_state a list": (_set("trainer_state", [1, 2]), "no trainer_state"),
    "no trainer step": (_set("trainer_state/step", KeyError), "trainer_state.step is None"),
    "tokens a string": (_set("trainer_state/tokens", "20"), "trainer_state.tokens is '20'"),
    "no loader state": (_set("trainer_state/data", KeyError), "trainer_state.data"),
    "files a list": (_set("files", ["model.pt"]), "files is not a non-empty object"),
    "step a string": (_set("step", "2"), "step is '2'"),
    "world size zero": (_set("world_size", 0), "world_size is 0"),
    "sha256 a number": (_set("files/model.pt", {"size": 1, "sha256": 5}), "not a sha256 hex digest"),
    "wandb_id a number": (_set("wandb_id", 12345), "wandb_id is a int, not a W&B run id"),
    "wandb_id a list": (_set("wandb_id", ["a"]), "wandb_id is a list, not a W&B run id"),
    "wandb_id hostile": (_set("wandb_id", "x\n\x1b[2J../../evil"), "is not a W&B run id"),
}


def _overwrite(text: str):  # noqa: ANN202
    return lambda ckpt: (ckpt / "MANIFEST.json").write_text(text)


RAW = {
    "a JSON array": (_overwrite("[1, 2, 3]"), "holds a JSON list, not an object"),
    "huge nesting": (_overwrite("[" * 200_000 + "]" * 200_000), "nested too deeply"),
    "not JSON": (_overwrite("{nope"), "not valid JSON"),
    "binary": (lambda ckpt: (ckpt / "MANIFEST.json").write_bytes(b"\xff\xfe\x00"), "unreadable MANIFEST.json"),
}


@pytest.mark.parametrize("kind", list(MALFORMED) + list(RAW))
def test_malformed_manifest_is_invalid_with_a_reason(kind: str, tmp_path: Path, warnings: list[str],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "ck"
    _, newest = two_steps(root)
    if kind in MALFORMED:
        change, needle = MALFORMED[kind]
        edit_manifest(newest, change)
    else:
        write, needle = RAW[kind]
        write(newest)
    export_refused(newest, tmp_path / "hf", capsys, needle)
    falls_back(root, warnings, needle)


def test_export_cli_refuses_a_malformed_only_checkpoint_in_one_line(tmp_path: Path) -> None:
    from test_checkpoint import manager, save

    root = tmp_path / "run" / "checkpoints"
    path = save(manager(root), 1)
    edit_manifest(path, _set("trainer_state", "oops"))
    proc = subprocess.run([sys.executable, "-m", "gpt2.export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.startswith("error: no checkpoint under") and proc.stderr.count("\n") == 1, proc.stderr
    assert "no trainer_state object" in proc.stderr


# ---- crafted pickles ---------------------------------------------------------------------------
@pytest.mark.parametrize("rel", ["model.pt", "optimizer.pt", "rank_00000.pt"])
def test_crafted_pickle_is_refused_and_never_runs(rel: str, tmp_path: Path, warnings: list[str],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    root = tmp_path / "ck"
    _, newest = two_steps(root)
    rewrite(newest, rel, evil_torch(marker))
    err = export_refused(newest, tmp_path / "hf", capsys, f"{rel}:", "posix.system", "refusing to load it")
    assert "step_00000002" in err
    falls_back(root, warnings, rel, "posix.system")
    assert not marker.exists()


def test_loaders_scan_what_they_read_even_if_unlisted(tmp_path: Path) -> None:
    """The loaders' own guard: a crafted file the manifest does not list is refused too."""
    from gpt2.checkpoint import safe_load

    marker = tmp_path / "pwned"
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(evil_plain(marker))  # STACK_GLOBAL form
    with pytest.raises(safe_load.UnsafeCheckpointError, match=r"\.metadata: its pickle imports posix\.system"):
        safe_load.check_dir(tmp_path / "dcp", "fsdp")
    (tmp_path / "model.pt").write_bytes(evil_torch(marker))
    with pytest.raises(safe_load.UnsafeCheckpointError, match="model.pt"):
        safe_load.load(tmp_path / "model.pt")
    with pytest.raises(safe_load.UnsafeCheckpointError, match="not a regular file"):
        os.mkfifo(tmp_path / "fifo.pt")
        safe_load.load(tmp_path / "fifo.pt")
    assert not marker.exists()


def test_a_pickle_with_a_zip_appended_is_not_an_archive(tmp_path: Path) -> None:
    """torch.load decides by the first bytes, zipfile by the last: a polyglot must not pass the scan."""
    from gpt2.checkpoint import safe_load

    marker = tmp_path / "pwned"
    clean = tmp_path / "clean.pt"
    torch.save({"w": torch.zeros(2)}, clean)
    poly = tmp_path / "poly.pt"
    poly.write_bytes(pickle.dumps(Evil(marker), protocol=2) + clean.read_bytes())
    with pytest.raises(safe_load.UnsafeCheckpointError, match="poly.pt: unreadable as a checkpoint file .*not a torch "
                                                              "archive"):
        safe_load.check_file(poly, safe_load.TORCH)
    assert not marker.exists()


def test_scanning_an_archive_held_in_memory_leaves_it_open_for_its_owner() -> None:
    import io

    from gpt2.checkpoint import safe_load

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)
    names = [name for name, _ in safe_load._archive_pickles("blob", buf)]
    assert names and all(n.startswith("blob:") and n.endswith(".pkl") for n in names)
    assert not buf.closed  # the caller may still read it (the DCP reader hands one in per item)


def test_stack_global_names_are_tracked_through_the_memo() -> None:
    from gpt2.checkpoint.safe_load import pickle_globals

    data = pickle.dumps([Evil(Path("x")), Evil(Path("y")), torch.Size([2])], protocol=4)  # 2nd: memo gets
    assert set(pickle_globals(data)) == {"posix.system", "torch.Size"}
    assert list(pickle_globals(pickle.dumps({"a": [1, 2.0, "s"]}, protocol=5))) == []


# ---- retention: crashes and quarantine --------------------------------------------------------
CRASH = """
import shutil, sys, time
from pathlib import Path
from test_checkpoint import manager, save
root, point, marker = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
m = manager(root, keep_last=2)
save(m, 1)
save(m, 2)
real = shutil.rmtree
def killed_here(path, *args, **kw):
    if str(path).endswith(".drop.tmp"):
        if point == "mid_delete":  # some of the dropped checkpoint's files are gone already
            next(p for p in sorted(Path(path).rglob("*.pt"))).unlink()
        marker.write_text(str(path))
        time.sleep(600)
    real(path, *args, **kw)
shutil.rmtree = killed_here
save(m, 3)  # commits step 3, then retention drops step 1
"""


@pytest.mark.parametrize("point", ["after_rename", "mid_delete"])
def test_sigkill_during_retention_keeps_the_newest_step(point: str, tmp_path: Path, warnings: list[str]) -> None:
    from test_checkpoint import manager

    root, marker = tmp_path / "ck", tmp_path / "at_retention"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    proc = subprocess.Popen([sys.executable, "-c", CRASH, str(root), point, str(marker)], env=env)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "retention never reached the kill point"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (root / "step_00000001.drop.tmp").is_dir() and (root / "latest").read_text().strip() == "step_00000003"
    resume = manager(root).find_latest()
    assert resume is not None and resume.step == 3
    assert [p.name for p in sorted(root.glob("step_*"))] == ["step_00000002", "step_00000003"]
    assert any("removing unfinished checkpoint step_00000001.drop.tmp" in w for w in warnings)


def test_interrupted_resave_puts_the_old_copy_back(tmp_path: Path, warnings: list[str]) -> None:
    from test_checkpoint import manager

    root = tmp_path / "ck"
    _, newest = two_steps(root)
    newest.rename(root / "step_00000002.old.tmp")  # killed between moving the old copy aside and the new in
    resume = manager(root).find_latest()
    assert resume is not None and resume.step == 2
    assert any("restoring step_00000002 from step_00000002.old.tmp" in w for w in warnings)


def test_retention_quarantines_newer_checkpoints_instead_of_deleting(tmp_path: Path, warnings: list[str]) -> None:
    from test_checkpoint import manager, save

    from gpt2.checkpoint.quarantine import REASON_FILE

    root = tmp_path / "ck"
    m = manager(root, keep_last=2)
    for step in (1, 2, 5):
        save(m, step)
    # retention after a save of step 3 finds step 5 newer (a run that continued from an older step)
    m._retain(3)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]  # step 1 went at the save of 5
    (moved,) = [p for p in (root / "quarantine").iterdir() if p.is_dir()]
    assert moved.name.startswith("step_00000005-") and (moved / "model.pt").is_file()
    reason = (root / "quarantine" / f"{moved.name}.{REASON_FILE}").read_text()
    assert "newer than step 3" in reason and any("quarantined step_00000005" in w for w in warnings)


# ---- real backends on 2 gloo processes -----------------------------------------------------------
def _start(world: int, args: list[str], logdir: Path, script: Path = ROOT / "tests" / "test_resume.py",
           **extra: str) -> list[subprocess.Popen[bytes]]:
    """test_resume.start, with the worker script as a parameter (test_lease.py adds a hook to it)."""
    from test_resume import _env, _free_port

    logdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for r in range(world):
        with open(logdir / f"out{r}.txt", "ab") as out:
            procs.append(subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT,
                                          env=_env(r, world, port, extra), stdout=out, stderr=subprocess.STDOUT))
    return procs


def _run(world: int, args: list[str], logdir: Path, **extra: str) -> list[int]:
    from test_resume import wait

    return wait(_start(world, args, logdir, **extra), logdir)


def _tail(logdir: Path) -> str:
    from test_resume import _tail as tail

    return tail(logdir)


SMALL = ["model.config.n_layer=2", "model.config.n_head=2", "model.config.n_embd=64", "model.config.block_size=64",
         "dataset.seq_len=32", "trainer.config.batch_size=2", "trainer.config.warmup_steps=1",
         "trainer.config.eval_interval=0", "run.device=cpu", "wandb.mode=disabled",
         "trainer.config.checkpoint_strategy.config.interval=1"]


@pytest.fixture(scope="module")
def base_args(pydoc_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    ds = tmp_path_factory.mktemp("ds") / "zero2.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    return [*SMALL, f"dataset.train_dataset.data_root={pydoc_shards}",
            f"dataset.val_dataset.data_root={pydoc_shards}", f"trainer.config.deepspeed_config={ds}"]


@pytest.fixture(scope="module")
def trained(base_args: list[str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 2-rank run per backend, 2 steps, a checkpoint after each (made on first use)."""

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, backend: str) -> Path:
            run = tmp_path_factory.mktemp(f"trained_{backend}")
            codes = _run(2, [*base_args, f"trainer={backend}", f"run.dir={run}", "trainer.config.max_steps=2"],
                         run / "out")
            assert codes == [0, 0], _tail(run / "out")
            self[backend] = run
            return run

    return Lazy()


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("out"), symlinks=True)
    return dst


CRAFTED = {
    "ddp": ("model.pt", evil_torch),
    "fsdp": ("dcp/.metadata", evil_plain),
    "deepspeed": ("deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt", evil_torch),
}


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(CRAFTED))
def test_crafted_file_in_a_real_checkpoint(backend: str, trained: dict[str, Path], base_args: list[str],
                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Export refuses the crafted checkpoint in one line; a 2-rank resume falls back to step 1 (logged)."""
    from test_resume import log_text

    run = _copy(trained[backend], tmp_path / "run")
    marker = tmp_path / "pwned"
    rel, craft = CRAFTED[backend]
    step2 = run / "checkpoints" / "step_00000002"
    rewrite(step2, rel, craft(marker))
    export_refused(step2, tmp_path / "hf", capsys, rel.rsplit("/", 1)[-1], "posix.system")
    codes = _run(2, [*base_args, f"trainer={backend}", f"run.dir={run}", "trainer.config.max_steps=2"],
                 tmp_path / "out")
    assert codes == [0, 0], _tail(tmp_path / "out")
    text = log_text(run)
    assert "skipping damaged checkpoint: step_00000002" in text and "posix.system" in text
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'} at step 1 (" in text
    assert any((run / "checkpoints" / "quarantine").glob("step_00000002-*"))
    assert not marker.exists()


@pytest.mark.slow
def test_crafted_byte_item_inside_a_dcp_shard(trained: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """DCP stores non-tensor values (the optimizer's lr, betas) as torch archives inside the .distcp
    files, which torch loads with weights_only=False: one of them, crafted, is refused by name."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    from gpt2.checkpoint import manager as checkpoint

    run = _copy(trained["fsdp"], tmp_path / "run")
    marker = tmp_path / "pwned"
    step2 = run / "checkpoints" / "step_00000002"
    meta_path = step2 / "dcp" / ".metadata"
    meta = pickle.loads(meta_path.read_bytes())
    index = next(i for i in meta.storage_data if i.fqn == "optim.param_groups.0.lr")
    shard = step2 / "dcp" / meta.storage_data[index].relative_path
    evil, at = evil_torch(marker), shard.stat().st_size
    rewrite(step2, f"dcp/{shard.name}", shard.read_bytes() + evil)
    meta.storage_data[index] = _StorageInfo(shard.name, at, len(evil))
    rewrite(step2, "dcp/.metadata", pickle.dumps(meta))
    why = checkpoint.verify(step2) or ""
    assert f"{shard.name}:optim.param_groups.0.lr" in why and "posix.system" in why, why
    export_refused(step2, tmp_path / "hf", capsys, "optim.param_groups.0.lr")
    assert not marker.exists()


@pytest.mark.slow
def test_deepspeeds_own_zero_to_fp32_reads_our_checkpoint(trained: dict[str, Path], tmp_path: Path) -> None:
    """`python step_X/zero_to_fp32.py step_X OUT`, as DeepSpeed documents it: the same weights as our export."""
    from gpt2.export import load_model_state

    ckpt = trained["deepspeed"] / "checkpoints" / "step_00000002"
    assert (ckpt / "latest").read_text().strip() == "deepspeed"
    out = tmp_path / "fp32"
    proc = subprocess.run([sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (weights,) = out.glob("pytorch_model*.bin")
    theirs = torch.load(weights, weights_only=True)
    ours = load_model_state(ckpt)
    assert set(theirs) <= set(ours) and "transformer.wte.weight" in theirs and len(theirs) >= len(ours) - 1
    for key, value in theirs.items():
        assert torch.equal(value.float(), ours[key]), key
