"""launch/drill_plan.py, the drill's pure half: recorded records in, decisions and the report out.

No cluster, no subprocess, no torch: each test runs in well under a second."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from gpt2.errors import UserError
from launch import drill_plan as dp
from launch import record
from launch.slurm import parse_kv

# ---- planning --------------------------------------------------------------------------------


def test_plan_is_seeded_aligned_and_spaced() -> None:
    plans = {seed: dp.plan_interruptions(3, seed, max_steps=200, ckpt_interval=25, eval_interval=40, min_gap=10)
             for seed in range(20)}
    assert plans[3] == dp.plan_interruptions(3, 3, max_steps=200, ckpt_interval=25, eval_interval=40, min_gap=10)
    assert len({tuple(i.target for i in p) for p in plans.values()}) > 10  # the seed moves them
    for plan in plans.values():
        targets = [i.target for i in plan]
        assert targets == sorted(targets) and all(b - a >= 10 for a, b in zip(targets, targets[1:]))
        assert sorted(i.aim for i in plan) == ["checkpoint", "eval", "train"]
        for i in plan:
            assert 10 <= i.target < 200  # never the last step: a request there finishes the run instead
            if i.aim == "checkpoint":
                assert i.target % 25 == 0
            elif i.aim == "eval":
                assert i.target % 40 == 0
            else:  # a plain step: not next to a save or an eval
                assert i.target % 25 not in (0, 1) and i.target % 40 not in (0, 39)
        assert [i.index for i in plan] == [1, 2, 3]
        kinds = {i.aim: i.kind for i in plan}  # the quick signal for the short write, preemption for eval
        assert (kinds["checkpoint"], kinds["eval"]) == ("usr2", "preempt")
    kinds = [i.kind for i in dp.plan_interruptions(6, 0, max_steps=300, ckpt_interval=0, eval_interval=0)]
    assert all(a != b for a, b in zip(kinds, kinds[1:]))  # otherwise they alternate


def test_plan_without_saves_or_evals_or_preemption() -> None:
    plan = dp.plan_interruptions(2, 0, max_steps=100, ckpt_interval=0, eval_interval=0, kinds=("usr2",))
    assert [(i.kind, i.aim) for i in plan] == [("usr2", "train"), ("usr2", "train")]
    # one checkpoint step only: the first aim takes it, the rest are plain steps
    plan = dp.plan_interruptions(3, 1, max_steps=60, ckpt_interval=30, eval_interval=0, min_gap=5)
    assert sorted(i.aim for i in plan) == ["checkpoint", "train", "train"]
    assert next(i.target for i in plan if i.aim == "checkpoint") == 30


@pytest.mark.parametrize("kwargs", [
    {"k": 5, "max_steps": 30, "min_gap": 10},  # no room
    {"k": 0},
    {"k": 1, "kinds": ("sigkill",)},
])
def test_plan_refuses_what_cannot_be_done(kwargs: dict[str, Any]) -> None:
    args = {"seed": 0, "max_steps": 200, "ckpt_interval": 20, "eval_interval": 0, **kwargs}
    with pytest.raises(UserError):
        dp.plan_interruptions(**args)


def test_plan_of_failures() -> None:
    """Failures aim at plain steps (no save or eval to land in), take the kinds in turn, one raise."""
    plan = dp.plan_interruptions(4, 0, max_steps=60, ckpt_interval=20, eval_interval=25,
                                 kinds=("stop", "kill", "raise", "node"))
    assert sorted(i.kind for i in plan) == ["kill", "node", "raise", "stop"]
    assert all(i.aim == "train" for i in plan)
    plan = dp.plan_interruptions(5, 1, max_steps=200, ckpt_interval=20, eval_interval=0,
                                 kinds=("raise", "kill"))
    assert [i.kind for i in plan].count("raise") == 1 and [i.kind for i in plan].count("kill") == 4
    mixed = dp.plan_interruptions(3, 2, max_steps=200, ckpt_interval=25, eval_interval=40,
                                  kinds=("usr2", "kill", "node"))
    assert {i.aim: i.kind for i in mixed if i.aim != "train"} == {"checkpoint": "usr2", "eval": "usr2"}
    with pytest.raises(UserError, match="one `raise` per drill"):
        dp.plan_interruptions(2, 0, max_steps=100, ckpt_interval=0, eval_interval=0, kinds=("raise",))


def test_fault_env_aims_at_the_attempt_the_raise_falls_in() -> None:
    plan = dp.plan_interruptions(3, 0, max_steps=100, ckpt_interval=20, eval_interval=0,
                                 kinds=("stop", "raise", "node"))
    assert dp.fault_env(plan) is not None
    raise_it = next(i for i in plan if i.kind == "raise")
    raise_it.rank = 1
    assert dp.fault_env(plan) == f"raise@{raise_it.target}:1/{raise_it.index - 1}"
    assert dp.fault_env([dp.Interruption(1, "kill", "train", 30)]) is None


def test_signal_pid_only_for_a_training_process_of_this_machine() -> None:
    rec = {"rank": 1, "host": "box", "pid": 4242, "pidns": "pid:[1]", "restart": 2, "step": 31, "phase": "forward"}
    assert dp.signal_pid(rec, {"box", "n1"}, 2, "pid:[1]") == (4242, "")
    pid, why = dp.signal_pid({**rec, "host": "gpu7"}, {"box", "n1"}, 2, "pid:[1]")
    assert pid is None and "gpu7, not on this machine" in why
    assert dp.signal_pid(rec, {"box"}, 2, "pid:[9]")[0] is None  # another container
    assert dp.signal_pid(rec, {"box"}, 3, "pid:[1]")[0] is None  # an older attempt's record
    assert dp.signal_pid({**rec, "phase": "done"}, {"box"}, 2, "pid:[1]")[0] is None
    assert dp.signal_pid(None, {"box"}, 2, None)[0] is None


# ---- reading the records --------------------------------------------------------------------

# metrics.jsonl of a run stopped at step 20 (USR2 during the save of step 20) and at step 50
# (during the eval of step 50), as gpt2/logs.py writes it with every step logged; a torn last line.
ROWS_TEXT = "".join(
    [f'{{"step": {s}, "loss": {11 - s / 100}, "restart": 0, "time": {1000.0 + s}}}\n' for s in range(1, 21)]
    + [f'{{"step": {s}, "loss": {11 - s / 100}, "restart": 1, "time": {1100.0 + s}}}\n' for s in range(21, 51)]
    + ['{"step": 25, "val_loss": 10.8, "tokens": 1600, "restart": 1, "time": 1125.5}\n']
    + [f'{{"step": {s}, "loss": {11 - s / 100}, "restart": 2, "time": {1200.0 + s}}}\n' for s in range(51, 56)]
    + ['{"step": 56, "loss"']
)


def test_rows_and_attempts_from_metrics() -> None:
    rows = dp.parse_rows(ROWS_TEXT)
    assert len(rows) == 56 and rows[-1]["step"] == 55  # the torn line is skipped
    assert dp.train_steps(rows, 1)[:2] == [21, 22] and len(dp.train_steps(rows, 1)) == 30  # not the eval row
    assert [dp.resumed_step(rows, r) for r in (0, 1, 2, 3)] == [0, 20, 50, None]


def test_training_and_stopped_from_state_json_and_scontrol() -> None:
    rows = dp.parse_rows(ROWS_TEXT)
    running = record.RunState(state=record.RUNNING, restarts=2)
    assert dp.is_training(running, rows, 2) and dp.is_training(running, rows, 1)
    assert not dp.is_training(running, rows, 3)  # no attempt after three stops yet
    assert not dp.is_training(running, rows[:50], 2)  # attempt 2 has not logged a step yet
    assert not dp.is_training(record.RunState(state=record.REQUEUED, restarts=2), rows, 2)
    requeued = record.RunState(state=record.REQUEUED, restarts=2, step=50, reason="SIGTERM")
    assert dp.is_stopped(requeued, 1, {"JobState": "PENDING", "Reason": "BeginTime"})
    assert not dp.is_stopped(requeued, 1, {"JobState": "RUNNING"})  # SLURM has not taken it back yet
    assert not dp.is_stopped(requeued, 2, {"JobState": "PENDING"})  # an older stop
    assert not dp.is_stopped(requeued, 1, {})  # scontrol no longer knows the job
    assert dp.requeue_lost(requeued, 1, {"JobState": "FAILED"})  # recorded, but SLURM never got the requeue
    assert not dp.requeue_lost(requeued, 1, {"JobState": "PENDING"}) and not dp.requeue_lost(requeued, 2, {"JobState": "FAILED"})
    assert dp.waits_for_begin_time({"JobState": "PENDING", "Reason": "BeginTime"})
    assert not dp.waits_for_begin_time({"JobState": "PENDING", "Reason": "Priority"})
    assert dp.commit_time({"step": 20, "time": 1020.5}) == 1020.5
    assert dp.commit_time(None) is None and dp.commit_time({"step": 20}) is None


def test_ready_fires_at_the_aimed_moment() -> None:
    ckpt = dp.Interruption(1, "usr2", "checkpoint", 20)
    assert not dp.ready(ckpt, 20, save_in_progress=False)
    assert dp.ready(ckpt, 20, save_in_progress=True) and not ckpt.note
    assert dp.ready(ckpt, 21, save_in_progress=False) and "fired late" in ckpt.note
    ev = dp.Interruption(2, "preempt", "eval", 50)
    assert not dp.ready(ev, 48, False) and dp.ready(ev, 49, False)  # as the step before the eval is logged
    tr = dp.Interruption(3, "usr2", "train", 33)
    assert not dp.ready(tr, 32, False) and dp.ready(tr, 33, False)


def test_hit_phase() -> None:
    windows = {20: (100.0, 100.5)}  # the save of step 20 ran from t=100.0 to its commit at t=100.5
    assert dp.hit_phase(50, 25, val_logged=False, request_time=None, save_windows={}) == "eval"
    assert dp.hit_phase(50, 25, val_logged=True, request_time=None, save_windows={}) == "train"
    for stop in (20, 21):  # a trainer may look for requests before or after the interval save
        assert dp.hit_phase(stop, 0, False, request_time=100.2, save_windows=windows) == "checkpoint"
        assert dp.hit_phase(stop, 0, False, request_time=99.9, save_windows=windows) == "train"
    assert dp.hit_phase(22, 0, False, request_time=100.2, save_windows=windows) == "train"


def test_assess_stop_reads_where_the_request_landed() -> None:
    """A stop at step 20 recorded 0.23 s after its request; the save of step 20 started after the
    step-20 row (t=1020) and committed at t=1020.53, so a request at t=1020.30 hit the save."""
    rows = dp.parse_rows(ROWS_TEXT)
    before = record.RunState(state=record.RUNNING, restarts=0)
    after = record.RunState(state=record.REQUEUED, restarts=1, preemptions=1, step=20, reason="USR2", stop_save_s=0.23)
    it = dp.Interruption(1, "usr2", "checkpoint", 20)
    dp.assess_stop(it, after, before, rows, {19: 1019.5, 20: 1020.53}, ckpt_interval=20, eval_interval=25)
    assert (it.stop_step, it.reason, it.save_s, it.recorded, it.hit, it.restart, it.note) == (
        20, "USR2", 0.23, "preemption", "checkpoint", 1, "")
    dp.assess_stop(it, after, before, rows, {20: 1020.1}, ckpt_interval=20, eval_interval=25)
    assert it.hit == "train" and "landed in train" in it.note  # the request came before the save began
    timeout = record.RunState(state=record.REQUEUED, restarts=1, timeouts=1, step=20, reason="USR2", stop_save_s=None)
    it = dp.Interruption(1, "usr2", "train", 20)
    dp.assess_stop(it, timeout, before, rows, {}, ckpt_interval=20, eval_interval=25)
    assert (it.recorded, it.hit, it.save_s) == ("timeout", "train", None)


def test_assess_stop_finds_an_eval_cut_short() -> None:
    rows = dp.parse_rows(ROWS_TEXT)  # attempt 1 logged no val_loss at step 50: its eval was cut short
    st = record.RunState(state=record.REQUEUED, restarts=2, preemptions=2, step=50, reason="SIGTERM", stop_save_s=0.9)
    it = dp.Interruption(2, "preempt", "eval", 50)
    dp.assess_stop(it, st, record.RunState(state=record.RUNNING, restarts=1, preemptions=1), rows, {50: 1150.9},
                   ckpt_interval=20, eval_interval=25)
    assert (it.hit, it.recorded, it.note) == ("eval", "preemption", "")
    logged = rows + [{"step": 50, "val_loss": 10.5, "restart": 1, "time": 1150.5}]
    dp.assess_stop(it, st, record.RunState(state=record.RUNNING, restarts=1, preemptions=1), logged, {50: 1150.9},
                   ckpt_interval=20, eval_interval=25)
    assert it.hit == "train"


# A run SIGKILLed in rank 1 at step 35 (attempt 0): rank 0's watchdog found its process gone 0.8 s
# later; the job requeued it by the hang/lost-peer rule and attempt 1 resumed from the checkpoint
# of step 20 (steps 21..35 trained again).
KILLED_ROWS = ([{"step": s, "loss": 11 - s / 100, "restart": 0, "time": 1000.0 + s} for s in range(1, 36)]
               + [{"step": s, "loss": 11 - s / 100, "restart": 1, "time": 1100.0 + s} for s in range(21, 61)])
KILL_REPORT = {"kind": "peer_lost", "rank": 0, "host": "box", "restart": 0, "time": 1035.9, "step": 36,
               "phase": "collective", "blamed_rank": 1, "blamed_host": "box", "detected_after_s": 0.8}


def test_assess_failure_from_the_report_and_the_recorded_rule() -> None:
    before = record.RunState(state=record.RUNNING, restarts=0)
    after = record.RunState(state=record.RUNNING, restarts=1, failures=1, last_failure={
        "kind": "peer_lost", "rank": 0, "host": "box", "step": 36, "rule": "transient: peer lost (1/3)",
        "restart": 0, "hosts": ["box"]})
    it = dp.Interruption(1, "kill", "train", 35, rank=1, injected=1035.1)
    dp.assess_failure(it, before, after, KILLED_ROWS, KILL_REPORT, requeued_at=1038.0)
    it.resumed = dp.resumed_step(KILLED_ROWS, 1)
    assert (it.stop_step, it.restart, it.detect_s, it.detected_as, it.hit, it.blamed, it.rule, it.resumed) == (
        35, 1, 0.8, "peer_lost", "collective", "rank1@box", "transient: peer lost (1/3)", 20)
    assert dp.blame_problem(it) is None
    dp.note_resume(it)
    assert it.note == "steps 21-35 trained again from the checkpoint of step 20"
    it.rank = 0
    assert dp.blame_problem(it) == "blamed rank1@box, the fault was in rank 0"
    # a raise: injected when the step before it logged (its last row), detected by its own report
    it = dp.Interruption(2, "raise", "train", 36, rank=1)
    dp.assess_failure(it, before, after, KILLED_ROWS, {**KILL_REPORT, "kind": "exception", "time": 1035.4,
                                                       "phase": "data"}, requeued_at=None)
    assert (it.injected, it.detect_s, it.detected_as) == (1035.0, 0.4, "exception")
    # a rule of another attempt is not this one's
    it = dp.Interruption(3, "kill", "train", 35, rank=1, injected=1035.1)
    dp.assess_failure(it, record.RunState(restarts=1), after, KILLED_ROWS, None, requeued_at=1140.0)
    assert it.rule is None and it.stop_step == 60 and it.detect_s == 104.9


def test_assess_failure_of_a_node_taken_down() -> None:
    """NODE_FAIL: no report; the next attempt's rank 0 recorded the failure blaming the node list."""
    after = record.RunState(state=record.RUNNING, restarts=1, failures=1, last_failure={
        "kind": "node_fail", "rank": None, "host": "n1", "step": None, "rule": "transient: NODE_FAIL (1/3)",
        "restart": 0, "hosts": ["n1"]})
    it = dp.Interruption(1, "node", "train", 35, node="n1", injected=1035.2)
    dp.assess_failure(it, record.RunState(restarts=0), after, KILLED_ROWS, None, requeued_at=1036.7)
    assert (it.detect_s, it.detected_as, it.blamed, it.rule, it.hit) == (
        1.5, "node_fail", "n1", "transient: NODE_FAIL (1/3)", None)
    assert dp.blame_problem(it) is None
    it.resumed = 35  # the trainer got SLURM's SIGTERM and saved before the node went
    dp.note_resume(it)
    assert it.note == "saved step 35 on the way down (SLURM's SIGTERM): nothing trained again"
    it.node = "n2"
    assert dp.blame_problem(it) == "blamed n1, node n2 was taken down"


def test_failures_may_replay_the_steps_since_the_checkpoint() -> None:
    ref = curve(60)
    it = dp.Interruption(1, "kill", "train", 35, rank=1, stop_step=35, resumed=20, blamed="rank1@box",
                         rule="transient: peer lost (1/3)")
    cmp = dp.compare(ref, KILLED_ROWS)
    assert cmp.replayed == list(range(21, 36)) and dp.expected_replays([it]) == set(range(21, 36))
    assert dp.problems([it], cmp, 0.0) == []
    it.stop_step = 30  # replays past the failed step are not the failure's
    assert dp.problems([it], cmp, 0.0) == ["steps trained more than once (a resume went back): 31, 32, 33, 34, 35"]
    it.stop_step = 35
    it.resumed, it.rule = 20, "max_failures reached: peer lost (4/3)"
    assert dp.problems([it], cmp, 0.0) == [
        "interruption 1: requeued without a recorded failure rule (rule: max_failures reached: peer lost (4/3))"]
    it.rule, it.resumed = "transient: peer lost (1/3)", None
    assert dp.problems([it], cmp, 0.0)[0] == "interruption 1: failed at step 35 and never resumed"


# The same run as metrics.jsonl holds it now: attempt 1 dropped attempt 0's rows of steps 21-35
# before its first row (gpt2/metrics_file.py), and says so in one "discarded" row.
KILLED_NOW = ([{"step": s, "loss": 11 - s / 100, "restart": 0, "time": 1000.0 + s} for s in range(1, 21)]
              + [{"event": "discarded", "restart": 0, "steps": [21, 35], "train_s": 14.5, "time": 1100.0}]
              + [{"step": s, "loss": 11 - s / 100, "restart": 1, "time": 1100.0 + s} for s in range(21, 61)])


def test_failures_read_from_discarded_rows() -> None:
    text = "".join(json.dumps(r) + "\n" for r in KILLED_NOW) + '{"event": "lease", "time": 1.0}\n'
    text += '{"event": "save", "step": 60, "time": 1161.0}\n'
    rows = dp.parse_rows(text)
    assert rows == KILLED_NOW  # other events are no rows of the drill
    assert dp.train_steps(rows, 0) == list(range(1, 36)) and dp.resumed_step(rows, 1) == 20
    before = record.RunState(state=record.RUNNING, restarts=0)
    after = record.RunState(state=record.RUNNING, restarts=1, failures=1, last_failure={
        "kind": "peer_lost", "rank": 0, "host": "box", "step": 36, "rule": "transient: peer lost (1/3)",
        "restart": 0, "hosts": ["box"]})
    it = dp.Interruption(1, "kill", "train", 35, rank=1, injected=1035.1)
    dp.assess_failure(it, before, after, rows, KILL_REPORT, requeued_at=1038.0)
    it.resumed = dp.resumed_step(rows, 1)
    dp.note_resume(it)
    assert (it.stop_step, it.resumed, it.note) == (35, 20, "steps 21-35 trained again from the checkpoint of step 20")
    # a raise: its last row is gone; estimated from the last row kept and the training discarded
    it = dp.Interruption(2, "raise", "train", 36, rank=1)
    dp.assess_failure(it, before, after, rows, {**KILL_REPORT, "kind": "exception", "time": 1035.4}, None)
    assert it.injected == 1020.0 + 14.5 and it.detect_s == 0.9
    # the comparison counts the discarded steps as trained twice, as the failure explains
    cmp = dp.compare(curve(60), rows)
    assert cmp.replayed == list(range(21, 36)) and not cmp.missing and not cmp.extra
    it = dp.Interruption(1, "kill", "train", 35, rank=1, stop_step=35, resumed=20, blamed="rank1@box",
                         rule="transient: peer lost (1/3)")
    assert dp.problems([it], cmp, 0.0) == []
    it.stop_step = 30
    assert dp.problems([it], cmp, 0.0) == ["steps trained more than once (a resume went back): 31, 32, 33, 34, 35"]


def test_unplanned_restarts() -> None:
    rows = dp.parse_rows(ROWS_TEXT)
    plan = [dp.Interruption(1, "usr2", "checkpoint", 20, restart=1), dp.Interruption(2, "preempt", "eval", 50)]
    assert dp.unplanned_restarts(plan, rows, 2) == ["restart 2 (resumed at step 50)"]
    plan[1].restart = 2
    assert dp.unplanned_restarts(plan, rows, 2) == []
    assert dp.unplanned_restarts(plan, rows, 3) == ["restart 3 (resumed at step -)"]


def test_choose_high_partition() -> None:
    parts = [parse_kv(line) for line in (
        "PartitionName=low Default=YES GraceTime=20 PriorityTier=1 PreemptMode=REQUEUE State=UP\n"
        "PartitionName=high Default=NO PriorityTier=10 PreemptMode=OFF State=UP\n"
        "PartitionName=mid Default=NO PriorityTier=5 PreemptMode=OFF State=UP").splitlines()]
    assert dp.choose_high_partition(parts, "low") == "high"
    assert dp.choose_high_partition(parts, "high") is None  # nothing above it
    unpreemptable = [{**p, "PreemptMode": "OFF"} for p in parts]
    assert dp.choose_high_partition(unpreemptable, "low") is None  # low cannot be preempted
    assert dp.choose_high_partition(parts, "nope") is None


# ---- comparison and report -------------------------------------------------------------------


def curve(n: int, val_at: tuple[int, ...] = (), restart_at: int | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for s in range(1, n + 1):
        restart = int(restart_at is not None and s > restart_at)
        rows.append({"step": s, "loss": 11.0 - 0.01 * s, "restart": restart})
        if s in val_at:
            rows.append({"step": s, "val_loss": 10.5 - 0.01 * s, "restart": restart})
    return rows


def test_compare_exact_and_with_tolerance() -> None:
    ref = curve(50, val_at=(25, 50))
    same = dp.compare(ref, curve(50, val_at=(25, 50), restart_at=20))
    assert same.ok and same.steps == 50 and same.max_diff == 0.0 and same.val_steps == 2
    nudged = curve(50, val_at=(25, 50))
    nudged[30]["loss"] = math.nextafter(nudged[30]["loss"], math.inf)  # one ulp
    cmp = dp.compare(ref, nudged)
    assert not cmp.ok and cmp.mismatched == [nudged[30]["step"]] and cmp.worst_step == nudged[30]["step"]
    assert dp.compare(ref, nudged, atol=1e-6).ok


def test_compare_finds_lost_replayed_and_skipped_work() -> None:
    ref = curve(30, val_at=(10, 20))
    lost = [r for r in curve(30, val_at=(10, 20)) if r["step"] != 12]
    assert dp.compare(ref, lost).missing == [12]
    replayed = curve(15) + [r for r in curve(30, val_at=(10, 20)) if r["step"] > 12]  # back to 12
    cmp = dp.compare(ref, replayed)
    assert cmp.replayed == [13, 14, 15] and not cmp.ok
    cut = [r for r in curve(30, val_at=(10, 20)) if not (r["step"] == 20 and "val_loss" in r)]
    cmp = dp.compare(ref, cut)
    assert cmp.ok and cmp.val_missing == [20]  # an eval cut short by a stop is reported, not a mismatch
    nan = curve(30)
    nan[4]["loss"] = float("nan")
    assert dp.compare(ref, nan).mismatched == [5]


def test_table_and_verdict() -> None:
    items = [dp.Interruption(1, "preempt", "checkpoint", 20, fired_step=20, stop_step=20, reason="USR2",
                             save_s=0.23, hit="checkpoint", recorded="preemption", resumed=20),
             dp.Interruption(2, "usr2", "eval", 50, fired_step=49, stop_step=50, reason="USR2", save_s=0.93,
                             hit="train", recorded="preemption", resumed=49,
                             note="aimed at eval, the request landed in train")]
    items[0].detect_s, items[0].detected_as, items[0].rule = 1.31, "USR2", "preemption"
    items.append(dp.Interruption(3, "kill", "train", 35, fired_step=35, stop_step=35, hit="collective",
                                 rank=1, detect_s=0.8, detected_as="peer_lost", blamed="rank1@box", resumed=20,
                                 rule="transient: peer lost (1/3)"))
    table = dp.format_table(items).splitlines()
    assert table[0].split() == ["#", "KIND", "AIMED", "AT", "TARGET", "FIRED", "AT", "STOPPED", "AT", "HIT",
                                "SAVE", "S", "DETECT", "S", "DETECTED", "AS", "BLAMED", "RESUMED", "AT", "RULE"]
    assert table[1].split() == ["1", "preempt", "checkpoint", "20", "20", "20", "checkpoint", "0.23", "1.31",
                                "USR2", "-", "20", "preemption"]
    assert table[3].split() == ["3", "kill:1", "train", "35", "35", "35", "collective", "-", "0.80", "peer_lost",
                                "rank1@box", "20", "transient:", "peer", "lost", "(1/3)"]
    assert table[4].strip() == "2: aimed at eval, the request landed in train"
    items.pop()
    ref = curve(60, val_at=(25, 50))
    summary = dp.format_summary(items, dp.compare(ref, ref), atol=0.0)
    assert "MISMATCH: interruption 2: stopped and saved at step 50 but resumed at 49" in summary
    assert summary.splitlines()[-1] == "FAIL"
    items[1].resumed = 50
    summary = dp.format_summary(items, dp.compare(ref, ref), atol=0.0)
    assert summary.splitlines()[0] == "train loss: 60 steps compared, largest |difference| 0, tolerance 0"
    assert summary.splitlines()[-1].startswith("PASS")
