"""One value per step after a crash and a resume: metrics.jsonl, W&B (offline) and TensorBoard.

Real processes (2 gloo ranks on CPU, main.py, tests/test_failures.py's `attempt`): a run with a
checkpoint every 3 steps and an eval every 2 is SIGKILLed in rank 0 (the rank that logs, its W&B
session with it) at the start of step 6, after the commit of step 3; the requeued attempt resumes
from step 3 and trains 4 and 5 again. Then every record holds each step 1..6 exactly once, with
an uninterrupted run's losses, and metrics.jsonl says what was thrown away.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from gpt2.wandb_history import history, offline_sessions
from tests.test_failures import attempt, tail
from tests.test_resume import TINY

STEPS = 6
pytestmark = pytest.mark.slow


def args(data: Path, run: Path, *extra: str) -> list[str]:
    tiny = [a for a in TINY if not a.startswith(("trainer.config.max_steps", "trainer.config.checkpoint_strategy",
                                                 "trainer.config.eval_interval"))]
    return ["model=tiny", "trainer=ddp", *tiny, f"trainer.config.max_steps={STEPS}",
            "trainer.config.checkpoint_strategy.config.interval=3", "trainer.config.eval_interval=2",
            "trainer.config.eval_steps=1", f"dataset.train_dataset.data_root={data}",
            f"dataset.val_dataset.data_root={data}", f"run.dir={run}", "trainer.config.heartbeat_timeout_s=3",
            "trainer.config.hang_timeout_s=10", *extra]


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def per_step(rs: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rs if r.get(key) is not None and "step" in r]


def tensorboard(run: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def as_f32(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    """TensorBoard keeps float32."""
    return [(s, float(np.float32(v))) for s, v in points]


def test_crash_and_resume_leave_one_value_per_step(pydoc_shards: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    codes, _ = attempt(args(pydoc_shards, base, "wandb.mode=disabled"), tmp_path / "out_base", 0)
    assert codes == [0, 0], tail(tmp_path / "out_base")
    want = rows(base)
    want_loss, want_val = per_step(want, "loss"), per_step(want, "val_loss")
    assert [s for s, _ in want_loss] == list(range(1, STEPS + 1)) and [s for s, _ in want_val] == [2, 4, 6]

    run = tmp_path / "run"
    argv = args(pydoc_shards, run, "wandb.mode=offline", "logging.tensorboard=true")
    codes, _ = attempt(argv, tmp_path / "out0", 0, "kill@6:0")
    assert codes[0] == -signal.SIGKILL and codes[1] != 0, tail(tmp_path / "out0")
    assert [s for s, _ in per_step(rows(run), "loss")] == [1, 2, 3, 4, 5]  # 4 and 5 after the commit of 3
    codes, _ = attempt(argv, tmp_path / "out1", 1)
    assert codes == [0, 0], tail(tmp_path / "out1")
    resumed = re.findall(r"resumed from \S+ at step (\d+) ", (run / "logs" / "rank0.log").read_text())
    assert resumed == ["3"], resumed

    # metrics.jsonl: one row per step, the uninterrupted run's values; steps 4-5 of attempt 0 summarized
    got = rows(run)
    assert per_step(got, "loss") == want_loss and per_step(got, "val_loss") == want_val
    events = [r for r in got if "event" in r]
    assert len(events) == 1 and {k: events[0][k] for k in ("event", "restart", "steps")} == {
        "event": "discarded", "restart": 0, "steps": [4, 5]}
    assert set(events[0]) == {"event", "restart", "steps", "train_s", "time"} and events[0]["train_s"] > 0
    assert [r["restart"] for r in got if "loss" in r] == [0, 0, 0, 1, 1, 1]

    # W&B: the sessions in order never repeat a step nor go back, and hold every step once
    wid = (run / "wandb_id.txt").read_text().strip()
    sessions = offline_sessions(run, wid)
    assert len(sessions) == 2, sessions
    logged = [r for s in sessions for r in history(s)]
    assert [r["step"] for r in logged] == list(range(1, STEPS + 1))
    assert all(r["_step"] == r["step"] for r in logged)  # W&B's own step is ours
    assert per_step(logged, "loss") == want_loss and per_step(logged, "val_loss") == want_val

    # TensorBoard: two sessions' event files; the second purged steps 4-5 of the first
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 2
    assert tensorboard(run, "loss") == as_f32(want_loss)
    assert tensorboard(run, "val_loss") == as_f32(want_val)
