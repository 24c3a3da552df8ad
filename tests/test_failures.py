"""Impolite failures with real processes: 2 gloo ranks on CPU training the tiny model (main.py).

One run directory goes through four failures in a row, each from the fault knob GPT2_FAULT
(gpt2/watchdog.py: Fault), each attempt resuming from the last committed checkpoint (a
checkpoint every 2 steps), then a last attempt finishes; its per-step losses must equal an
uninterrupted run's:
  restart 0: rank 1 SIGSTOPs itself at step 3  -> rank 0 calls it lost (heartbeat 3 s), kills it, exits 76
  restart 1: rank 0 SIGKILLs itself at step 5  -> rank 1 gone within seconds, its report blames rank 0
  restart 2: rank 1 raises at step 7           -> a report with the traceback; rank 0 gone within seconds
  restart 3: rank 0 hangs (alive) at step 9    -> it calls it a hang (hang_timeout_s=4), blames itself, exits 76
The process-group timeout is 120 s here (600 s in production): every failure must end well before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2.watchdog import first_failure, read_failures
from tests.test_resume import TINY, _env, _free_port, losses

ROOT = Path(__file__).resolve().parent.parent
STEPS = 10
EXIT_FAILURE = 76
pytestmark = pytest.mark.slow


def args(data: Path, run: Path) -> list[str]:
    tiny = [a for a in TINY if not a.startswith(("trainer.config.max_steps", "trainer.config.checkpoint_strategy"))]
    return ["model=tiny", "trainer=ddp", *tiny, f"trainer.config.max_steps={STEPS}",
            "trainer.config.checkpoint_strategy.config.interval=2", f"dataset.train_dataset.data_root={data}",
            f"dataset.val_dataset.data_root={data}", f"run.dir={run}", "wandb.mode=disabled",
            "trainer.config.heartbeat_timeout_s=3", "trainer.config.hang_timeout_s=4",
            # each failure lands in the step right after a save: an asynchronous save commits only at
            # the end of that step, so it would be lost and the resume step would move back one save
            # (that case is tests/test_async_save.py's); synchronous saves keep the resume points fixed
            "trainer.config.checkpoint_strategy.config.async_save=false"]


def attempt(argv: list[str], logdir: Path, restart: int, fault: str = "",
            timeout: float = 180) -> tuple[list[int], list[float]]:
    """Start 2 ranks of main.py; wait until both ended; their exit codes and exit times (time.time())."""
    logdir.mkdir(parents=True, exist_ok=True)
    port, procs = _free_port(), []
    for r in range(2):
        env = _env(r, 2, port, {"GPT2_RESTART_COUNT": str(restart), "GPT2_FAULT": fault})
        with open(logdir / f"out{r}.txt", "ab") as out:
            procs.append(subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, env=env,
                                          stdout=out, stderr=subprocess.STDOUT))
    ended: list[float | None] = [None, None]
    deadline = time.monotonic() + timeout
    while None in ended:
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.time()
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
                p.wait()
            pytest.fail(f"ranks still running after {timeout} s (codes {[p.poll() for p in procs]})\n{tail(logdir)}")
        time.sleep(0.05)
    return [p.returncode for p in procs], [t for t in ended if t is not None]


def tail(logdir: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:] for p in sorted(logdir.glob("out*.txt")))


def reports(run: Path, restart: int) -> dict[int, dict]:
    return {r["rank"]: r for r in read_failures(run, restart)}


def test_four_impolite_failures_then_resume_matches_an_uninterrupted_run(pydoc_shards: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    codes, _ = attempt(args(pydoc_shards, base), tmp_path / "out_base", 0)
    assert codes == [0, 0], tail(tmp_path / "out_base")
    assert not (base / "failures").exists()
    assert {json.loads((base / "progress" / f"rank{r}.json").read_text())["phase"] for r in (0, 1)} == {"done"}

    run = tmp_path / "run"
    argv = args(pydoc_shards, run)

    # restart 0: rank 1 stopped (SIGSTOP) at step 3: rank 0 finds its heartbeat stale and kills it
    out = tmp_path / "out0"
    codes, ended = attempt(argv, out, 0, "stop@3:1")
    assert codes == [EXIT_FAILURE, -signal.SIGKILL], tail(out)
    rep = reports(run, 0)
    assert set(rep) == {0}, rep  # the stopped rank wrote nothing: it could not
    assert (rep[0]["kind"], rep[0]["blamed_rank"], rep[0]["blamed_host"]) == ("peer_lost", 1, os.uname().nodename)
    last_beat = json.loads((run / "progress" / "rank1.json").read_text())["beat"]
    assert ended[0] - last_beat < 3 + 5, f"rank 0 left {ended[0] - last_beat:.1f} s after rank 1's last heartbeat"
    assert "stacks of every thread of rank 0 follow" in (run / "logs" / "rank0.log").read_text()

    # restart 1: rank 0 killed (SIGKILL) at step 5: rank 1 leaves within seconds, blaming rank 0
    out = tmp_path / "out1"
    codes, ended = attempt(argv, out, 1, "kill@5:0")
    assert codes[0] == -signal.SIGKILL and codes[1] == EXIT_FAILURE, tail(out)  # peer_lost or comm_error: 76
    assert ended[1] - ended[0] < 10, f"rank 1 left {ended[1] - ended[0]:.1f} s after rank 0 was killed"
    rep = reports(run, 1)
    assert set(rep) == {1} and rep[1]["kind"] in ("peer_lost", "comm_error") and rep[1]["blamed_rank"] == 0, rep

    # restart 2: rank 1 raises at step 7: the report has the traceback; rank 0 leaves within seconds
    out = tmp_path / "out2"
    codes, ended = attempt(argv, out, 2, "raise@7:1")
    assert codes == [EXIT_FAILURE, 1], tail(out)  # rank 1: a bug (its traceback, 1); rank 0: 76
    assert ended[0] - ended[1] < 10, f"rank 0 left {ended[0] - ended[1]:.1f} s after rank 1"
    cause = first_failure(run, 2)
    assert cause is not None and (cause["rank"], cause["kind"], cause["exc_type"]) == (1, "exception", "RuntimeError")
    assert (cause["step"], cause["blamed_rank"], cause["host"]) == (7, 1, os.uname().nodename)
    assert "injected fault at step 7" in cause["traceback"] and "fire" in cause["traceback"]
    consequence = reports(run, 2)[0]  # rank 0's: it saw the report, or gloo's closed connection
    assert consequence["blamed_rank"] == 1 and consequence["time"] >= cause["time"], consequence

    # restart 3: rank 0 hangs in its data phase at step 9, threads alive: both call it a hang
    out = tmp_path / "out3"
    codes, ended = attempt(argv, out, 3, "hang@9:0")
    # rank 0 ends itself (76). Rank 1, racing: calls it a hang too, or sees rank 0's report first
    # (peer_lost), both 76; or rank 0 left first and its collective fails on the closed connection
    # (comm_error: main.py exits 76 as well). Every way, rank 0 is blamed.
    assert codes == [EXIT_FAILURE, EXIT_FAILURE], tail(out)
    assert abs(ended[1] - ended[0]) < 10
    cause = first_failure(run, 3)
    assert cause is not None and (cause["kind"], cause["blamed_rank"], cause["step"]) == ("hang", 0, 9), cause
    rep = reports(run, 3)
    assert rep[0]["kind"] == "hang" and rep[0]["phase"] == "data" and 4 <= rep[0]["detected_after_s"] < 10
    assert rep[1]["kind"] in ("hang", "peer_lost", "comm_error") and rep[1]["blamed_rank"] == 0, rep[1]
    log0 = (run / "logs" / "rank0.log").read_text()
    assert "this rank made no progress" in log0 and "in fire" in log0  # its own stack: stuck in the fault

    # restart 4: resume from step 8 and finish: the same losses as without any failure
    out = tmp_path / "out4"
    codes, _ = attempt(argv, out, 4)
    assert codes == [0, 0], tail(out)
    text = (run / "logs" / "rank0.log").read_text()
    for step in (2, 4, 6, 8):
        assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'} at step {step} (" in text
    want = losses(base)
    assert sorted(want) == list(range(1, STEPS + 1))
    assert losses(run) == want
