"""The promotion rule on recorded rung results (launch/asha.py): pure, no processes."""

from __future__ import annotations

import math

import pytest

from launch.asha import PROMOTE, STOP, Decision, SearchSpec, Trial, decide, finished

SPEC = SearchSpec(metric="val_loss", mode="min", min_steps=4, max_steps=36, reduction=3)


def done(name: str, loss: float | None, rung: int = 4) -> Trial:
    """A trial whose job completed at `rung` with `loss` there (None: no eval row)."""
    return Trial(name, target=rung, state="COMPLETED", values={} if loss is None else {rung: loss})


def running(name: str, rung: int = 4) -> Trial:
    return Trial(name, target=rung, state="RUNNING")


def apply(decisions: list[Decision], known: dict[str, Decision]) -> dict[str, Decision]:
    return {**known, **{d.key: d for d in decisions}}


def actions(decisions: list[Decision]) -> dict[str, str]:
    return {d.trial: d.action for d in decisions}


def test_rungs() -> None:
    assert SPEC.rungs() == [4, 12, 36]
    assert SearchSpec(min_steps=100, max_steps=1600, reduction=3).rungs() == [100, 300, 900, 1600]
    assert SearchSpec(min_steps=5, max_steps=5).rungs() == [5]
    assert SPEC.next_rung(4) == 12 and SPEC.next_rung(36) is None


@pytest.mark.parametrize("kw, word", [({"kind": "random"}, "kind"), ({"mode": "best"}, "mode"),
                                      ({"reduction": 1}, "reduction"), ({"min_steps": 50, "max_steps": 10}, "exceed")])
def test_bad_specs_say_what(kw: dict, word: str) -> None:
    assert word in (SearchSpec(**kw).problem() or "")


def test_asynchronous_promotion_without_waiting_for_the_rung() -> None:
    # 3 of 9 reported: the cut is floor(3/3) = 1, the best of them goes on at once
    trials = [done("a", 3.0), done("b", 2.0), done("c", 4.0)] + [running(f"z{i}") for i in range(6)]
    ds = decide(SPEC, trials, {})
    assert [(d.trial, d.action, d.next_rung, d.cut, d.reported) for d in ds] == [("b", PROMOTE, 12, 1, 3)]
    assert ds[0].ranking == [("b", 2.0), ("a", 3.0), ("c", 4.0)] and not ds[0].closed
    # two reports are fewer than `reduction`: nobody yet
    assert decide(SPEC, [done("a", 3.0), done("b", 2.0)] + [running(f"z{i}") for i in range(7)], {}) == []


def test_idempotent_and_a_later_report_can_promote_a_waiting_trial() -> None:
    trials = [done("a", 3.0), done("b", 2.0), done("c", 4.0)] + [running(f"z{i}") for i in range(6)]
    known = apply(decide(SPEC, trials, {}), {})
    assert decide(SPEC, trials, known) == []  # the same records again: nothing new
    # three more report, all worse than a: the cut grows to 2 and a (second best) goes on too
    trials = trials[:3] + [done("z0", 9.0), done("z1", 8.0), done("z2", 7.0)] + [running(f"z{i}") for i in (3, 4, 5)]
    ds = decide(SPEC, trials, known)
    assert actions(ds) == {"a": PROMOTE} and ds[0].cut == 2 and ds[0].rank == 1
    assert decide(SPEC, trials, apply(ds, known)) == []


def test_a_closed_rung_stops_the_rest() -> None:
    trials = [done(n, v) for n, v in zip("abcdefghi", [5, 1, 7, 3, 9, 2, 8, 4, 6], strict=True)]
    ds = decide(SPEC, trials, {})
    assert actions(ds) == {"b": PROMOTE, "f": PROMOTE, "d": PROMOTE, **{n: STOP for n in "aceghi"}}
    assert all(d.closed and d.cut == 3 for d in ds)
    known = apply(ds, {})
    # the promoted three report at rung 12: one goes on to 36, the two others stop (the rung is closed:
    # the six others were stopped below it)
    trials = [t if t.name not in "bfd" else Trial(t.name, 12, "COMPLETED", {4: t.values[4], 12: v})
              for t, v in zip(trials, [0, 1.5, 0, 1.0, 0, 1.2, 0, 0, 0], strict=True)]
    ds = decide(SPEC, trials, known)
    assert {(d.trial, d.action, d.next_rung) for d in ds} == {("d", PROMOTE, 36), ("f", STOP, None), ("b", STOP, None)}
    known = apply(ds, known)
    assert not finished(SPEC, trials, known)
    trials = [t if t.name != "d" else Trial("d", 36, "COMPLETED", {**t.values, 36: 0.9}) for t in trials]
    assert finished(SPEC, trials, known) and decide(SPEC, trials, known) == []


def test_ties_are_broken_by_name() -> None:
    trials = [done(n, 1.0) for n in ("c", "a", "b")]
    ds = decide(SPEC, trials, {})
    assert actions(ds) == {"a": PROMOTE, "b": STOP, "c": STOP}
    assert [n for n, _ in ds[0].ranking] == ["a", "b", "c"]
    assert decide(SPEC, list(reversed(trials)), {}) == ds  # order of the records does not matter


def test_missing_and_nan_metrics_rank_last_and_never_promote() -> None:
    # c completed without an eval row at the rung: it has not reported, so the rung stays open
    trials = [done("a", math.nan), done("b", 2.0), done("c", None), done("d", 3.0)]
    ds = decide(SPEC, trials, {})
    assert actions(ds) == {"b": PROMOTE} and [n for n, _ in ds[0].ranking] == ["b", "d", "a"]
    assert not ds[0].closed and ds[0].reported == 3
    # all NaN, rung closed: nobody can be promoted (cut 1 but NaN never goes on), all stop
    ds = decide(SPEC, [done("a", math.nan), done("b", math.nan), done("c", math.nan)], {})
    assert actions(ds) == {"a": STOP, "b": STOP, "c": STOP}


def test_a_failed_trial_counts_as_the_worst_report() -> None:
    failed = Trial("f", target=4, state="FAILED")
    trials = [done("a", 3.0), done("b", 2.0), failed] + [running(f"z{i}") for i in range(6)]
    ds = decide(SPEC, trials, {})
    assert actions(ds) == {"b": PROMOTE} and ds[0].reported == 3 and ds[0].ranking[-1] == ("f", None)
    # the failed trial is never promoted nor stopped; its rung closes without it
    trials = [done("a", 3.0), done("b", 2.0), failed]
    ds = decide(SPEC, trials, {})
    assert actions(ds) == {"b": PROMOTE, "a": STOP}
    # a trial that failed below a rung does not hold that rung open
    known = apply(ds, {})
    later = [Trial("b", 12, "COMPLETED", {4: 2.0, 12: 1.0}), done("a", 3.0), failed]
    assert actions(decide(SPEC, later, known)) == {"b": PROMOTE}


def test_preempted_at_a_rung_boundary_counts_only_with_its_metric() -> None:
    # p stopped exactly at step 4 before its eval row: not reported, not waiting, the rung stays open
    p = Trial("p", target=4, state="REQUEUED")
    assert decide(SPEC, [done("a", 3.0), done("b", 2.0), p], {}) == []
    # with the row written (preempted after the eval), it counts: it holds the one slot, so the
    # closed rung stops a and b, and p is promoted once its requeued job completes
    p.values = {4: 1.0}
    ds = decide(SPEC, [done("a", 3.0), done("b", 2.0), p], {})
    assert actions(ds) == {"a": STOP, "b": STOP} and ds[0].ranking[0] == ("p", 1.0)
    known = apply(ds, {})
    p.state = "COMPLETED"
    assert actions(decide(SPEC, [done("a", 3.0), done("b", 2.0), p], known)) == {"p": PROMOTE}


def test_fewer_trials_than_reduction_still_train_the_best_to_the_end() -> None:
    ds = decide(SPEC, [done("a", 3.0), done("b", 2.0)], {})
    assert actions(ds) == {"b": PROMOTE, "a": STOP} and ds[0].cut == 1


def test_mode_max() -> None:
    spec = SearchSpec(metric="acc", mode="max", min_steps=4, max_steps=36, reduction=3)
    assert actions(decide(spec, [done("a", 0.1), done("b", 0.9), done("c", 0.5)], {}))["b"] == PROMOTE
