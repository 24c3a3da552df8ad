"""launch/goodput.py on recorded rows: a clean attempt, a stop, a hard kill, a resume whose logger
dropped the lost rows, queue waits from the record and from SLURM; and gpt2/checkpoint/interval.py's rule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from gpt2.checkpoint.interval import AutoInterval, explain, interval_steps, mtbi_from_env, young_daly_s
from launch import goodput
from launch.goodput import Ledger, job_ledger


def start(t: float, restart: int, resumed: int, startup: float = 2.0) -> dict:
    return {"event": "start", "restart": restart, "resumed_step": resumed, "startup_s": startup,
            "startup": {"imports": startup}, "time": t}


def train(step: int, t: float, restart: int, train_s: float = 1.0, step_time: float | None = None,
          save: float = 0.0) -> dict:
    return {"step": step, "loss": 5.0 - step / 10, "step_time": step_time or train_s, "train_s": train_s,
            "save_blocked_s": save, "restart": restart, "time": t}


def end(t: float, restart: int, status: str = "done", save: float = 0.0, eval_s: float = 0.0) -> dict:
    return {"event": "end", "status": status, "restart": restart, "save_blocked_s": save, "eval_s": eval_s,
            "train_s": 0.0, "time": t}


def test_one_clean_attempt_splits_its_wall_time() -> None:
    # process starts at 98; 2 s of start-up; the first step takes 3 s (2 s of it compilation)
    rows = [start(100.0, 0, 0), train(1, 103.0, 0, train_s=3.0), train(2, 104.0, 0),
            train(3, 105.4, 0, save=0.4), {"step": 3, "val_loss": 4.0, "eval_s": 0.5, "restart": 0, "time": 105.9},
            train(4, 106.9, 0), end(107.6, 0, save=0.6)]
    led, per = job_ledger(rows, submitted_at=90.0)
    assert led.queue == pytest.approx(8.0)  # submitted at 90, process started at 98
    assert led.startup == pytest.approx(4.0)  # 2 s measured + the first step's 2 s excess
    assert led.productive == pytest.approx(4.0)
    assert led.save == pytest.approx(1.0) and led.eval == pytest.approx(0.5)
    assert led.replayed == 0 and led.gap == 0
    assert led.other == pytest.approx(107.6 - 98.0 - 9.5)
    assert led.total == pytest.approx(107.6 - 90.0)
    assert led.goodput == pytest.approx(4.0 / 17.6)
    assert led.attempts == 1 and led.interruptions == 0 and len(per) == 1


def test_a_hard_kill_with_rows_appended_again_counts_them_replayed() -> None:
    """Attempt 0 is killed after step 5 (no end row; checkpoint at 3); attempt 1 resumes at 3 and
    logs steps 4 and 5 again: attempt 0's rows of 4 and 5 were thrown away."""
    rows = [start(100.0, 0, 0), *[train(s, 100.0 + s, 0) for s in range(1, 6)],
            start(120.0, 1, 3, startup=5.0), *[train(s, 120.0 + s - 3, 1) for s in range(4, 7)], end(124.0, 1)]
    led, per = job_ledger(rows)
    assert led.replayed == pytest.approx(2.0)
    assert led.productive == pytest.approx(6.0)
    assert per[0].attempt_s == pytest.approx(105.0 - 98.0)  # killed: its last row ends it
    assert led.gap == pytest.approx(115.0 - 105.0)  # attempt 1's process started at 120 - 5
    assert led.interruptions == 1 and led.attempts == 2
    assert led.mtbi_s == pytest.approx((7.0 + 9.0) / 1)


def test_a_resume_whose_logger_dropped_the_lost_rows_counts_the_summary() -> None:
    """The same kill, as the resumed logger rewrites metrics.jsonl: rows of steps 4 and 5 are gone,
    one "discarded" row holds their train time."""
    rows = [start(100.0, 0, 0), *[train(s, 100.0 + s, 0) for s in range(1, 4)],
            {"event": "discarded", "restart": 0, "steps": [4, 5], "train_s": 2.0, "time": 116.0},
            start(120.0, 1, 3, startup=5.0), *[train(s, 120.0 + s - 3, 1) for s in range(4, 7)], end(124.0, 1)]
    led, per = job_ledger(rows)
    assert led.replayed == pytest.approx(2.0) and led.productive == pytest.approx(6.0)
    assert per[0].attempt_s == pytest.approx(105.0 - 98.0)  # the dropped rows still end attempt 0 at 105
    assert led.gap == pytest.approx(10.0)
    appended = [r for r in rows if r.get("event") != "discarded"]
    appended[4:4] = [train(4, 104.0, 0), train(5, 105.0, 0)]
    assert job_ledger(appended)[0].as_dict() == led.as_dict()  # both ways of writing agree


def test_a_clean_stop_is_an_interruption_with_its_save_and_nothing_replayed() -> None:
    rows = [start(100.0, 0, 0), train(1, 101.0, 0), train(2, 102.0, 0), end(103.5, 0, "preempted", save=1.5),
            start(110.0, 1, 2, startup=1.0), train(3, 111.0, 1), end(111.2, 1)]
    led, _ = job_ledger(rows)
    assert led.interruptions == 1 and led.replayed == 0
    assert led.save == pytest.approx(1.5) and led.gap == pytest.approx(109.0 - 103.5)


def test_slurm_times_give_each_attempt_its_queue_wait() -> None:
    rows = [start(100.0, 0, 0), train(1, 101.0, 0), end(101.0, 0, "preempted"),
            start(130.0, 1, 1), train(2, 131.0, 1), end(131.0, 1)]
    slurm = [(50.0, 97.0, 101.5), (102.0, 125.0, 131.5)]  # submitted, started, ended (requeued at 102)
    led, _ = job_ledger(rows, submitted_at=60.0, slurm_attempts=slurm)
    assert led.queue == pytest.approx((97.0 - 50.0) + (125.0 - 102.0))
    assert led.gap == pytest.approx(128.0 - 101.0 - 23.0)  # the rest of the time between attempts
    # attempts that do not match SLURM's one to one: only the first Submit is used
    assert job_ledger(rows, slurm_attempts=slurm[:1])[0].queue == pytest.approx(98.0 - 50.0)


def test_the_start_rows_own_queue_times_need_no_record_nor_sacct() -> None:
    """launch/job.py passes when the attempt was queued (submitted or requeued), SLURM when it started it."""
    slurm = [start(100.0, 0, 0), train(1, 101.0, 0), end(101.0, 0, "preempted"),
             start(130.0, 1, 1), train(2, 131.0, 1), end(131.0, 1)]
    slurm[0].update(queued_at=50.0, slurm_start=97.0)
    slurm[3].update(queued_at=102.0, slurm_start=125.0)
    led, _ = job_ledger(slurm, submitted_at=10.0)  # the rows win over the record
    assert led.queue == pytest.approx(47.0 + 23.0) and led.gap == pytest.approx(128.0 - 101.0 - 23.0)
    no_start = [{k: v for k, v in r.items() if k != "slurm_start"} for r in slurm]
    for r in no_start[0], no_start[3]:
        r["scheduler"] = "slurm"  # SLURM queued it but did not say when it started it: until the process started
    assert job_ledger(no_start)[0].queue == pytest.approx((98.0 - 50.0) + (128.0 - 102.0))
    local = [{k: v for k, v in r.items() if k != "slurm_start"} for r in slurm]
    led, _ = job_ledger(local)  # a local requeue restarts at once: a gap, not a queue
    assert led.queue == pytest.approx(98.0 - 50.0) and led.gap == pytest.approx(128.0 - 101.0)


def test_a_file_from_before_the_events_still_has_a_ledger() -> None:
    rows = [train(s, 100.0 + s, 0) for s in range(1, 5)] + [train(s, 200.0 + s, 1) for s in range(3, 6)]
    led, per = job_ledger(rows)
    assert len(per) == 2 and led.replayed == pytest.approx(2.0) and led.productive == pytest.approx(5.0)
    assert led.interruptions == 1


def test_an_attempt_still_running_is_no_interruption() -> None:
    led, _ = job_ledger([start(100.0, 0, 0), train(1, 101.0, 0)])
    assert led.interruptions == 0 and led.mtbi_s is None


def test_sweep_ledger_sums_jobs_and_reads_files(tmp_path: Path) -> None:
    run = tmp_path / "a"
    run.mkdir()
    rows = [start(100.0, 0, 0), train(1, 101.0, 0), end(101.0, 0)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn": ')
    a = goodput.run_ledger(run)
    assert a is not None and a.productive == pytest.approx(1.0)
    assert goodput.run_ledger(tmp_path / "none") is None
    total = goodput.sweep_ledger({"a": a, "b": None, "c": a})
    assert total.productive == pytest.approx(2.0) and total.attempts == 2
    assert "goodput" in goodput.format_ledger(total) and goodput.format_ledger(Ledger()) == "goodput -"


# ---- the Young/Daly interval ------------------------------------------------------------------


def test_young_daly_interval_in_steps() -> None:
    assert young_daly_s(2.0, 3600.0) == pytest.approx(120.0)
    assert interval_steps(2.0, 3600.0, 0.5, 1000) == 240
    assert interval_steps(2.0, 3600.0, 0.5, 100) == 100  # capped
    assert interval_steps(0.0, 3600.0, 0.5, 100) == 1  # a free save: every step
    assert "capped by max_interval" in explain(2.0, "estimate", 3600.0, "profile", 0.5, 100)


def test_mtbi_comes_from_the_environment_else_the_default() -> None:
    assert mtbi_from_env({"GPT2_MTBI_S": "600", "GPT2_MTBI_SOURCE": "sweep ledger"}) == (600.0, "sweep ledger")
    m, source = mtbi_from_env({"GPT2_MTBI_S": "nonsense"})
    assert m > 0 and "default" in source


def test_auto_interval_changes_only_when_it_moves_enough() -> None:
    auto = AutoInterval(max_interval=1000, mtbi_s=3600.0, mtbi_source="test", save_estimate_s=2.0)
    assert not auto.due(5, -1)  # no revision yet: no interval
    auto.observe_step(0.5)
    assert auto.inputs() == [0.5, 2.0, 3600.0]
    assert auto.revise_due(11, 10) and not auto.revise_due(12, 10) and auto.revise_due(20, 10)
    assert "240 steps" in (auto.revise(*auto.inputs()) or "")
    assert not auto.due(239, -1) and auto.due(240, -1) and auto.due(250, 10)
    auto.observe_save(2.1)  # C moved by 2.5%: the interval stays, nothing logged
    assert auto.revise_due(13, 10)  # the step after a save
    assert auto.revise(*auto.inputs()) is None and auto.steps == 240 and not auto.revise_due(13, 10)
    auto.observe_save(8.0)  # C four times larger: twice the interval
    assert "480 steps" in (auto.revise(*auto.inputs()) or "") and auto.steps == 480
    assert "(last save)" in (auto.revise(0.25, 8.0, 3600.0) or "")  # agreed inputs win: 960 steps


# ---- a real run: 2 gloo ranks, interval auto, a stop and a resume -------------------------------


@pytest.mark.slow
def test_real_run_with_auto_interval_writes_what_the_ledger_needs(pydoc_shards: Path, tmp_path: Path) -> None:
    """M is huge, so the interval is max_interval (2) whatever the timings: saves at 2, at the stop
    after step 3 (rank 1 gets USR2), then 5 (2 steps after the resumed 3) and 6 (the finish)."""
    import test_resume as tr

    run = tmp_path / "run"
    args = [*tr.TINY, f"dataset.train_dataset.data_root={pydoc_shards}", "trainer=ddp", f"run.dir={run}",
            "wandb.mode=disabled", "trainer.config.max_steps=6",
            "trainer.config.checkpoint_strategy.config.interval=auto",
            "trainer.config.checkpoint_strategy.config.max_interval=2"]
    mtbi = {"GPT2_MTBI_S": "1e9", "GPT2_MTBI_SOURCE": "test"}
    tr.launch(2, args, tmp_path / "first", tr.EXIT_REQUEUE, GPT2_TEST_SIGNAL_AT_STEP="3", GPT2_TEST_SIGNAL_RANK="1",
              **mtbi)
    ck = run / "checkpoints"
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000002", "step_00000003"]
    tr.launch(2, args, tmp_path / "second", 0, **mtbi)
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_00000005", "step_00000006"]
    assert "checkpoint interval auto: 2 steps (capped by max_interval)" in tr.log_text(run)

    rows = goodput.read_rows(run / "metrics.jsonl")
    starts = [r for r in rows if r.get("event") == "start"]
    ends = [r for r in rows if r.get("event") == "end"]
    assert [s["resumed_step"] for s in starts] == [0, 3] and not any("queued_at" in s for s in starts)
    assert set(starts[0]["startup"]) == {"imports", "process_group", "data", "model", "checkpoint_load", "metrics_logger",
                                        "other"}
    assert [(e["status"], e["last_step"]) for e in ends] == [("preempted", 3), ("done", 6)]
    assert ends[0]["save_blocked_s"] > 0  # the stop's save, carried by no step row
    assert all(r["train_s"] > 0 for r in rows if "loss" in r)
    led, per = job_ledger(rows)
    assert led.attempts == 2 and led.interruptions == 1 and led.replayed == 0
    assert led.productive > 0 and led.save > 0 and led.startup > 0 and 0 < (led.goodput or 0) < 1
    assert sum(p.attempt_s for p in per) + led.gap == pytest.approx(led.total, rel=1e-6)


def test_status_shows_goodput_per_job_and_for_the_sweep(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from launch import record, sweep

    d = tmp_path / "sweep"
    recs = [record.JobRecord(job=j, overrides=[], config_hash="h", executor="local", submitted_at=90.0)
            for j in ("a", "b")]
    with record.SweepRecord(d).locked() as m:
        m.write(recs)
    record.write_sweep_meta(d, {"name": "sweep", "executor": "local", "cluster": "local", "resources": {}})
    rows = [start(100.0, 0, 0), train(1, 103.0, 0, train_s=3.0), train(2, 104.0, 0), train(3, 105.0, 0),
            end(106.0, 0)]
    (d / "a").mkdir()
    (d / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record.write_state(d / "a", record.RunState(state=record.COMPLETED))
    record.write_state(d / "b", record.RunState(state=record.PENDING))
    assert sweep.main(["status", str(d)]) == 0
    out = capsys.readouterr().out
    good = job_ledger(rows, submitted_at=90.0)[0].goodput
    assert "GOODPUT" in out and f"{good:.2f}" in out.splitlines()[2]
    assert f"sweep goodput {good:.2f} of" in out and "1 attempt(s)" in out
    assert sweep.main(["status", str(d), "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["goodput"]["goodput"] == pytest.approx(good, abs=1e-4) and lines[1]["goodput"] is None


def test_the_job_passes_the_sweeps_mtbi_once_it_has_seen_interruptions(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt2.compose import load_config
    from launch import job, rank_env, record

    d = tmp_path / "sweep"
    with record.SweepRecord(d).locked() as m:
        m.write([record.JobRecord(job="a", overrides=[], config_hash="h")])
    cfg = load_config([f"dataset.train_dataset.data_root={tmp_path}", f"run.dir={d / 'a'}",
                       "trainer.config.checkpoint_strategy.config.interval=auto"])
    entry = job.JobEntry(cfg=cfg, sweep_dir=str(d), job="a", executor="local", time_limit_s=None,
                         signal_lead_s=60.0, mtbi_s=7200.0)
    assert rank_env.mtbi(entry) == (7200.0, "cluster profile mtbi_hours")  # nothing seen yet
    (d / "a").mkdir()
    rows = [start(100.0, 0, 0), train(1, 101.0, 0), train(2, 102.0, 0), end(102.0, 0, "preempted"),
            start(110.0, 1, 2), train(3, 111.0, 1), end(111.0, 1)]
    (d / "a" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.delenv("GPT2_MTBI_S", raising=False)
    rank_env.export_mtbi(entry)
    assert float(os.environ["GPT2_MTBI_S"]) == pytest.approx(4.0 + 3.0)  # both attempts' time, one interruption
    assert os.environ["GPT2_MTBI_SOURCE"] == "sweep ledger: 1 interruption(s)"
    monkeypatch.delenv("GPT2_MTBI_S")
    cfg.trainer.config.checkpoint_strategy.config.interval = 100
    rank_env.export_mtbi(entry)  # a fixed interval needs no M
    assert "GPT2_MTBI_S" not in os.environ


def test_profiles_carry_mtbi_and_the_dry_run_says_why(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from launch import sweep
    from launch.experiment import load_profile

    assert load_profile("local").mtbi_hours == 1 and load_profile("example").mtbi_hours == 6
    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    assert sweep.main(["jobs/debug_local.yaml", "trainer.config.checkpoint_strategy.config.interval=auto",
                       "trainer.config.checkpoint_strategy.config.max_interval=50", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "checkpoint interval auto: every ~" in out and "M 1.00 h (cluster local mtbi_hours)" in out
    assert "max_interval=50" in out
    assert sweep.main(["jobs/debug_local.yaml", "--dry-run"]) == 0
    assert "checkpoint interval auto" not in capsys.readouterr().out  # a fixed interval: nothing to explain


# ---- the storm ---------------------------------------------------------------------------------


def test_a_storm_plans_a_usr2_every_so_many_steps() -> None:
    from gpt2.errors import UserError
    from launch import drill_plan as dp

    plan = dp.plan_storm(300, 20, seed=1)
    assert [it.kind for it in plan] == ["usr2"] * 14 and all(it.aim == "train" for it in plan)
    assert all(abs(it.target - 20 * it.index) <= 5 for it in plan) and plan[-1].target < 300 - 1
    assert [it.target for it in plan] == [it.target for it in dp.plan_storm(300, 20, seed=1)]  # seeded
    with pytest.raises(UserError, match="--every must be >= 4"):
        dp.plan_storm(300, 2, seed=0)
    with pytest.raises(UserError, match="needs trainer.config.max_steps above"):
        dp.plan_storm(20, 20, seed=0)


@pytest.mark.slow
def test_a_storm_on_the_local_executor_matches_step_for_step_and_prints_goodput(
        pydoc_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from launch import drill

    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiny = ["model.config.n_layer=2", "model.config.n_embd=64", "model.config.n_head=2", "model.config.block_size=64",
            "dataset.seq_len=32", "trainer.config.batch_size=2"]  # the steps are not what is under test
    code = drill.main(["jobs/debug_local.yaml", *tiny, "trainer.config.max_steps=24", "wandb.mode=disabled",
                       f"dataset.train_dataset.data_root={pydoc_shards}", "--storm", "--every", "8",
                       "--executor", "local", "--name", "storm", "--timeout", "300"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS: the interrupted run matches the uninterrupted one step for step" in out
    assert "drilled   goodput" in out and "start-up per attempt (3 attempts" in out
    led = goodput.run_ledger(tmp_path / "storm" / "main")
    assert led is not None and led.attempts == 3 and led.interruptions == 2 and led.replayed == 0


def test_storm_and_local_drill_bad_input_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from launch import drill

    monkeypatch.setenv("RUNS_DIR", str(tmp_path))
    assert drill.main(["jobs/debug_local.yaml", "--executor", "local", "--kinds", "usr2,preempt"]) == 2
    assert "--kinds preempt need SLURM" in capsys.readouterr().err
    assert drill.main(["jobs/debug_local.yaml", "--storm", "--every", "2"]) == 2
    assert "--every must be >= 4" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing was submitted
