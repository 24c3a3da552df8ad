"""The watchdog's rules with a fake clock and fake progress records (no sleeping, no processes).

The real thing (2 gloo ranks, SIGSTOP, SIGKILL, an exception, a hang) is tests/test_failures.py."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from gpt2 import preflight
from gpt2 import watchdog as wdm
from gpt2.hang_rules import (
    COMPILE_S,
    DONE,
    EVAL_S,
    FIRST_STEP_S,
    HANG_FLOOR_S,
    SAVE_S,
    Limits,
    Observer,
    allowance,
    limits_from,
    parse_hang_timeout,
    slowest,
)
from gpt2.watchdog import Fault, Progress, first_failure, read_failures

A = "attempt-1"


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def rec(rank: int, step: int | None, phase: str, t: float, beat: float, host: str = "n1",
        attempt: str = A, pid: int | None = None) -> dict[str, Any]:
    return {"rank": rank, "host": host, "pid": pid or 100 + rank, "restart": 0, "attempt": attempt,
            "step": step, "phase": phase, "time": t, "beat": beat}


def observer(rank: int = 0, world: int = 2, limits: Limits | None = None, start: float = 1000.0) -> Observer:
    return Observer(rank, world, "n1", A, limits or Limits(hang_s=None, heartbeat_s=10.0), start)


ALIVE = lambda pid: True  # noqa: E731


# ---- the allowance ---------------------------------------------------------------------------------
def test_auto_allowance_is_a_multiple_of_the_median_step_with_a_floor() -> None:
    auto = Limits()
    assert allowance(auto, "forward", 10, 1, 0.1) == HANG_FLOOR_S  # tiny model: the floor
    assert allowance(auto, "forward", 10, 1, 20.0) == 60.0  # 3 x a 20 s step
    # the first step of the process, and startup, get the first-step allowance; compile more
    assert allowance(auto, "data", 1, 1, None) == FIRST_STEP_S
    assert allowance(auto, "startup", None, None, None) == FIRST_STEP_S
    assert allowance(auto, "forward", 41, 41, 0.1) == FIRST_STEP_S  # the first step after a resume
    assert allowance(Limits(compile=True), "forward", 42, 41, 0.1) == COMPILE_S
    assert allowance(Limits(compile=True), "forward", 43, 41, 0.1) == HANG_FLOOR_S
    assert allowance(auto, "save", 10, 1, 0.1) == SAVE_S
    assert allowance(auto, "eval", 10, 1, 0.1) == EVAL_S
    assert allowance(auto, "save", 10, 1, 200.0) == 600.0  # never below the steady allowance


def test_explicit_and_disabled_hang_timeouts() -> None:
    assert parse_hang_timeout("auto") is None
    assert parse_hang_timeout("off") == parse_hang_timeout("0") == 0.0
    assert parse_hang_timeout(" 4.5 ") == 4.5
    with pytest.raises(ValueError):
        parse_hang_timeout("-1")
    assert allowance(Limits(hang_s=4.0), "forward", 10, 1, 0.1) == 4.0
    assert allowance(Limits(hang_s=4.0), "save", 10, 1, 0.1) == SAVE_S
    assert allowance(Limits(hang_s=0.0), "forward", 10, 1, 0.1) is None


def test_progress_marks_and_median_leave_out_the_first_step() -> None:
    clock = Clock(0.0)
    p = Progress(clock)
    assert (p.step, p.phase_name, p.median_step_s()) == (None, "startup", None)
    for step, dt in ((5, 30.0), (6, 1.0), (7, 3.0), (8, 2.0)):
        p.start_step(step)
        assert p.phase_name == "data" and p.time == clock.t
        clock.t += dt / 2
        p.phase("forward")
        assert (p.phase_name, p.time) == ("forward", clock.t)
        clock.t += dt / 2
        p.end_step()
    assert p.first_step == 5 and p.first_step_s == 30.0
    assert p.median_step_s() == 2.0


# ---- blame -----------------------------------------------------------------------------------------
def test_the_lagging_rank_is_blamed_not_the_waiting_ones() -> None:
    waiting = rec(0, 7, "collective", 50.0, 60.0)
    assert slowest({0: waiting, 1: rec(1, 6, "collective", 40.0, 60.0)}) == 1  # lower step
    assert slowest({0: waiting, 1: rec(1, 7, "data", 55.0, 60.0)}) == 1  # same step, earlier phase
    assert slowest({0: waiting, 1: rec(1, 7, "collective", 45.0, 60.0)}) == 1  # same phase, older progress
    assert slowest({0: waiting, 1: rec(1, None, "startup", 45.0, 60.0)}) == 1  # not started
    assert slowest({0: waiting, 1: rec(1, 1, DONE, 45.0, 60.0)}) == 0  # a rank that is done is nobody's laggard
    # same step and phase, rank 0 entered first (it waits), rank 1's heartbeat stopped: rank 1 is frozen
    assert slowest({0: waiting, 1: rec(1, 7, "collective", 52.0, 53.0)}) == 0
    assert slowest({0: waiting, 1: rec(1, 7, "collective", 52.0, 53.0)}, {1}) == 1


# ---- the rules over time ---------------------------------------------------------------------------
def test_a_hang_is_declared_after_the_allowance_and_blames_the_laggard() -> None:
    ob = observer(rank=0, limits=Limits(hang_s=None, heartbeat_s=10.0))
    stuck = rec(1, 7, "data", 1000.0, 1000.0)
    t = 1000.0
    while t < 1000.0 + HANG_FLOOR_S:  # peer 1 keeps beating but is stuck in "data"
        mine = rec(0, 7, "collective", 1000.5, t)
        assert ob.check(t, mine, {1: {**stuck, "beat": t}}, [], ALIVE, 3, 0.2) is None, t
        t += 1.0
    v = ob.check(t + 0.5, rec(0, 7, "collective", 1000.5, t), {1: {**stuck, "beat": t}}, [], ALIVE, 3, 0.2)
    assert v is not None and (v.kind, v.blamed_rank, v.blamed_host) == ("hang", 1, "n1")
    assert v.detected_after_s == pytest.approx(HANG_FLOOR_S + 0.5)
    assert v.kill_pid == 101 and v.kill_grace_s > 0  # on this host: killed if it does not leave itself


def test_the_stuck_rank_blames_itself() -> None:
    ob = observer(rank=1, limits=Limits(hang_s=5.0, heartbeat_s=10.0))
    peer = rec(0, 7, "collective", 1000.0, 1000.0)
    mine = rec(1, 7, "data", 1000.0, 1000.0, pid=101)
    assert ob.check(1004.0, mine, {0: {**peer, "beat": 1004.0}}, [], ALIVE, 3, 0.2) is None
    v = ob.check(1005.5, mine, {0: {**peer, "beat": 1005.5}}, [], ALIVE, 3, 0.2)
    assert v is not None and (v.kind, v.blamed_rank, v.kill_pid) == ("hang", 1, None)
    assert "this rank made no progress" in v.message


def test_progress_resets_the_hang_clock() -> None:
    ob = observer(limits=Limits(hang_s=5.0, heartbeat_s=0.0))
    for i in range(20):  # a slow rank that keeps moving is not hung
        t = 1000.0 + 4.0 * i
        assert ob.check(t, rec(0, 7, "collective", 1000.0, t), {1: rec(1, 7, "data", t, t)}, [], ALIVE, 3, 0.2) is None


def test_a_silent_peer_is_lost_after_the_heartbeat_timeout() -> None:
    ob = observer(limits=Limits(hang_s=None, heartbeat_s=3.0))
    frozen = rec(1, 7, "forward", 1000.0, 1000.0, host="n2")  # SIGSTOPped on another node
    for t in (1000.0, 1001.0, 1002.0, 1003.0):
        assert ob.check(t, rec(0, 7, "collective", 1000.0, t), {1: frozen}, [], ALIVE, 3, 0.2) is None
    v = ob.check(1003.5, rec(0, 7, "collective", 1000.0, 1003.5), {1: frozen}, [], ALIVE, 3, 0.2)
    assert v is not None and (v.kind, v.blamed_rank, v.blamed_host, v.kill_pid) == ("peer_lost", 1, "n2", None)
    assert v.detected_after_s == pytest.approx(3.5)


def test_heartbeat_staleness_is_measured_on_this_ranks_clock() -> None:
    """A peer whose clock is 100 s behind is not lost as long as its beat keeps changing."""
    ob = observer(limits=Limits(hang_s=None, heartbeat_s=3.0))
    for i in range(10):
        t = 1000.0 + i
        assert ob.check(t, rec(0, 7, "data", t, t), {1: rec(1, 7, "data", t - 100, t - 100)}, [], ALIVE, 3, 0.2) is None


def test_a_gone_process_on_this_host_is_lost_at_once_and_a_stopped_one_is_killed() -> None:
    ob = observer(limits=Limits(hang_s=None, heartbeat_s=10.0))
    peer = rec(1, 7, "forward", 1000.0, 1000.0, pid=4242)
    v = ob.check(1000.5, rec(0, 7, "collective", 1000.0, 1000.5), {1: peer}, [], lambda pid: pid != 4242, 3, 0.2)
    assert v is not None and (v.kind, v.blamed_rank, v.kill_pid) == ("peer_lost", 1, None)
    # same host name, another PID namespace (another container): its pid means nothing here
    other_ns = {**peer, "pidns": "pid:[4026532999]"}
    ob = observer(limits=Limits(hang_s=None, heartbeat_s=10.0))
    assert ob.check(1000.5, rec(0, 7, "collective", 1000.0, 1000.5), {1: other_ns}, [], lambda pid: False, 3,
                    0.2) is None
    # alive but silent (SIGSTOP): lost after the heartbeat timeout, and killed without a grace period
    ob = observer(limits=Limits(hang_s=None, heartbeat_s=10.0))
    assert ob.check(1000.0, rec(0, 7, "collective", 1000.0, 1000.0), {1: peer}, [], ALIVE, 3, 0.2) is None
    v = ob.check(1011.0, rec(0, 7, "collective", 1000.0, 1011.0), {1: peer}, [], ALIVE, 3, 0.2)
    assert v is not None and (v.kind, v.kill_pid, v.kill_grace_s) == ("peer_lost", 4242, 0.0)


def test_heartbeat_rule_off_leaves_a_frozen_peer_to_the_hang_rule() -> None:
    ob = observer(limits=Limits(hang_s=None, heartbeat_s=0.0))
    frozen = rec(1, 7, "forward", 1000.0, 1000.0)
    assert ob.check(1020.0, rec(0, 7, "collective", 1000.2, 1020.0), {1: frozen}, [], ALIVE, 3, 0.2) is None
    v = ob.check(1000.0 + HANG_FLOOR_S + 1, rec(0, 7, "collective", 1000.2, 1026.0), {1: frozen}, [], ALIVE, 3, 0.2)
    assert v is not None and (v.kind, v.blamed_rank) == ("hang", 1)


def test_a_peer_report_ends_this_rank_at_once_blaming_the_cause() -> None:
    ob = observer(rank=0, world=3)
    peers = {1: rec(1, 7, "data", 1000.0, 1000.0), 2: rec(2, 7, "data", 1000.0, 1000.0)}
    old = {"kind": "exception", "rank": 2, "attempt": "earlier-run", "time": 10.0, "blamed_rank": 2}
    assert ob.check(1000.0, rec(0, 7, "data", 1000.0, 1000.0), peers, [old], ALIVE, 3, 0.2) is None  # other attempt
    cause = {"kind": "exception", "rank": 1, "host": "n7", "attempt": A, "time": 999.0, "blamed_rank": 1,
             "blamed_host": "n7", "message": "RuntimeError: boom"}
    consequence = {"kind": "peer_lost", "rank": 2, "host": "n1", "attempt": A, "time": 999.5, "blamed_rank": 1,
                   "blamed_host": "n7", "message": "rank 1 reported exception"}
    v = ob.check(1000.5, rec(0, 7, "data", 1000.0, 1000.5), peers, [consequence, cause], ALIVE, 3, 0.2)
    assert v is not None and (v.kind, v.blamed_rank, v.blamed_host) == ("peer_lost", 1, "n7")
    assert "rank 1 reported exception" in v.message and v.detected_after_s == 1.5


def test_with_the_heartbeat_rule_off_a_frozen_peer_is_blamed_though_it_entered_the_phase_last() -> None:
    ob = observer(rank=0, limits=Limits(hang_s=5.0, heartbeat_s=0.0))
    frozen = rec(1, 7, "forward", 1000.5, 1000.6)  # SIGSTOPped after entering forward, after rank 0 did
    for t in (1000.0, 1002.0, 1004.0):
        assert ob.check(t, rec(0, 7, "forward", 1000.2, t), {1: frozen}, [], ALIVE, 3, 0.2) is None
    v = ob.check(1005.5, rec(0, 7, "forward", 1000.2, 1005.5), {1: frozen}, [], ALIVE, 3, 0.2)
    assert v is not None and (v.kind, v.blamed_rank, v.kill_pid) == ("hang", 1, 101)


def test_a_rank_a_peer_reports_hung_reports_its_own_hang() -> None:
    ob = observer(rank=0, limits=Limits(hang_s=4.0, heartbeat_s=3.0))
    mine = rec(0, 9, "data", 1000.0, 1000.0)
    assert ob.check(1000.0, mine, {1: rec(1, 9, "forward", 1000.1, 1000.0)}, [], ALIVE, 7, 0.2) is None
    theirs = {"kind": "hang", "rank": 1, "host": "n1", "attempt": A, "time": 1004.2, "blamed_rank": 0,
              "blamed_host": "n1", "message": "rank 0 on n1 made no progress for 4.1 s"}
    v = ob.check(1004.5, {**mine, "beat": 1004.5}, {1: rec(1, 9, "forward", 1000.1, 1004.5)}, [theirs], ALIVE, 7, 0.2)
    assert v is not None and (v.kind, v.blamed_rank, v.detected_after_s) == ("hang", 0, 4.5)
    assert v.message.startswith("this rank made no progress for 4.5 s in step 9 phase data (rank 1 reported")


def test_records_of_an_earlier_attempt_count_as_none_and_done_ranks_are_ignored() -> None:
    ob = observer(limits=Limits(hang_s=None, heartbeat_s=3.0))
    stale = rec(1, 9, "forward", 10.0, 10.0, attempt="earlier-run")  # a dead rank of the previous run
    assert ob.check(1001.0, rec(0, None, "startup", 1000.0, 1001.0), {1: stale}, [], ALIVE, None, None) is None
    fresh = rec(1, None, "startup", 1001.5, 1001.5)
    assert ob.check(1002.0, rec(0, None, "startup", 1000.0, 1002.0), {1: fresh}, [], ALIVE, None, None) is None
    # a peer that never writes a record of this attempt is lost after the heartbeat timeout
    ob2 = observer(limits=Limits(hang_s=None, heartbeat_s=3.0))
    v = ob2.check(1003.5, rec(0, None, "startup", 1000.0, 1003.5), {1: stale}, [], ALIVE, None, None)
    assert v is not None and v.kind == "peer_lost" and v.blamed_rank == 1
    # a peer that finished is neither lost nor a laggard, however old its record
    done = rec(1, 10, DONE, 1000.0, 1000.0)
    assert ob.check(2000.0, rec(0, 10, "save", 1999.0, 2000.0), {1: done}, [], lambda pid: False, 3, 0.2) is None


# ---- reports, files, the exception path --------------------------------------------------------------
def make_watchdog(tmp_path: Path, clock: Clock, rank: int = 0, world: int = 2, **kw: Any) -> wdm.Watchdog:
    return wdm.Watchdog(tmp_path, rank, world, 3, A, Limits(hang_s=5.0, heartbeat_s=3.0), clock=clock, **kw)


def test_exception_reports_and_their_order(tmp_path: Path) -> None:
    clock = Clock()
    w0 = make_watchdog(tmp_path, clock, rank=0)
    w0.progress.start_step(7)
    w0.progress.phase("forward")
    try:
        raise ValueError("bad value\nsecond line")
    except ValueError as exc:
        rep = w0.report_exception(exc)
    assert rep is not None and w0.report_exception(RuntimeError("later")) is None  # the first report wins
    on_disk = json.loads((tmp_path / "failures" / "restart3-rank0.json").read_text())
    assert on_disk == rep
    assert set(on_disk) == {"kind", "rank", "host", "restart", "attempt", "time", "step", "phase", "blamed_rank",
                            "blamed_host", "exc_type", "message", "traceback", "detected_after_s"}
    assert (on_disk["kind"], on_disk["step"], on_disk["phase"], on_disk["exc_type"]) == ("exception", 7, "forward",
                                                                                         "ValueError")
    assert on_disk["blamed_rank"] == 0 and on_disk["message"] == "ValueError: bad value second line"
    assert "raise ValueError" in on_disk["traceback"]
    # rank 1's gloo error is a consequence: comm_error, blaming the rank whose report came first
    w1 = make_watchdog(tmp_path, clock, rank=1)
    rep1 = w1.report_exception(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert rep1 is not None and (rep1["kind"], rep1["blamed_rank"]) == ("comm_error", 0)
    (tmp_path / "failures" / "restart3-rank9.json").write_text("{not json")  # damaged: skipped
    (tmp_path / "failures" / "restart2-rank0.json").write_text(json.dumps({**rep, "restart": 2}))
    assert [r["rank"] for r in read_failures(tmp_path, 3)] == [0, 1]
    assert len(read_failures(tmp_path)) == 3
    first = first_failure(tmp_path, 3)
    assert first is not None and first["kind"] == "exception"
    assert first_failure(tmp_path, 5) is None


def test_comm_error_blames_a_gone_process_on_this_host(tmp_path: Path) -> None:
    clock = Clock()
    peer = make_watchdog(tmp_path, clock, rank=1)
    peer.beat()  # rank 1's record: this host, its pid
    w0 = make_watchdog(tmp_path, clock, rank=0, alive=lambda pid: pid != peer.pid)
    rep = w0.report_exception(RuntimeError("Connection reset by peer"))
    assert rep is not None and (rep["kind"], rep["blamed_rank"], rep["blamed_host"]) == ("comm_error", 1, peer.host)
    assert wdm.is_comm_error(RuntimeError("NCCL error: unhandled system error"))
    assert not wdm.is_comm_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.parametrize(("exc", "kind"), [
    (OSError(errno.EIO, "Input/output error", "/ckpt/step_00000002/model.pt"), "storage_error"),
    (OSError(errno.ESTALE, "Stale file handle"), "storage_error"),
    (TimeoutError(errno.ETIMEDOUT, "Connection timed out"), "storage_error"),
    (PermissionError(errno.EACCES, "Permission denied"), "exception"),  # the user's to fix, not a retry
    (OSError("no errno"), "exception"),
])
def test_a_storage_error_is_reported_as_one(exc: OSError, kind: str, tmp_path: Path) -> None:
    rep = make_watchdog(tmp_path, Clock(), rank=1).report_exception(exc)
    assert rep is not None and (rep["kind"], rep["blamed_rank"]) == (kind, 1)


def test_heartbeat_record_format_and_the_check_through_the_files(tmp_path: Path) -> None:
    clock = Clock()
    w1 = make_watchdog(tmp_path, clock, rank=1)
    w1.progress.start_step(4)
    w1.beat()
    got = json.loads((tmp_path / "progress" / "rank1.json").read_text())
    assert set(got) == {"rank", "host", "pid", "pidns", "restart", "attempt", "step", "phase", "time", "beat"}
    assert (got["rank"], got["restart"], got["step"], got["phase"], got["beat"]) == (1, 3, 4, "data", clock.t)
    w0 = make_watchdog(tmp_path, clock, rank=0, alive=ALIVE)
    w0.progress.start_step(4)
    w0.progress.phase("collective")
    assert w0.check() is None
    clock.t += 3.5  # rank 1 stops beating: lost
    v = w0.check()
    assert v is not None and (v.kind, v.blamed_rank) == ("peer_lost", 1)
    w1.stop(done=True)  # a rank that finished writes "done": no longer anybody's concern
    assert json.loads((tmp_path / "progress" / "rank1.json").read_text())["phase"] == DONE
    clock.t += 100  # rank 0 alone in its first step: within the first-step allowance
    assert w0.check() is None


def test_fault_knob() -> None:
    assert Fault.from_env(1, {"GPT2_FAULT": "raise@7:1"}) == Fault("raise", 7)
    assert Fault.from_env(0, {"GPT2_FAULT": "raise@7:1"}) is None
    assert Fault.from_env(0, {}) is None
    for bad in ("raise@x:1", "boom@3:0", "raise7:1"):
        with pytest.raises(ValueError, match="GPT2_FAULT"):
            Fault.from_env(0, {"GPT2_FAULT": bad})
    Fault("raise", 7).fire(6)  # another step: nothing
    with pytest.raises(RuntimeError, match="injected fault at step 7"):
        Fault("raise", 7).fire(7)
    assert signal.SIGSTOP  # the stop and kill kinds are exercised by test_failures.py


def test_fault_knob_once_on_one_attempt() -> None:
    """`/<restart>`: only the attempt of that restart count faults; its requeued attempt runs on."""
    env = {"GPT2_FAULT": "raise@40:1/0"}
    assert Fault.from_env(1, env) == Fault("raise", 40, 0)  # no restart count yet: attempt 0
    assert Fault.from_env(1, {**env, "GPT2_RESTART_COUNT": "0"}) == Fault("raise", 40, 0)
    assert Fault.from_env(1, {**env, "GPT2_RESTART_COUNT": "1"}) is None
    assert Fault.from_env(1, {"GPT2_FAULT": "kill@5:1/2", "SLURM_RESTART_COUNT": "2"}) == Fault("kill", 5, 2)
    assert Fault.from_env(0, {**env, "GPT2_RESTART_COUNT": "0"}) is None  # another rank
    assert Fault.from_env(1, {"GPT2_FAULT": "raise@40:1"}) == Fault("raise", 40)  # every attempt
    with pytest.raises(ValueError, match="GPT2_FAULT"):
        Fault.from_env(1, {"GPT2_FAULT": "raise@40:1/x"})


def test_preflight_catches_a_wrong_all_reduce_and_passes_a_right_one() -> None:
    import torch

    cpu = torch.device("cpu")
    assert preflight.problem(cpu, 1) is None  # world size 1: the real all-reduce is the identity
    assert preflight.problem(cpu, 2, all_reduce=lambda v: [2 * x for x in v]) is None
    bad = preflight.problem(cpu, 2, all_reduce=lambda v: [2 * x + 1e-3 for x in v])
    assert bad is not None and "all-reduce" in bad

    def broken(v: list[float]) -> list[float]:
        raise RuntimeError("Connection refused")

    assert preflight.problem(cpu, 2, all_reduce=broken) == "RuntimeError: Connection refused"


def test_fatal_hook_code_and_failure(tmp_path: Path) -> None:
    rep = {"kind": "hang"}
    lines: list[str] = []

    def log(line: str, console: bool = False) -> None:
        lines.append(line)
    try:
        wdm.on_fatal(None)
        assert wdm.call_hook(rep, log) == wdm.EXIT_FAILURE == 76
        wdm.on_fatal(lambda r: 124 if r["kind"] == "hang" else None)
        assert wdm.call_hook(rep, log) == 124
        wdm.on_fatal(lambda r: None)
        assert wdm.call_hook(rep, log) == 76

        def broken(r: dict[str, Any]) -> int:
            raise OSError("state.json: read-only file system")

        wdm.on_fatal(broken)
        assert wdm.call_hook(rep, log) == 76 and "read-only" in lines[-1]
    finally:
        wdm.on_fatal(None)


# ---- pre-flight and the watchdog for real (one process) ----------------------------------------------
@pytest.mark.slow
def test_a_failed_preflight_reports_and_exits_76(tmp_path: Path) -> None:
    """A device that cannot compute (the meta device: no data to copy back) fails the check."""
    code = ("import torch; from gpt2 import preflight, watchdog as w; "
            f"wd = w.Watchdog({str(tmp_path)!r}, 0, 1, 2, 'a', w.Limits()).start(); "
            "preflight.run(wd, torch.device('meta')); print('not reached')")
    root = Path(__file__).resolve().parent.parent
    res = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert res.returncode == 76 and "not reached" not in res.stdout, res.stderr[-2000:]
    assert "pre-flight check failed" in res.stderr
    rep = first_failure(tmp_path, 2)
    assert rep is not None and (rep["kind"], rep["blamed_rank"], rep["restart"]) == ("preflight", 0, 2)
    assert "meta" in rep["message"]


def test_preflight_passes_in_a_real_run_and_the_watchdog_ends_done(pydoc_shards: Path, tmp_path: Path) -> None:
    import main as entry

    argv = ["model=tiny", "run.device=cpu", "wandb.mode=disabled", f"run.dir={tmp_path}",
            f"dataset.train_dataset.data_root={pydoc_shards}", f"dataset.val_dataset.data_root={pydoc_shards}",
            "model.config.n_layer=1", "model.config.n_embd=32", "model.config.n_head=2", "dataset.seq_len=16",
            "trainer.config.batch_size=1", "trainer.config.max_steps=2", "trainer.config.eval_interval=0",
            "trainer.config.preflight=true", "trainer.config.checkpoint_strategy.config.save_on_finish=false"]
    threads = {t.name for t in threading.enumerate()}
    assert entry.main(argv) == 0
    assert "pre-flight check passed" in (tmp_path / "logs" / "rank0.log").read_text()
    rec = json.loads((tmp_path / "progress" / "rank0.json").read_text())
    assert (rec["phase"], rec["step"]) == (DONE, 2)
    assert {t.name for t in threading.enumerate()} == threads  # both threads joined
    assert not (tmp_path / "failures").exists()


def test_config_keys_are_checked_and_free_to_change_on_resume() -> None:
    from gpt2.compose import load_config
    from gpt2.config import ConfigError, compat_view

    cfg = load_config(["trainer.config.hang_timeout_s=4", "trainer.config.heartbeat_timeout_s=3"])
    assert limits_from(cfg.trainer.config) == Limits(hang_s=4.0, heartbeat_s=3.0, compile=False)
    assert limits_from(load_config([]).trainer.config) == Limits(hang_s=None, heartbeat_s=10.0)
    assert limits_from(load_config(["trainer.config.hang_timeout_s=off"]).trainer.config).hang_s == 0.0
    for bad, key in (("trainer.config.hang_timeout_s=soon", "hang_timeout_s"),
                     ("trainer.config.hang_timeout_s=-3", "hang_timeout_s"),
                     ("trainer.config.heartbeat_timeout_s=-1", "heartbeat_timeout_s")):
        with pytest.raises(ConfigError, match=key):
            load_config([bad])
    # a resumed run may change them (they are not part of what a checkpoint must match)
    assert compat_view(cfg) == compat_view(load_config(["trainer.config.preflight=true"]))
