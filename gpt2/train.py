"""The training loop, shared by every backend.

It reads like nanoGPT's: schedule, accumulate, step, log, eval, checkpoint. Everything with a
side effect lives elsewhere: the backend (wrap, step, save), the checkpoint manager (commit,
verify, resume), the stop request (signals, budget), the loggers. `run(cfg)` returns an
Outcome: "done", or "preempted" after every rank has saved the same step, so whoever started
us (job.py under submitit, main.py under torchrun) can requeue.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from loguru import logger

from gpt2 import distributed, hang_rules, preflight, watchdog
from gpt2.backends import backend_class, make_backend
from gpt2.checkpoint.interval import AutoInterval, mtbi_from_env
from gpt2.checkpoint.lease import take as take_lease
from gpt2.checkpoint.manager import CheckpointError, CheckpointManager, Resume, check_compatible, parse_step
from gpt2.config import (
    Config,
    TrainerSettings,
    compat_view,
    config_hash,
    fixed_interval,
    save_resolved,
    to_dict,
)
from gpt2.data import TokenLoader
from gpt2.logs import MetricsLogger, peak_flops, peak_memory_mb, restart_count, setup_logging, wandb_run_id
from gpt2.model import GPT, GPT2Config
from gpt2.preemption import StopRequest


def process_start_time() -> float:
    """When this attempt's process began, the zero of its start-up time: GPT2_T0 when whoever
    runs attempts in one process sets it (launch/job.py's debug executor), else the kernel's start
    time of this process (Linux), else now."""
    if os.environ.get("GPT2_T0"):
        return float(os.environ["GPT2_T0"])
    try:  # its start in clock ticks since boot, against the time since boot now (btime is whole seconds)
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def queue_times() -> dict[str, float | str]:
    """When this attempt was queued (GPT2_QUEUED_AT: launch/job.py, from the run's state), whether
    SLURM queued it and when SLURM started it (SLURM_JOB_START_TIME, where SLURM sets it), for the
    goodput ledger's queue wait; those known."""
    out: dict[str, float | str] = {"scheduler": "slurm"} if os.environ.get("SLURM_JOB_ID") else {}
    for key, var in (("queued_at", "GPT2_QUEUED_AT"), ("slurm_start", "SLURM_JOB_START_TIME")):
        try:
            out[key] = float(os.environ.get(var) or "")
        except ValueError:
            pass
    return out


class StartupClock:
    """Start-up of an attempt in named parts (imports, process_group, data, model,
    checkpoint_load, metrics_logger, other): `mark(part)` closes the part that began at the
    previous mark (a part marked twice adds up)."""

    def __init__(self) -> None:
        self.t0 = process_start_time()
        self.parts: dict[str, float] = {}
        self._last = self.t0

    def mark(self, part: str) -> None:
        now = time.time()
        self.parts[part] = round(self.parts.get(part, 0.0) + now - self._last, 3)
        self._last = now

    def total(self) -> float:
        return round(time.time() - self.t0, 3)


@dataclass
class Outcome:
    status: str  # "done" | "preempted"
    step: int
    reason: str | None = None  # "USR2" | "SIGTERM" | "time_budget" when preempted
    final_loss: float | None = None
    save_s: float | None = None  # when preempted: seconds from the stop request to the committed checkpoint


def lr_at(step: int, s: TrainerSettings) -> float:
    """Linear warmup, then cosine decay to min_lr at lr_decay_steps (default max_steps)."""
    decay_steps = s.lr_decay_steps or s.max_steps
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    if step >= decay_steps:
        return s.min_lr
    ratio = (step - s.warmup_steps) / max(1, decay_steps - s.warmup_steps)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (s.lr - s.min_lr)


def build_model(cfg: Config, seed: int) -> GPT:
    """The same seed on every rank gives every rank the same initial weights."""
    torch.manual_seed(seed)
    return GPT(GPT2Config(**dataclasses.asdict(cfg.model.config)))


def seq_len(cfg: Config) -> int:
    """The training window: dataset.seq_len, else the model's block size."""
    return cfg.dataset.seq_len or cfg.model.config.block_size


def make_loaders(cfg: Config, rank: int, world_size: int) -> tuple[TokenLoader, TokenLoader]:
    """This rank's train loader (shuffled) and val loader (in order); DataError when a split is missing,
    damaged or smaller than one global batch."""
    ds, batch, vocab = cfg.dataset, cfg.trainer.config.batch_size, cfg.model.config.vocab_size
    train = TokenLoader(ds.train_dataset.data_root, ds.train_dataset.split, batch, seq_len(cfg), rank=rank,
                        world_size=world_size, seed=cfg.run.seed, vocab_size=vocab, pool_shards=ds.pool_shards)
    val = TokenLoader(ds.val_dataset.data_root, ds.val_dataset.split, batch, seq_len(cfg), rank=rank,
                      world_size=world_size, seed=cfg.run.seed, shuffle=False, vocab_size=vocab)
    return train, val


def _keep_wandb_id(run_dir: Path, wandb_id: str) -> None:
    """Make `run_dir/wandb_id.txt` hold `wandb_id` (the one a resumed checkpoint was logged under)."""
    path = run_dir / "wandb_id.txt"
    if path.is_file() and path.read_text(errors="replace").strip() == wandb_id:
        return
    from gpt2.safe_write import write_atomic

    write_atomic(path, wandb_id + "\n")  # never through a symlink at the temporary name (gpt2.safe_write)


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.trainer.config.checkpoint_strategy.config.checkpoint_dir or Path(cfg.run.dir) / "checkpoints")


def run(cfg: Config) -> Outcome:
    """Train until max_steps or a stop request. Collective: every rank calls it."""
    clock = StartupClock()
    clock.mark("imports")  # interpreter, imports, and whatever ran before us (submitit, job.py)
    backend_class(cfg.trainer.name).preload()  # before the group exists: see Backend.preload
    dist = distributed.init(cfg.run.device)
    lease = take_lease(Path(cfg.run.dir), dist)  # one writer per run directory (gpt2.checkpoint.lease); rank 0's
    # heartbeat + watchdog threads: a hung or lost rank ends every rank within seconds (exit 76)
    wd = watchdog.start(cfg.run.dir, dist.rank, dist.world_size, restart_count(),
                        hang_rules.limits_from(cfg.trainer.config))
    stop = StopRequest(cfg.trainer.config.time_budget_s).install()
    trainer: _Trainer | None = None
    finished = False
    try:
        preflight_s = preflight.run(wd, dist.device) if cfg.trainer.config.preflight else None
        clock.mark("process_group")
        trainer = _Trainer(cfg, dist, stop, wd.progress, clock)
        trainer.ckpt.lease = lease  # a writer whose lease was taken over commits nothing
        if preflight_s is not None:
            logger.info(f"pre-flight check passed in {preflight_s:.2f} s")
        outcome = trainer.train()
        finished = True
        return outcome
    except BaseException as exc:
        if isinstance(exc, Exception):  # the first failure's traceback and host, for the launcher and the peers
            wd.report_exception(exc)
        # the traceback's finished frames (_Trainer.__init__, train) hold the trainer, hence the group
        traceback.clear_frames(exc.__traceback__)
        raise
    finally:
        stop.uninstall()
        if finished:  # every rank is here: none still needs the group (an error path skips the wait)
            wd.progress.phase("collective")
            distributed.barrier()
        wd.stop(done=finished)
        if lease is not None:
            lease.release()
        if trainer is not None:
            trainer.ckpt.close()  # an error path may leave a background write: let it end, commit nothing
            trainer.metrics.close()
            trainer.backend.close()
        backend_class(cfg.trainer.name).teardown()
        # The model wrappers, optimizer and backend hold the process group: drop them first, so that
        # destroy() ends its threads here and none is left running when the interpreter exits.
        trainer = None
        distributed.destroy(synchronize=False)


class _Trainer:
    def __init__(self, cfg: Config, dist: distributed.DistInfo, stop: StopRequest,
                 progress: watchdog.Progress | None = None, clock: StartupClock | None = None):
        self.cfg, self.dist, self.stop = cfg, dist, stop
        self.clock = clock = clock or StartupClock()
        self.progress = progress or watchdog.Progress()  # step and phase, for the watchdog
        self.fault = watchdog.Fault.from_env(dist.rank)  # GPT2_FAULT: drills and tests only
        s = self.s = cfg.trainer.config
        self.run_dir = Path(cfg.run.dir)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        distributed.barrier()
        setup_logging(self.run_dir, dist.rank)
        clock.mark("other")

        self.seq_len = seq_len(cfg)
        self.train_data, self.val_data = make_loaders(cfg, dist.rank, dist.world_size)
        clock.mark("data")

        model = build_model(cfg, cfg.run.seed)
        self.flops_per_token = model.flops_per_token(self.seq_len)
        self.n_params = model.num_params()
        torch.manual_seed(cfg.run.seed + dist.rank)  # dropout differs per rank, as it should
        self.backend = make_backend(cfg.trainer.name, s, dist)
        self.backend.setup(model)
        clock.mark("model")

        self.ckpt = CheckpointManager(checkpoint_dir(cfg), s.checkpoint_strategy.config, dist)
        self.step, self.tokens = 0, 0
        resume = self.resume(cfg)
        if dist.is_main and resume is not None and resume.manifest.get("wandb_id"):
            # the manifest's id wins: it is the W&B run these weights were trained in
            _keep_wandb_id(self.run_dir, resume.manifest["wandb_id"])
        self.wandb_id = wandb_run_id(self.run_dir) if dist.is_main else None
        if resume is not None:
            logger.info(f"resumed from {resume.path} at step {self.step} ({self.tokens:,} tokens)")
        else:
            logger.info(f"starting fresh: no checkpoint in {self.ckpt.root}")
        self.resumed_step = self.step
        clock.mark("checkpoint_load")
        if dist.is_main:
            save_resolved(cfg, self.run_dir / "config.yaml")  # a full disk leaves no temporary file
        restart = int(os.environ.get("GPT2_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or 0)
        clock.mark("other")
        self.metrics = MetricsLogger(cfg, self.run_dir, dist.rank, self.wandb_id, restart, resumed_step=self.step)
        clock.mark("metrics_logger")  # W&B's start, mostly
        self.tokens_per_step = s.batch_size * self.seq_len * s.grad_accumulation_steps * dist.world_size
        logger.info(
            f"{cfg.model.name}: {self.n_params / 1e6:.2f}M params, trainer={cfg.trainer.name}, "
            f"world {dist.world_size}, {self.tokens_per_step:,} tokens/step, device {dist.device}"
        )

    def resume(self, cfg: Config) -> Resume | None:
        """Load the newest checkpoint that verifies and loads into this run; None for a fresh start.

        One whose files pass their checks but do not load (tensors that do not fit the model, an
        RNG state that does not restore: a crafted or mis-written file) falls back to the one
        before, and once an older one loads the unfit ones are quarantined. When none loads, the
        newest one's error stops the run and nothing is moved: a change that no checkpoint fits
        must never start the run over."""
        unfit: dict[Path, str] = {}
        first: CheckpointError | None = None
        below: int | None = None
        while True:
            try:
                resume = self.ckpt.find_latest(below)
            except CheckpointError:  # the older ones are damaged too: the newest one's error is the news
                if first is None:
                    raise
                resume = None
            if resume is None:
                if first is not None:
                    raise first
                return None
            check_compatible(resume.manifest, cfg.trainer.name, compat_view(cfg), self.dist.world_size, resume.path)
            error: CheckpointError | None = None
            try:
                self.backend.load(resume.path)
                st = resume.trainer_state
                self.step, self.tokens = st["step"], st["tokens"]
                self.train_data.load_state_dict(st["data"])
                self.ckpt.restore_rng(resume)
            except CheckpointError as exc:
                error = exc
            if distributed.all_reduce([float(error is not None)], "max", self.dist.device)[0] == 0:
                break  # every rank loaded it
            why = str(error).replace(f"{resume.path}/", "") if error else "it did not load on another rank"
            why = f"{resume.path.name}: {why.split('; move its checkpoint aside')[0]}"
            first = first or error or CheckpointError(why)
            unfit[resume.path] = why
            logger.warning(f"{why}; trying the checkpoint before it")
            below = parse_step(resume.path.name)  # its directory's step: never the same one again
        if unfit and self.dist.is_main:
            self.ckpt.abandon(unfit)
        return resume

    # ---- one step -------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        s = self.s
        loss_sum = torch.zeros((), device=self.dist.device)
        for micro in range(s.grad_accumulation_steps):
            self.progress.phase("data")
            x, y = self.train_data.next_batch()
            self.progress.phase("forward")  # forward and backward: one backend call
            loss_sum += self.backend.forward_backward(x, y, last_micro=micro == s.grad_accumulation_steps - 1)
        self.progress.phase("optimizer")
        grad_norm = self.backend.optimizer_step(lr_at(self.step, s))
        self.progress.phase("collective")
        local = loss_sum.item() / s.grad_accumulation_steps
        loss = distributed.all_reduce([local])[0] / self.dist.world_size
        return loss, grad_norm

    def evaluate(self) -> float | None:
        """Mean val loss over eval_steps batches; None when a stop request cut it short."""
        self.val_data.reset()
        total = 0.0
        for _ in range(self.s.eval_steps):
            self.progress.phase("eval")
            x, y = self.val_data.next_batch()
            loss = self.backend.eval_loss(x, y).item()
            # one collective per batch: the loss, and whether any rank was asked to stop
            loss_sum, stop = distributed.all_reduce([loss, float(self.stop.local_code())])
            if stop > 0:
                return None
            total += loss_sum / self.dist.world_size
        return total / self.s.eval_steps

    def save(self, final: bool = False) -> None:
        """Checkpoint this step; training waits only for the host copy (the write and the commit
        finish in the background, see `CheckpointManager.save`). `final` (a stop, the end): block
        until committed, and only wait for the save in flight when it is of this very step."""
        self.progress.phase("save")
        if final and self.saved_step == self.step:
            self.ckpt.wait()
            return
        meta = {"config": compat_view(self.cfg), "config_hash": config_hash(self.cfg),
                "resolved_config": to_dict(self.cfg), "wandb_id": self.wandb_id,
                "n_params": self.n_params}
        state = {"step": self.step, "tokens": self.tokens, "data": self.train_data.state_dict()}
        background = self.s.checkpoint_strategy.config.async_save and not final
        self.ckpt.save(self.step, self.backend, meta=meta, trainer_state=state, background=background)
        self.saved_step = self.step

    def _timed_save(self, final: bool = False) -> None:
        """save(final), timing how long it blocked the loop: the goodput ledger's save bucket and C
        of the Young/Daly interval."""
        t0 = time.perf_counter()
        self.save(final=final)
        blocked = time.perf_counter() - t0
        self.pending["save_blocked_s"] += blocked
        if self.auto is not None:
            self.auto.observe_save(blocked)

    def _auto_interval(self) -> AutoInterval | None:
        """The interval picker under `interval: auto`, else None (a fixed interval)."""
        ck = self.s.checkpoint_strategy.config
        if fixed_interval(ck) is not None:
            return None
        mtbi_s, source = mtbi_from_env()
        return AutoInterval(ck.max_interval, mtbi_s, source, self.ckpt.expected_save_s(self.backend.state_bytes))

    def _save_due(self, interval: int | None) -> bool:
        if self.step >= self.s.max_steps:
            return False
        if interval is not None:
            return interval > 0 and self.step % interval == 0
        assert self.auto is not None
        if self.auto.revise_due(self.step, self.resumed_step):
            # every rank timed its own steps and saves: agree on the inputs, so all save at the same steps
            self.progress.phase("collective")
            step_s, save_s, mtbi_s = distributed.all_reduce(self.auto.inputs(), op="max")
            line = self.auto.revise(step_s, save_s, mtbi_s)
            if line is not None:
                logger.info(f"{line} (from step {self.step})")
        return self.auto.due(self.step, self.saved_step)

    def _flush(self, *keys: str) -> dict[str, float]:
        """The pending times of `keys` for a metrics row, reset to zero."""
        out = {k: round(self.pending[k], 4) for k in keys}
        for k in keys:
            self.pending[k] = 0.0
        return out

    def _end(self, status: str, reason: str | None = None) -> None:
        """The attempt's end row: what no step row carried yet (the last saves, an eval cut short)."""
        self.metrics.event({"event": "end", "status": status, "reason": reason,
                            "last_step": self.step, **self._flush("train_s", "save_blocked_s", "eval_s")})

    # ---- the loop --------------------------------------------------------------------------
    def train(self) -> Outcome:
        s, ck = self.s, self.s.checkpoint_strategy.config
        self.saved_step = self.step if self.step > 0 else -1
        loss: float | None = None
        peak = peak_flops(self.dist.device) * self.dist.world_size
        interval = fixed_interval(ck)
        self.auto = self._auto_interval()
        # seconds since the last row that carried them: a row's train_s, save_blocked_s, eval_s sum to
        # the attempt's time in steps, saves and evals (launch/goodput.py)
        self.pending = {"train_s": 0.0, "save_blocked_s": 0.0, "eval_s": 0.0}
        self.clock.mark("other")
        self.metrics.event({"event": "start", "resumed_step": self.resumed_step, "startup_s": self.clock.total(),
                            "startup": self.clock.parts, "world_size": self.dist.world_size, **queue_times()})
        while self.step < s.max_steps:
            t0 = time.perf_counter()
            self.progress.start_step(self.step + 1)
            if self.fault is not None:
                self.fault.fire(self.step + 1)
            lr = lr_at(self.step, s)
            loss, grad_norm = self.train_step()
            self.progress.end_step()
            self.step += 1
            self.tokens += self.tokens_per_step
            dt = time.perf_counter() - t0
            self.pending["train_s"] += dt
            if self.auto is not None:
                self.auto.observe_step(dt)
            tps = self.tokens_per_step / dt
            if self.step % s.log_interval == 0 or self.step == s.max_steps:
                row = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                       "mfu": self.flops_per_token * tps / peak, "step_time": dt, "tokens": self.tokens,
                       "peak_mem_mb": peak_memory_mb(self.dist.device), **self._flush("train_s", "save_blocked_s")}
                self.metrics.log(row)
                logger.info(f"step {self.step}/{s.max_steps} loss {loss:.4f} lr {lr:.2e} "
                            f"norm {grad_norm:.3f} {tps:,.0f} tok/s {dt * 1000:.0f} ms "
                            f"peak mem {row['peak_mem_mb']:,.0f} MB")  # every rank: its own log file
            if s.eval_interval > 0 and (self.step % s.eval_interval == 0 or self.step == s.max_steps):
                t_eval = time.perf_counter()
                val = self.evaluate()
                self.pending["eval_s"] += time.perf_counter() - t_eval
                if val is not None:
                    self.metrics.log({"step": self.step, "val_loss": val, "tokens": self.tokens,
                                      **self._flush("eval_s")})
                    logger.info(f"step {self.step} val loss {val:.4f}")
            self.stop.margin_s = 1.5 * dt + 1.5 * self.ckpt.expected_save_s(self.backend.state_bytes)
            if self._save_due(interval):
                self._timed_save()
            self.progress.phase("collective")
            self.ckpt.poll()  # the save in flight: written everywhere? then commit (raises if one failed)
            code = self.stop.agree()  # after an interval save: a request during it needs no second save
            if code and self.step < s.max_steps:  # a request during the last step: finish instead
                reason = self.stop.reason(code)
                self._timed_save(final=True)  # after the save in flight; none again when that one is of this step
                save_s = round(self.stop.seconds_since_request() or 0.0, 3)
                logger.warning(f"stopping at step {self.step} ({reason}): checkpoint committed "
                               f"{save_s:.2f} s after the request, requeue me")
                self._end("preempted", reason)
                return Outcome("preempted", self.step, reason, loss, save_s)
        if ck.save_on_finish:
            self._timed_save(final=True)
        else:
            self.ckpt.wait()  # the save in flight, if any
        logger.info(f"done at step {self.step}, final loss {loss}")
        self._end("done")
        return Outcome("done", self.step, None, loss)
