"""What a run tells the world: loguru lines, metrics.jsonl, Weights & Biases, MFU.

- Lines (loguru): rank 0 logs to the console; every rank appends to `<run.dir>/logs/rank<N>.log`;
  each line carries the job id, array index and restart count.
- Metrics: rank 0 appends one JSON object per logged step to `<run.dir>/metrics.jsonl` and mirrors
  it to W&B (and TensorBoard with `logging.tensorboard=true`). Train rows carry `TRAIN_KEYS`, eval
  rows `val_loss`; every row has `step`, `restart` and `time` (unix seconds).
- One value per step, however often the run restarts: an attempt that resumed from step N (0: a
  fresh start) first drops the rows of steps after N from metrics.jsonl, which an interruption
  threw away and this attempt trains again, leaving one `{"event": "discarded", ...}` row per
  restart that wrote them (gpt2/metrics_file.py); TensorBoard hides the events of those steps
  (`purge_step`); W&B gets only the steps it does not hold yet (gpt2/wandb_history.py) and the
  steps up to N it lost (a killed session's unflushed tail) from metrics.jsonl. A replayed step
  gives bitwise the same losses here, so the values W&B kept are the ones the replay computed
  again (only its timings differ: W&B keeps the first session's).
- W&B: online when an API key is available, offline otherwise, off with `wandb.mode=disabled`;
  files under `<run.dir>/wandb/`. The run id is created once and kept in `<run.dir>/wandb_id.txt`
  (and in each checkpoint's manifest), so every restart continues one W&B run; W&B's own step is
  our step. Offline sessions land in `offline-run-<time>-<id>/` directories; `wandb sync
  <run.dir>/wandb/offline-run-*` uploads them in start-time order into that one run. W&B starts
  in a background thread (importing wandb and starting its service take seconds, every attempt):
  the rows logged meanwhile wait in memory and go to W&B, in order, once it has started;
  metrics.jsonl gets every row at once.
- TensorBoard: event files in `<run.dir>/tensorboard/`, one per session, a scalar per metric.
- Secrets: names with a word such as KEY, TOKEN, SECRET, PASS(WORD), PAT, AUTH or CREDENTIAL mark
  secrets (`is_secret_name`). `scrub()` redacts them in config and environment dumps before they
  are logged or sent to W&B, and every log line has the values of such environment variables
  replaced by `***`. Config values that came from `${oc.env:...}` are never resolved in what is
  written (gpt2/config.py keeps the interpolation text).
"""

from __future__ import annotations

import json
import netrc
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from loguru import logger

from gpt2.config import Config, to_dict
from gpt2.metrics_file import Rewrite, discard_replayed
from gpt2.safe_write import open_append, write_atomic
from gpt2.wandb_history import last_offline_step

# The keys of a train row of metrics.jsonl (train.py writes them; plot.py and tests read them).
TRAIN_KEYS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "step_time", "tokens",
              "peak_mem_mb", "restart")
EVAL_KEYS = ("step", "val_loss", "restart")

# Peak dense bf16 FLOP/s for MFU, matched by substring of the device name (first match wins, so
# longer names come first). CPU figure: a nominal 2.5 GHz x 32 fp32 FLOP/cycle per core (AVX2
# FMA); set GPT2_PEAK_FLOPS to your hardware's number for exact MFU.
_GPU_PEAK = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "A100": 312e12,
             "L40S": 362e12, "A10": 125e12, "V100": 125e12}
_GPU_PEAK_DEFAULT = 312e12

REDACTED = "***"
# A name marks a secret when one of its words is a marker (WANDB_API_KEY, GITHUB_PAT, authToken), or
# it contains one of the long markers anywhere (AWSSECRETACCESSKEY). "TIKTOKEN" and "TOKENIZER" are no
# secrets, nor is PATH (the word is PATH, not PAT).
_SECRET_WORDS = {"KEY", "KEYS", "APIKEY", "TOKEN", "SECRET", "SECRETS", "PASS", "PASSWD", "PASSWORD",
                 "PASSPHRASE", "PAT", "AUTH", "AUTHORIZATION", "CREDENTIAL", "CREDENTIALS", "COOKIE", "PRIVATE",
                 "SIGNATURE", "BEARER", "SESSION"}
_SECRET_MARKERS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "APIKEY", "ACCESSKEY", "AUTHTOKEN")
_MIN_SECRET_LEN = 4  # values of 1-3 characters ("1", "no") are not redacted inside free text


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one device, the MFU denominator (GPT2_PEAK_FLOPS overrides it)."""
    if os.environ.get("GPT2_PEAK_FLOPS"):
        return float(os.environ["GPT2_PEAK_FLOPS"])
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in _GPU_PEAK.items():
            if key in name:
                return val
        return _GPU_PEAK_DEFAULT
    return (os.cpu_count() or 1) * 2.5e9 * 32


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank: allocated CUDA memory on GPU, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---- secrets ---------------------------------------------------------------------------------


def is_secret_name(name: str) -> bool:
    """Whether a config key or env var name marks a secret (see `_SECRET_WORDS`), case-insensitive."""
    words = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).upper()
    if set(re.split(r"[^A-Z0-9]+", words)) & _SECRET_WORDS:
        return True
    return any(marker in re.sub(r"[^A-Z0-9]", "", words) for marker in _SECRET_MARKERS)


def scrub(obj: Any) -> Any:
    """A copy of a config or env dump with every string value under a secret name replaced by
    `***`, at any depth of dicts and lists. Numbers are kept (`tokens_per_s` is no secret)."""
    if isinstance(obj, Mapping):
        return {k: (REDACTED if is_secret_name(str(k)) and isinstance(v, str | bytes) and v else scrub(v))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(scrub(v) for v in obj)
    return obj


def secret_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables, redacted inside free text whatever they look
    like (paths and numbers too), from 4 characters up. Longest first, so overlapping values redact whole."""
    env = os.environ if env is None else env
    vals = {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    """`text` with every occurrence of each secret replaced by `***`."""
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    return text


# ---- lines -----------------------------------------------------------------------------------


def restart_count() -> int:
    """How many times this job was requeued: GPT2_RESTART_COUNT (set by the job entry), else
    SLURM_RESTART_COUNT, else 0."""
    raw = os.environ.get("GPT2_RESTART_COUNT") or os.environ.get("SLURM_RESTART_COUNT") or "0"
    try:
        return int(raw)
    except ValueError:
        return 0


def job_tags() -> dict[str, str]:
    """The tags of every log line: job id (array master id for an array), array index, restart."""
    return {
        "job": os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
        or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or "local",
        "task": os.environ.get("SLURM_ARRAY_TASK_ID", "-"),
        "restart": str(restart_count()),
    }


LINE_FORMAT = ("{time:YYYY-MM-DD HH:mm:ss} | {level: <7} | job {extra[job]}[{extra[task]}] "
               "r{extra[restart]} rank{extra[rank]} | {message}")


def setup_logging(run_dir: Path, rank: int) -> None:
    """Console for rank 0, an appended file `run_dir/logs/rank<rank>.log` per rank; every line
    tagged with job, array task and restart, and secret env values redacted.

    Replaces all loguru sinks of this process (call it once per run, on every rank). The console
    level is GPT2_LOG_LEVEL (default INFO); the files get DEBUG."""
    secrets = secret_values()

    def _patch(record: Any) -> None:
        record["message"] = redact(record["message"], secrets)

    logger.remove()
    logger.configure(extra={**job_tags(), "rank": rank}, patcher=_patch)
    if rank == 0:
        logger.add(sys.stderr, format=LINE_FORMAT, level=os.environ.get("GPT2_LOG_LEVEL", "INFO"))
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    # opened here, not by loguru: never through a symlink planted there, never a FIFO
    logger.add(open_append(run_dir / "logs" / f"rank{rank}.log"), format=LINE_FORMAT, level="DEBUG", enqueue=False)


# ---- W&B -------------------------------------------------------------------------------------


def wandb_run_id(run_dir: Path) -> str:
    """The run's W&B id, created once and kept in `run_dir/wandb_id.txt` (atomic write)."""
    path = run_dir / "wandb_id.txt"
    if path.is_file():
        return path.read_text().strip()
    rid = uuid.uuid4().hex[:12]
    write_atomic(path, rid + "\n")
    return rid


def has_wandb_key(env: Mapping[str, str] | None = None) -> bool:
    """Whether W&B can authenticate: WANDB_API_KEY is set, or the netrc file ($NETRC or
    ~/.netrc) has an entry for the W&B host (WANDB_BASE_URL, default api.wandb.ai)."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    path = Path(env.get("NETRC") or Path.home() / ".netrc")
    try:
        return path.is_file() and netrc.netrc(str(path)).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(configured: str, env: Mapping[str, str] | None = None) -> str:
    """The W&B mode to run in: "online", "offline" or "disabled".

    `wandb.mode=disabled` always wins; WANDB_MODE=offline|dryrun|disabled in the environment can
    only make it more local; "auto" and "online" go online only with a key (has_wandb_key) and
    are offline without one (the caller warns when "online" was asked for)."""
    env = os.environ if env is None else env
    if configured == "disabled":
        return "disabled"
    forced = env.get("WANDB_MODE", "")
    if forced == "disabled":
        return "disabled"
    if forced in ("offline", "dryrun") or configured == "offline":
        return "offline"
    return "online" if has_wandb_key(env) else "offline"


class MetricsLogger:
    """Rank 0 appends rows to metrics.jsonl, W&B and TensorBoard; other ranks do nothing.

    `restart` is stamped on every row. `resumed_step`: the step this attempt starts from (the
    checkpoint's, 0 for a fresh start); the rows of later steps are dropped first and TensorBoard
    and W&B are told, so every step keeps one value (module docstring). None keeps every row
    (a caller that does not know). W&B failing to start (no network, bad key) never stops
    training: online falls back to offline, and offline failing disables W&B, with a warning."""

    def __init__(self, cfg: Config, run_dir: Path, rank: int, wandb_id: str | None, restart: int = 0,
                 resumed_step: int | None = None):
        self.enabled = rank == 0
        self.restart = restart
        self.path = run_dir / "metrics.jsonl"
        self._wandb: Any = None
        self._wandb_through = 0  # the highest step W&B already holds: later rows only
        self._starting: threading.Thread | None = None  # W&B's start, in the background
        self._started: tuple[Any, int] = (None, 0)  # what it gave: the run and the steps it holds
        self._pending: list[dict[str, Any]] = []  # rows logged while W&B starts
        self._tb: Any = None
        if not self.enabled:
            return
        kept = self._discard_replayed(resumed_step) if resumed_step is not None else None
        mode = resolve_wandb_mode(cfg.wandb.mode)
        if cfg.wandb.mode == "online" and mode == "offline" and os.environ.get("WANDB_MODE") is None:
            logger.warning("wandb.mode=online but no W&B API key is set: logging offline")
        if mode != "disabled":
            self._starting = threading.Thread(target=self._start_in_background, args=(cfg, run_dir, wandb_id, mode, kept),
                                              name="wandb-start", daemon=True)
            self._starting.start()
        else:
            logger.info("W&B disabled")
        if cfg.logging.tensorboard:
            self._tb = self._start_tensorboard(run_dir, resumed_step)

    def _start_in_background(self, cfg: Config, run_dir: Path, wandb_id: str | None, mode: str,
                             kept: Rewrite | None) -> None:
        """The W&B start thread: start the run, learn which steps it holds, log the kept rows it
        lacks. The main thread touches W&B only after this ends (wandb_run)."""
        run, through = None, 0
        try:
            run = self._start_wandb(cfg, run_dir, wandb_id, mode)
            if run is not None:
                through = self._wandb_holds(run, run_dir)
                through = self._wandb_catch_up(run, through, kept)
        except Exception as exc:  # a mirror: training goes on without it
            logger.warning(f"W&B start failed ({type(exc).__name__}: {exc}); metrics.jsonl still has every row")
        self._started = (run, through)

    def wandb_run(self, wait: bool = True) -> Any:
        """The W&B run (None: off or failed to start). wait=False never blocks: None while W&B is
        still starting. When the start has ended, the rows logged meanwhile go to W&B first."""
        if self._starting is not None and (wait or not self._starting.is_alive()):
            self._starting.join()
            self._starting = None
            self._wandb, self._wandb_through = self._started
            pending, self._pending = self._pending, []
            for row in pending:
                self._log_to_wandb(row)
        return self._wandb

    def _discard_replayed(self, resumed_step: int) -> Rewrite:
        """Drop the rows after `resumed_step` (gpt2/metrics_file.py); what was kept."""
        done = discard_replayed(self.path, resumed_step)
        for d in done.discarded:
            logger.info(f"metrics.jsonl: steps {d['steps'][0]}-{d['steps'][1]} of restart {d['restart']} "
                        f"discarded ({d['train_s']:.1f} s of training), trained again from step {resumed_step}")
        if done.unreadable:
            logger.warning(f"metrics.jsonl: dropped {done.unreadable} unreadable line(s) (a killed writer's)")
        return done

    @staticmethod
    def _start_wandb(cfg: Config, run_dir: Path, wandb_id: str | None, mode: str) -> Any:
        import wandb

        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                run = wandb.init(
                    project=cfg.wandb.project or cfg.run.sweep or "gpt2",
                    group=cfg.wandb.group or cfg.run.sweep,
                    name=cfg.wandb.name or cfg.run.job or Path(cfg.run.dir).name,
                    entity=cfg.wandb.entity,
                    id=wandb_id,
                    resume="allow",
                    dir=str(run_dir),
                    mode=attempt,  # type: ignore[arg-type]
                    config=scrub(to_dict(cfg)),
                    settings=wandb.Settings(silent=True, console="off"),
                )
            except Exception as exc:  # W&B is a mirror: training goes on without it
                logger.warning(f"W&B {attempt} failed to start ({type(exc).__name__}: {exc})")
                continue
            # W&B's step is our step (log(step=...)); "step" is also a metric, the charts' x axis
            run.define_metric("step")
            run.define_metric("*", step_metric="step")
            logger.info(f"W&B {attempt}: run {run.id} in {run_dir / 'wandb'}")
            return run
        logger.warning("W&B off for this session: metrics.jsonl still has every row")
        return None

    @staticmethod
    def _wandb_holds(run: Any, run_dir: Path) -> int:
        """The highest step W&B holds of this run: the online run's own count, and what the
        offline sessions of this run id wrote (gpt2/wandb_history.py)."""
        try:
            online = 0 if run.offline else run.step - 1
            offline = last_offline_step(run_dir, run.id, exclude=Path(run.sync_dir))
        except Exception as exc:  # a mirror: log everything rather than fail
            logger.warning(f"W&B: could not tell which steps the run holds ({type(exc).__name__}: {exc})")
            return 0
        return max(online, offline, 0)

    @staticmethod
    def _wandb_catch_up(run: Any, through: int, kept: Rewrite | None) -> int:
        """Log the kept rows W&B lacks (steps a killed session had not flushed), step order; the
        highest step W&B holds after that."""
        if kept is None:
            return through
        missing = sorted(kept.rows_after(through), key=lambda r: r["step"])
        for row in missing:
            _wandb_log(run, row)
        if missing:
            logger.info(f"W&B: {len(missing)} row(s) of metrics.jsonl it lacked logged again "
                        f"(steps {missing[0]['step']}-{missing[-1]['step']})")
            through = max(through, int(missing[-1]["step"]))
        return through

    def _log_to_wandb(self, row: dict[str, Any]) -> None:
        """A row to W&B unless it holds the step already; kept for later while W&B starts."""
        if self._starting is not None:
            self._pending.append(row)
        elif self._wandb is not None and row["step"] > self._wandb_through:
            _wandb_log(self._wandb, row)

    @staticmethod
    def _start_tensorboard(run_dir: Path, resumed_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard hides the events of earlier sessions from this step on
        purge = None if resumed_step is None else resumed_step + 1
        return SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, metrics: dict[str, Any]) -> None:
        """Append `metrics` (must have "step") with "restart" and "time" added; rank 0 only."""
        if not self.enabled:
            return
        row = {**metrics, "restart": self.restart, "time": round(time.time(), 3)}
        with open_append(self.path) as f:  # never through a symlink planted there
            f.write(json.dumps(row) + "\n")
        self.wandb_run(wait=False)  # W&B's start may have ended: the rows it missed go first
        self._log_to_wandb(row)
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "restart", "time") and isinstance(v, int | float) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, global_step=int(row["step"]))
            self._tb.flush()  # on disk before the next step: a SIGKILL loses nothing logged

    def event(self, row: dict[str, Any]) -> None:
        """Append a row without "step" (an attempt's start or end: launch/goodput.py reads them)
        with "restart" and "time" added; rank 0 only, never mirrored to W&B (no step to plot at)."""
        if not self.enabled:
            return
        out = {**row, "restart": self.restart, "time": round(time.time(), 3)}
        with open_append(self.path) as f:  # never through a symlink planted there
            f.write(json.dumps(out) + "\n")

    def close(self) -> None:
        """Finish the W&B run and close the TensorBoard writer (safe to call twice)."""
        if self.wandb_run() is not None:
            import wandb

            self._wandb.finish()
            # finish() may return before wandb-core has written the session's transaction log; the
            # next session of this process reads that file (_wandb_holds): teardown waits for it
            wandb.teardown()
            self._wandb = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _wandb_log(run: Any, row: dict[str, Any]) -> None:
    run.log({k: v for k, v in row.items() if v is not None and k != "time"}, step=int(row["step"]))
