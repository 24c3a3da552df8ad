"""Checkpoints that are either whole or absent.

Layout of a checkpoint directory (the same for every backend):

    <root>/step_00001200/           a committed checkpoint
        model.pt, optimizer.pt      (DDP)  | dcp/ (FSDP)  | deepspeed/ (DeepSpeed): what backend.save wrote
        rank_00000.pt ...           one per rank: that rank's RNG states (python, numpy, torch, cuda)
        MANIFEST.json               written last; its presence marks the checkpoint as committed
    <root>/latest                   "step_00001200", replaced atomically under <root>/.lock

Commit protocol (`CheckpointManager.save`, collective; then `poll`, collective, every step):
  1. the save in flight, if any, is finished first (at most one at a time); rank 0 creates
     `step_XXXXXXXX.tmp/`; every rank stages its share (`backend.stage`: a host copy, pinned
     on CUDA, that overlaps the next forward and backward and that the optimizer step waits
     for; FSDP and DeepSpeed run their own collectives here) and its RNG states. Training is
     blocked only this long (`last_blocked_s`, plus that wait);
  2. in a thread of each rank (no collectives there): write the rank's files into the .tmp
     directory, hashing them as they are written, fsync them (gpt2/checkpoint/writer.py);
  3. at a later step boundary one all-reduce (`poll`) finds every rank done; rank 0 gathers
     the sizes and sha256s and, in its thread, writes MANIFEST.json (format version, step,
     backend, world size, config and its hash, trainer state with the data-loader position,
     W&B run id, the rank files, every file's size and sha256), fsyncs it, renames the
     directory to `step_XXXXXXXX/`, fsyncs the parent, replaces the `latest` pointer;
  4. retention (rank 0's thread) keeps the last `keep_last` checkpoints and every
     `keep_every`-th step, and drops checkpoints newer than the one just saved (an abandoned
     timeline: they failed verification when this run started, or it would have resumed from them).
With `async_save=false` (and for the last save after a stop) 2-4 run before `save` returns.
A write failure (a full disk) on any rank raises on every rank at the next `poll`. A process
killed anywhere in 1-3 leaves a `.tmp` directory that the next start removes; the previous
checkpoint is untouched. A re-save renames the old copy to `.old.tmp` before the new one takes
its name: killed between the two, the next start puts the old one back (`gpt2.checkpoint.quarantine.clean_leftovers`).

On start (`find_latest`, collective) rank 0 removes leftover `.tmp` directories, verifies
checkpoints newest first (structure, file types and places, pickles and sizes always: see
`verify`; sha256 unless `verify_checksums=false`), logs why it skips a damaged one, and
broadcasts its choice. No checkpoint at all: a fresh start. Only
damaged ones: CheckpointError, since starting over silently would throw a run away.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.distributed as tdist
from loguru import logger

from gpt2 import distributed
from gpt2.checkpoint import safe_load
from gpt2.checkpoint.files import (  # noqa: F401  (re-exported: the checkpoint's names and its reading side)
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    CheckpointError,
    _describe,
    _list_files,
    _load_manifest,
    _sha256,
    _write_atomic,
    check_compatible,
    committed_steps,
    newest_valid,
    parse_step,
    rank_file,
    read_manifest,
    resolve,
    rng_state,
    set_rng_state,
    step_name,
    verify,
)
from gpt2.checkpoint.quarantine import clean_leftovers, drop, quarantine, remove
from gpt2.checkpoint.writer import PendingSave, SavedNow, Staged, failure_line, fsync, write_torch
from gpt2.config import CheckpointSettings
from gpt2.distributed import DistInfo
from gpt2.errors import UserError, is_storage_error, storage_error_on
from gpt2.safe_write import file_lock, write_new

if TYPE_CHECKING:
    from gpt2.checkpoint.lease import Lease

SAVE_GUESS_BYTES_S = 100e6  # save speed assumed before the first save (measured: ~200 MB/s per node here)


class SavesState(Protocol):
    """What the manager needs of a backend (gpt2.backends.base.Backend satisfies it).

    `stage(dir, copy)` (see gpt2/checkpoint/writer.py) is used when present; an object with only
    `save(dir)` (a test's fake) is saved synchronously and its files hashed by reading them back."""

    name: str

    def save(self, ckpt_dir: Path) -> Any: ...


# ---- the manager -----------------------------------------------------------------------------
@dataclass
class Resume:
    """What a verified checkpoint tells the loop."""

    path: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def trainer_state(self) -> dict[str, Any]:
        return self.manifest["trainer_state"]


class CheckpointManager:
    """Commits, finds and prunes the checkpoints of one run under `root`.

    `save` and `find_latest` are collective: every rank calls them, in the same order."""

    def __init__(self, root: Path, settings: CheckpointSettings, dist: DistInfo):
        self.root = Path(root)
        self.s = settings
        self.dist = dist
        self.lock = file_lock(self.root / ".lock")
        self.last_save_s = 0.0  # wall time of the last save, for the stop margin
        self.last_save_bytes = 0
        self.last_blocked_s = 0.0  # seconds the last save (or wait) blocked training
        self.pending: PendingSave | None = None  # the save in flight
        self._guess_s: float | None = None
        self._skipped: dict[int, str] = {}  # step -> why it failed verification at start (rank 0)
        self.lease: Lease | None = None  # rank 0's writer lease (gpt2.checkpoint.lease), checked before each commit

    def expected_save_s(self, state_bytes: Callable[[], int]) -> float:
        """How long a save should take: the last one, or before any, this rank's state at a
        conservative 100 MB/s (`state_bytes` is called once, e.g. `backend.state_bytes`)."""
        if self.last_save_s > 0:
            return self.last_save_s
        if self._guess_s is None:
            self._guess_s = state_bytes() / SAVE_GUESS_BYTES_S
        return self._guess_s

    # -- writing ---------------------------------------------------------------------------
    def save(self, step: int, backend: SavesState, *, meta: dict[str, Any], trainer_state: dict[str, Any],
             background: bool = False) -> Path:
        """Collective: start a checkpoint of `step`; returns the directory it will be committed as.

        Waits for the save in flight first (at most one at a time), stages this rank's state off
        the device, and then either writes and commits it before returning (`background` False) or
        leaves that to a thread and to the `poll()` calls of the next steps (True: the
        `async_save` setting, which train.py reads). `meta` (config, config_hash, resolved_config, wandb_id, ...)
        and `trainer_state` (step, tokens, data-loader state: JSON) go into the manifest as rank 0
        has them. Re-saving a step that exists replaces it only after the new copy is complete.
        A failure to write (a full disk) raises on every rank, here or at a later `poll()`."""
        t0 = time.perf_counter()
        self._finish()
        stage = getattr(backend, "stage", None)
        background = background and stage is not None
        final = self.root / step_name(step)
        tmp = self.root / (final.name + ".tmp")
        if self.dist.is_main:
            self._fence(f"starting {final.name}")  # a stale writer must not clear the live one's .tmp
            self.root.mkdir(parents=True, exist_ok=True)
            remove(tmp, ignore_errors=False)  # a leftover, or a symlink (removed itself, never followed)
            tmp.mkdir()
        distributed.barrier()
        job = PendingSave(step, tmp, final, backend.name, meta, json.loads(json.dumps(trainer_state)), t0)
        self.pending = job
        try:
            staged = stage(tmp, copy=background) if stage is not None else SavedNow(backend)
            rng = rng_state()
        except (OSError, RuntimeError) as exc:  # a library writing by itself (DeepSpeed's scripts)
            job.error = exc
        else:
            job.run(lambda: self._write_local(job, staged, rng), background)
        if not background:
            self._finish()
        self.last_blocked_s = time.perf_counter() - t0
        return final

    def _write_local(self, job: PendingSave, staged: Staged, rng: dict[str, Any]) -> None:
        """This rank's files: the backend's share and its RNG states (any thread; no collectives)."""
        files = staged.write(job.tmp)
        files[rank_file(self.dist.rank)] = write_torch(rng, job.tmp / rank_file(self.dist.rank))
        job.files = files

    def poll(self) -> None:
        """Collective, at every step boundary: move the save in flight on, once every rank is ready.

        A no-op without one (every rank knows: saves are collective). With one, one all-reduce
        tells whether every rank has finished its part: then rank 0 gathers the file hashes and
        commits in its thread (the "write" phase ends), or the commit is known done (the save
        ends). A failure anywhere raises on every rank (`_fail`)."""
        job = self.pending
        if job is None:
            return
        busy = job.busy()
        failed = not busy and job.error is not None
        busy_any, failed_any = distributed.all_reduce([float(busy), float(failed)], op="max", device=self.dist.device)
        if failed_any:
            self._fail(job)
        if busy_any:
            return
        if job.phase == "write":
            files = _gather_dicts(job.files, self.dist)
            job.phase = "commit"
            if self.dist.is_main:
                job.run(lambda: self._commit_job(job, files), background=job.background)
            return
        self.pending = None
        self.last_save_s = job.work_s
        self.last_save_bytes = job.bytes

    def wait(self) -> None:
        """Collective: block until the save in flight (if any) is committed; sets `last_blocked_s`."""
        t0 = time.perf_counter()
        self._finish()
        self.last_blocked_s = time.perf_counter() - t0

    def _finish(self) -> None:
        while self.pending is not None:
            self.pending.join()
            self.poll()

    def close(self) -> None:
        """Not collective (an error path): let this rank's write thread end, commit nothing."""
        if self.pending is not None:
            self.pending.join()
            self.pending = None

    def _commit_job(self, job: PendingSave, files: dict[str, dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        self._commit(job.tmp, job.final, job.step, job.backend, job.meta, job.trainer_state, files)
        self._retain(job.step)
        job.bytes = sum(f["size"] for f in files.values())
        job.work_s += time.perf_counter() - t0

    def _fail(self, job: PendingSave) -> None:
        """Every rank: raise what went wrong; a full disk anywhere is a one-line UserError, a
        storage error anywhere an OSError of its errno (retried: gpt2.errors.is_storage_error)."""
        what = "saved" if job.phase == "write" else "committed"
        mine = None if job.error is None else \
            (*failure_line(job.error, job.tmp), job.error.errno if is_storage_error(job.error) else None)
        lines: list[Any] = [mine]
        if tdist.is_initialized() and self.dist.world_size > 1:
            lines = [None] * self.dist.world_size
            tdist.all_gather_object(lines, mine)
        self.pending = None
        full = [(r, line) for r, line in enumerate(lines) if line is not None and line[0]]
        if full and self.dist.is_main:
            shutil.rmtree(job.tmp, ignore_errors=True)  # nothing partial is kept (gone once committed)
        if mine is not None and mine[0]:
            raise UserError(f"checkpoint {job.final.name} not {what}: {mine[1]}")
        if full:
            raise UserError(f"checkpoint {job.final.name} not {what}: rank {full[0][0]}: {full[0][1]}")
        if job.error is not None:
            raise job.error
        failed = [(r, x) for r, x in enumerate(lines) if x is not None]
        rank, line = next(((r, x) for r, x in failed if x[2] is not None), failed[0])
        if line[2] is not None:  # the file system failed another rank's write: a retry here too
            raise storage_error_on(line[2], rank, str(job.final))
        raise RuntimeError(f"rank {rank} failed to write checkpoint {job.final.name}: {line[1]}")

    def _commit(self, tmp: Path, final: Path, step: int, backend: str, meta: dict[str, Any],
                trainer_state: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
        """Rank 0, once every rank's files are on the disk: manifest, rename, `latest` (any thread)."""
        files = {**files, **_describe(tmp, [r for r in _list_files(tmp) if r not in files], checksums=True)}
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "backend": backend,
            "world_size": self.dist.world_size,
            "time": time.time(),
            "torch_version": torch.__version__,
            **meta,
            "trainer_state": trainer_state,
            "rng": {"files": [rank_file(r) for r in range(self.dist.world_size)],
                    "generators": ["python", "numpy", "torch"]
                    + (["cuda"] if torch.cuda.is_available() and torch.cuda.is_initialized() else [])},
            "files": dict(sorted(files.items())),
        }
        mpath = tmp / MANIFEST
        write_new(mpath, json.dumps(manifest, indent=1, sort_keys=True).encode())  # fsynced; never through a symlink
        fsync(tmp)  # the manifest's directory entry
        self._fence(f"committing {final.name}")
        old = None
        if final.exists():  # a re-save of this step: keep the old copy until the new one has its name
            old = final.with_name(final.name + ".old.tmp")  # put back by quarantine.clean_leftovers if we die here
            remove(old)  # a symlink there would make the rename fail: removed itself, never followed
            final.rename(old)
            fsync(self.root)
        tmp.rename(final)
        fsync(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        with self.lock:
            _write_atomic(self.root / LATEST, final.name + "\n")
        size = sum(f["size"] for f in files.values())
        logger.info(f"checkpoint {final.name} committed ({size / 1e6:.1f} MB, {len(files)} files)")

    def _retain(self, current: int) -> None:
        """Keep the last keep_last steps up to `current` and every keep_every-th; drop the rest.

        Checkpoints newer than `current` belong to an abandoned timeline (the run continued from an
        older one because they failed verification when it started): quarantined, never deleted.
        Each removal is a rename first (gpt2.checkpoint.quarantine), so a crash anywhere keeps `current`."""
        steps = committed_steps(self.root)
        past = [s for s in steps if s <= current]
        keep = set(past[-self.s.keep_last:]) | {current}
        if self.s.keep_every > 0:
            keep |= {s for s in past if s % self.s.keep_every == 0}
        for s in steps:
            if s in keep:
                continue
            path = self.root / step_name(s)
            if s > current:
                why = self._skipped.get(s) or verify(path, checksums=False)
                newer = f"newer than step {current}, which this run continued from (an abandoned timeline)"
                quarantine(self.root, path, f"{why}; {newer}" if why else f"{path.name}: {newer}")
            else:
                drop(path)

    # -- finding -----------------------------------------------------------------------------
    def verify(self, path: Path, checksums: bool | None = None) -> str | None:
        """`verify(path)` with this run's checksum setting unless given."""
        return verify(path, self.s.verify_checksums if checksums is None else checksums)

    def find_latest(self, below: int | None = None) -> Resume | None:
        """Collective: the newest checkpoint that verifies (of a step before `below`, if given),
        chosen by rank 0; None on a first start.

        Raises CheckpointError (on every rank) when checkpoints exist but none verifies, and a
        storage error on rank 0 as an OSError of its errno on every rank (a retry, not bad input)."""
        choice: tuple[str, dict[str, Any]] | str | int | None = None
        failure: BaseException | None = None
        if self.dist.is_main:
            try:
                choice = self._choose(below)
            except Exception as exc:  # tell the other ranks instead of leaving them in the broadcast
                failure = exc
                choice = exc.errno if is_storage_error(exc) else \
                    f"rank 0 could not choose a checkpoint in {self.root}: {exc}"
        choice = distributed.broadcast_object(choice)
        if failure is not None:
            raise failure
        if isinstance(choice, int):
            raise storage_error_on(choice, 0, str(self.root))
        if isinstance(choice, str):
            raise CheckpointError(choice)
        if choice is None:
            return None
        return Resume(path=Path(choice[0]), manifest=choice[1])

    def _choose(self, below: int | None = None) -> tuple[str, dict[str, Any]] | str | None:
        """Rank 0's side of find_latest: (path, manifest), None, or an error message.

        Damaged checkpoints newer than the chosen one are quarantined with their reason (not
        deleted: gpt2.checkpoint.quarantine), so no later start can resume from that abandoned timeline."""
        if not self.root.is_dir():
            return None
        clean_leftovers(self.root)
        path, skipped = newest_valid(self.root, self.s.verify_checksums, below)
        for why in skipped:
            logger.warning(f"skipping damaged checkpoint: {why}")
        if path is None:
            if skipped:
                return (f"every checkpoint in {self.root} is damaged (newest: {skipped[0]}); move them aside to "
                        "start over, or set trainer.config.checkpoint_strategy.config.verify_checksums=false "
                        "if only checksums fail")
            return None
        if skipped:
            logger.warning(f"falling back to {path.name}")
        chosen = parse_step(path.name)
        for why in skipped:
            name = why.split(":", 1)[0]
            step = parse_step(name)
            if step is not None and chosen is not None and step > chosen:
                self._skipped[step] = why
                quarantine(self.root, self.root / name, why)
        return str(path), read_manifest(path)

    def abandon(self, unfit: dict[Path, str]) -> None:
        """Rank 0: quarantine checkpoints that verified but did not load into this run (`path ->
        why`), once an older one did; retention would otherwise quarantine them at the first save."""
        for path, why in unfit.items():
            step = parse_step(path.name)
            if step is not None:
                self._skipped[step] = why
            quarantine(self.root, path, why)

    def restore_rng(self, resume: Resume) -> bool:
        """Restore this rank's RNG states; False when the checkpoint has none for this rank
        (resumed on more ranks than saved it: that rank keeps its seeded state)."""
        f = resume.path / rank_file(self.dist.rank)
        if f.name not in resume.manifest["files"]:  # only what verification looked at is read
            logger.info(f"{resume.path.name} has no RNG state for rank {self.dist.rank}; keeping the seeded one")
            return False
        set_rng_state(safe_load.load(f), where=str(f))  # a state that does not restore: CheckpointError, one line
        return True

    def _fence(self, what: str) -> None:
        """Rank 0, before a save starts and right before its commit: refuse (LeaseLost) if this
        run's lease was taken over (gpt2.checkpoint.lease): a stale writer must not remove the live writer's
        `.tmp` of the same step, move `latest` or prune the live writer's checkpoints."""
        if self.lease is not None:
            self.lease.check(what)


def _gather_dicts(mine: dict[str, Any], dist: DistInfo) -> dict[str, Any]:
    """Rank 0 gets the union of every rank's dict; other ranks get {}."""
    if dist.world_size == 1 or not tdist.is_initialized():
        return mine
    parts: list[Any] | None = [None] * dist.world_size if dist.is_main else None
    tdist.gather_object(mine, parts, dst=0)
    if not dist.is_main:
        return {}
    out: dict[str, Any] = {}
    for p in parts or []:
        out.update(p)
    return out
