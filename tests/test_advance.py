"""Durable decisions (launch/advance.py) on a sweep directory written by hand, with submission
faked in-process; the experiment schema of `sweep.search`; and the real thing on the local
executor: a 4-trial ASHA sweep whose controller is killed once, and whose winner's losses equal
an uninterrupted run of the same config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpt2.errors import UserError
from launch import advance, intent, record
from launch import sweep as sw
from launch.asha import PROMOTE, STOP
from launch.experiment import load_experiment

ROOT = Path(__file__).resolve().parent.parent
SEARCH = {"kind": "asha", "metric": "val_loss", "mode": "min", "min_steps": 4, "max_steps": 36, "reduction": 3}


def fake_sweep(tmp_path: Path, losses: dict[str, float]) -> Path:
    """A sweep whose trials all completed the first rung with these val losses."""
    d = tmp_path / "sweep"
    d.mkdir()
    record.write_sweep_meta(d, {"name": "fake", "executor": "local", "cluster": "local", "resources": {},
                                "search": SEARCH})
    recs = []
    for name, loss in losses.items():
        run = d / name
        record.write_state(run, record.RunState(state=record.COMPLETED, step=4))
        (run / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": loss + 0.1}) + "\n"
                                           + json.dumps({"step": 4, "val_loss": loss}) + "\n")
        recs.append(record.JobRecord(job=name, overrides=["model=tiny", "trainer.config.max_steps=4",
                                                          "trainer.config.lr_decay_steps=36"],
                                     config_hash="h", executor="local", state=record.COMPLETED, submissions=1))
    m = record.SweepRecord(d)
    with m.locked():
        m.write(recs)
    return d


@pytest.fixture
def submitted(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[str]]]:
    """Replace the sweep's submission path: record what would be submitted, as submit_jobs would."""
    calls: list[tuple[str, list[str]]] = []

    def prepare(sweep: Any, jobs: list[tuple[str, list[str]]]) -> list[Any]:
        return [sw.Prepared(n, ov, None, "h", None) for n, ov in jobs]  # type: ignore[arg-type]

    def submit_jobs(sweep: Any, prepared: list[Any], retry: Any, check_hash: bool) -> Any:
        m = record.SweepRecord(sweep.dir)
        with m.locked():
            records = m.read()
            for p in prepared:
                if records[p.name].state in retry:
                    calls.append((p.name, p.overrides))
                    records[p.name].overrides = p.overrides
                    records[p.name].submissions += 1
                    records[p.name].state = record.PENDING
                    record.update_state(sweep.dir / p.name, state=record.PENDING)
            m.write(records)
        return [], []

    monkeypatch.setattr(sw, "prepare", prepare)
    monkeypatch.setattr(sw, "submit_jobs", submit_jobs)
    return calls


LOSSES = {"a": 3.0, "b": 2.0, "c": 4.0, "d": 9.0, "e": 1.0, "f": 5.0, "g": 8.0, "h": 7.0, "i": 6.0}


def test_a_kill_between_deciding_and_acting_loses_nothing_and_doubles_nothing(
        tmp_path: Path, submitted: list[tuple[str, list[str]]], monkeypatch: pytest.MonkeyPatch) -> None:
    d = fake_sweep(tmp_path, LOSSES)

    def killed(*args: Any) -> Any:
        raise KeyboardInterrupt  # the controller dies right after writing its decisions

    with monkeypatch.context() as mp:
        mp.setattr(advance, "_promote", killed)
        with pytest.raises(KeyboardInterrupt):
            advance.advance(d)
    log = advance.read_log(d)
    assert {k: x.action for k, x in log.decided.items()} == {
        "e@4": PROMOTE, "b@4": PROMOTE, "a@4": PROMOTE, **{f"{n}@4": STOP for n in "cdfghi"}}
    assert log.done == set() and submitted == []
    assert record.read_state(d / "c").state == record.COMPLETED  # not acted on yet
    out = advance.advance(d)  # the rerun acts on what was decided
    assert out.new == [] and sorted(out.promoted) == ["a", "b", "e"] and sorted(out.stopped) == list("cdfghi")
    assert sorted(n for n, _ in submitted) == ["a", "b", "e"]
    assert all(ov[-1] == "trainer.config.max_steps=12" and ov.count("trainer.config.max_steps=12") == 1
               for _, ov in submitted)
    recs = record.SweepRecord(d).read()
    assert recs["c"].state == record.STOPPED_EARLY and record.read_state(d / "c").state == record.STOPPED_EARLY
    assert "rank 4 of 9" in (recs["c"].message or "")
    again = advance.advance(d)  # and again: nothing
    assert (again.new, again.promoted, again.stopped, len(submitted)) == ([], [], [], 3)
    lines = (d / advance.DECISIONS).read_text().splitlines()
    assert sum(json.loads(x)["state"] == "decided" for x in lines) == 9
    assert sum(json.loads(x)["state"] == "done" for x in lines) == 9
    assert advance.rung_steps(d) == [4, 12] and advance.rung_steps(tmp_path) == []  # make plot's marks
    status = advance.rung_lines(d)
    assert any("rung 4: 9 of 9 reported; promoted e, b, a; stopped 6" in x for x in status), status


def test_a_promotion_whose_submission_was_lost_is_made_again(
        tmp_path: Path, submitted: list[tuple[str, list[str]]]) -> None:
    """A decision marked done whose trial the record shows back at its old rung (a person
    submitted the experiment again) is acted on again, once."""
    d = fake_sweep(tmp_path, {"a": 1.0, "b": 2.0, "c": 3.0})
    advance.advance(d)
    assert [n for n, _ in submitted] == ["a"]
    m = record.SweepRecord(d)
    with m.locked():
        recs = m.read()
        recs["a"].overrides = advance.with_target(recs["a"].overrides, 4)
        recs["a"].state = record.COMPLETED
        m.write(recs)
    record.update_state(d / "a", state=record.COMPLETED)
    assert advance.advance(d).promoted == ["a"] and [n for n, _ in submitted] == ["a", "a"]
    assert advance.advance(d).promoted == [] and len(submitted) == 2


def test_a_running_trial_is_never_submitted_twice(tmp_path: Path, submitted: list[tuple[str, list[str]]]) -> None:
    d = fake_sweep(tmp_path, {"a": 1.0, "b": 2.0, "c": 3.0})
    advance.advance(d)
    record.update_state(d / "a", state=record.RUNNING)
    for _ in range(2):
        advance.advance(d)
    assert [n for n, _ in submitted] == ["a"]


# ---- the experiment schema -------------------------------------------------------------------


def experiment(tmp_path: Path, search: str, extra: str = "") -> Path:
    p = tmp_path / "exp.yaml"
    p.write_text(f"""
overrides: {{model: tiny, trainer.config.eval_interval: 4{extra}}}
sweep:
  grid: {{trainer.config.lr: [1.0e-3, 3.0e-3]}}
  search: {search}
""")
    return p


def test_each_trial_trains_to_the_first_rung_on_the_full_schedule(tmp_path: Path) -> None:
    exp = load_experiment(str(experiment(tmp_path, json.dumps(SEARCH))), ["trainer.config.max_steps=999"])
    assert exp.search is not None and exp.search.rungs() == [4, 12, 36]
    assert [j.overrides[-2:] for j in exp.jobs] == [["trainer.config.max_steps=4", "trainer.config.lr_decay_steps=36"]] * 2


@pytest.mark.parametrize("search, extra, words", [
    ('{kind: grid}', "", "sweep.search: kind 'grid' is unknown"),
    ('{mode: best}', "", "sweep.search: mode 'best' is unknown"),
    ('{reduction: 1}', "", "reduction must be >= 2"),
    ('{min_steps: 100, max_steps: 10}', "", "min_steps (100) must not exceed max_steps (10)"),
    ('{reduction: three}', "", "reduction"),
    ('{patience: 3}', "", "unknown key 'sweep.search.patience'"),
    ('{}', ", trainer.config.eval_interval: 0", "eval_interval is 0"),
])
def test_a_bad_search_is_one_line(tmp_path: Path, search: str, extra: str, words: str) -> None:
    with pytest.raises(UserError) as exc:
        load_experiment(str(experiment(tmp_path, search, extra.replace(", trainer.config.eval_interval: 4", ""))))
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_a_bad_search_exits_2_from_the_command_line(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "launch/sweep.py", str(experiment(tmp_path, "{reduction: 1}")), "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "reduction must be >= 2" in res.stderr


# ---- the real thing: 4 trials on the local executor ------------------------------------------


def tiny_asha(tmp_path: Path, shards: Path, search: bool = True, lrs: str = "") -> Path:
    text = (ROOT / "jobs" / "asha_tiny.yaml").read_text()
    text = text.replace("dataset: pydoc", f"dataset: pydoc\n  dataset.train_dataset.data_root: {shards}\n"
                                          f"  dataset.val_dataset.data_root: {shards}")
    if not search:  # the same trial without the search: to max_steps in one go, same schedule
        text = text.replace("  search: {kind: asha", "  # search: {kind: asha").replace(
            "  wandb.mode: disabled", "  wandb.mode: disabled\n  trainer.config.max_steps: 36\n"
                                      "  trainer.config.lr_decay_steps: 36")
    if lrs:
        text = text.replace("[1.0e-4, 2.0e-4, 5.0e-4, 1.0e-3, 2.0e-3, 3.0e-3, 5.0e-3, 1.0e-2, 2.0e-2]", lrs)
    path = tmp_path / ("asha.yaml" if search else "full.yaml")
    path.write_text(text)
    return path


def launch(args: list[str], runs: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "RUNS_DIR": str(runs), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=900)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


FOUR = "[1.0e-4, 1.0e-3, 5.0e-3, 2.0e-2]"  # 4 of the example's 9 learning rates: 6 trainings, not 13


@pytest.mark.slow
def test_four_trials_run_to_the_end_with_the_controller_killed_once(tmp_path: Path, pydoc_shards: Path) -> None:
    """Rung 4 promotes one trial early (3 reports: floor(3/3) = 1) or at its close; rung 12 closes
    with that one trial alone and promotes it (at least one trial reaches max_steps)."""
    runs = tmp_path / "runs"
    first = launch([str(tiny_asha(tmp_path, pydoc_shards, lrs=FOUR))], runs, **{advance.EXIT_AFTER_DECIDE: "1"})
    assert first.returncode == 9, first.stdout + first.stderr  # killed after its first decision
    sweep = runs / "asha"
    log = advance.read_log(sweep)
    assert log.decided and not log.done  # decided, not acted on
    res = launch(["advance", str(sweep), "--watch", "--poll", "1"], runs)  # the controller, again
    assert res.returncode == 0, res.stdout + res.stderr
    log = advance.read_log(sweep)
    recs = record.SweepRecord(sweep).read()
    promotions = {n: sum(1 for d in log.decided.values() if d.trial == n and d.action == PROMOTE) for n in recs}
    assert len(recs) == 4 and set(log.done) == set(log.decided)
    for name, rec in recs.items():  # exactly one submission per rung reached
        assert rec.submissions == 1 + promotions[name], (name, rec.submissions, promotions)
    winners = [n for n, r in recs.items() if advance.target_of(r.overrides) == 36]
    assert len(winners) >= 1 and all(recs[n].state == record.COMPLETED for n in winners)
    assert {r.state for n, r in recs.items() if n not in winners} == {record.STOPPED_EARLY}
    assert "final ranking" in res.stdout and "trial-steps of 144" in res.stdout
    # the winner's curve is the curve of an uninterrupted run of its config
    lr = winners[0].split("=", 1)[1]
    full = launch([str(tiny_asha(tmp_path, pydoc_shards, search=False, lrs=f"[{lr}]"))], runs)
    assert full.returncode == 0, full.stdout + full.stderr
    want = losses(runs / "full" / winners[0])
    assert sorted(want) == list(range(1, 37)) and losses(sweep / winners[0]) == want
    status = launch(["status", str(sweep)], runs)
    assert "rung 12:" in status.stdout and "promoted to 36" in status.stdout
    assert "sample: python -m gpt2.generate (after export succeeds): COMPLETED" in status.stdout  # the chain ran


def test_a_stopped_trial_resumes_by_hand_to_max_steps(tmp_path: Path, submitted: list[tuple[str, list[str]]]) -> None:
    d = fake_sweep(tmp_path, {"a": 1.0, "b": 2.0, "c": 3.0})
    advance.advance(d)
    assert record.read_state(d / "c").state == record.STOPPED_EARLY
    with pytest.raises(UserError, match="only stopped trials resume by hand"):
        advance.resume_by_hand(d, "a", None)
    for steps in (3, 4):  # at or below where it stopped: the job would find its checkpoint there and do nothing
        with pytest.raises(UserError, match=f"--steps {steps}: job c was stopped at step 4; give a step above it"):
            advance.resume_by_hand(d, "c", steps)
    assert "c" not in [job for job, _ in submitted]  # nothing submitted
    advance.resume_by_hand(d, "c", None)
    assert submitted[-1] == ("c", ["model=tiny", "trainer.config.lr_decay_steps=36", "trainer.config.max_steps=36"])


def test_a_second_submission_on_slurm_starts_no_second_controller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from launch import slurm

    d = fake_sweep(tmp_path, {"a": 1.0})
    meta = record.read_sweep_meta(d)
    record.write_sweep_meta(d, {**meta, "executor": "slurm"})
    calls: list[list[str]] = []
    queue = {"ids": ""}

    def run_cmd(argv: list[str], timeout: float = 60.0) -> str:
        calls.append(list(argv))
        return queue["ids"] if argv[0] == "squeue" else "900\n"

    monkeypatch.setattr(slurm, "run_cmd", run_cmd)
    assert advance.after_submit(d, detach=False) == 0
    assert [c[0] for c in calls] == ["squeue", "sbatch"] and "--job-name=fake-advance" in calls[1]
    tag = intent.sweep_tag("advance", d)
    assert f"--comment={tag}" in calls[1]
    queue["ids"] = f"899|{intent.sweep_tag('advance', tmp_path / 'elsewhere' / d.name)}\n"  # a namesake's controller
    assert advance.after_submit(d, detach=False) == 0
    assert [c[0] for c in calls] == ["squeue", "sbatch", "squeue", "sbatch"]
    queue["ids"] = f"900|{tag}\n"
    assert advance.after_submit(d, detach=False) == 0
    assert [c[0] for c in calls] == ["squeue", "sbatch", "squeue", "sbatch", "squeue"]
    assert "SLURM job 900 already advances the sweep" in capsys.readouterr().out


def test_a_failing_controller_round_submits_the_next_one_and_stops_only_after_many(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A QOS limit, a busy lock or squeue down for a while must not leave the sweep without its driver."""
    from launch import slurm

    d = fake_sweep(tmp_path, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    record.write_sweep_meta(d, {**record.read_sweep_meta(d), "executor": "slurm"})
    calls: list[list[str]] = []
    queue = {"lines": ""}

    def run_cmd(argv: list[str], timeout: float = 60.0) -> str:
        calls.append(list(argv))
        return queue["lines"] if argv[0] == "squeue" else f"{900 + len(calls)}\n"

    def refused(sweep_dir: Path) -> advance.Outcome:
        raise slurm.CommandError("sbatch refused the submission: QOSMaxSubmitJobPerUserLimit")

    def sbatches() -> list[str]:
        return [c[-1] for c in calls if c[0] == "sbatch"]  # each one's --wrap= command

    monkeypatch.setattr(slurm, "run_cmd", run_cmd)
    monkeypatch.setattr(advance, "advance", refused)
    assert advance.run_controller_once(d) == 1
    assert len(sbatches()) == 1 and sbatches()[0].endswith("--controller --failures 1")
    note = json.loads((d / advance.CONTROLLER).read_text())
    assert note["state"] == "RETRYING" and "QOSMaxSubmitJobPerUserLimit" in note["message"] and note["failures"] == 1
    queue["lines"] = f"{note['next_job']}|{intent.sweep_tag('advance', d)}\n"
    shown = [x for x in advance.rung_lines(d) if x.startswith("controller:")]
    assert shown and shown[0].startswith(f"controller: SLURM job {note['next_job']} (last round")
    assert "QOSMaxSubmitJobPerUserLimit" in shown[0]

    # a round that works again starts the count afresh
    monkeypatch.setattr(advance, "advance", lambda sweep_dir: advance.Outcome([], [], [], False))
    assert advance.run_controller_once(d, failures=7) == 0
    assert sbatches()[-1].endswith("--controller") and json.loads((d / advance.CONTROLLER).read_text())["failures"] == 0

    # the last failure allowed: no next round, and status says how to start the controller again
    monkeypatch.setattr(advance, "advance", refused)
    before = len(sbatches())
    assert advance.run_controller_once(d, failures=advance.CONTROLLER_MAX_FAILURES - 1) == 1
    assert len(sbatches()) == before and json.loads((d / advance.CONTROLLER).read_text())["state"] == "STOPPED"
    queue["lines"] = ""
    shown = [x for x in advance.rung_lines(d) if x.startswith("controller:")]
    assert shown[0].startswith("controller: none queued, so the sweep is not advancing (last round")
    assert shown[0].endswith(f"start it again with `python launch/sweep.py advance {d.absolute()} --controller`")


def test_a_controller_that_cannot_submit_its_next_round_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from launch import slurm

    d = fake_sweep(tmp_path, {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0})
    record.write_sweep_meta(d, {**record.read_sweep_meta(d), "executor": "slurm"})
    monkeypatch.setattr(advance, "advance", lambda sweep_dir: advance.Outcome([], [], [], False))

    def run_cmd(argv: list[str], timeout: float = 60.0) -> str:
        raise slurm.CommandError("sbatch: exit 1: Socket timed out on send/recv operation")

    monkeypatch.setattr(slurm, "run_cmd", run_cmd)
    assert advance.run_controller_once(d) == 1
    note = json.loads((d / advance.CONTROLLER).read_text())
    assert note["state"] == "STOPPED" and note["message"].startswith("could not submit the next round (CommandError")
    assert "start it again with `python launch/sweep.py advance" in capsys.readouterr().out


# ---- a damaged early-stopping sweep: status shows what it can, advance decides nothing from damage ----

BIG = "1" + "0" * 400  # valid JSON, past the float range
SWEEP_DAMAGE = {
    # name: (what to break, what `status` must still say or warn)
    "search_reduction_1": ("sweep.json's search with reduction 1 (the rungs never end)", "search is damaged"),
    "search_unknown_key": ("sweep.json's search with a key the schema lacks", "unknown key 'bogus'"),
    "search_text_steps": ("sweep.json's search.min_steps as text", "'min_steps'"),
    "after_not_objects": ("sweep.json's after: [1]", "after is damaged"),
    "chain_files": ("chain/export.json a list, chain/submitted.json a string", "search: asha"),
    "controller_big_time": ("controller.json with a time past the float range", "search: asha"),
    "decision_text_value": ("a decision ranking a trial by text", "search: asha"),
    "decision_big_time": ("a decision written at a time past the float range", "search: asha"),
    "decision_stop_unknown": ("a stop decision naming no trial of the sweep", "search: asha"),
    "metrics_big_value": ("an eval row whose val_loss is past the float range", "search: asha"),
    "overrides_text_steps": ("a trial whose max_steps override is text", "is not trainer.config.max_steps=N"),
}


def damage_sweep(d: Path, kind: str) -> None:
    meta = json.loads((d / "sweep.json").read_text())
    if kind.startswith(("search_", "after_")):
        change = {"search_reduction_1": {"search": {**SEARCH, "reduction": 1}},
                  "search_unknown_key": {"search": {**SEARCH, "bogus": 1}},
                  "search_text_steps": {"search": {**SEARCH, "min_steps": "4"}},
                  "after_not_objects": {"after": [1]}}[kind]
        (d / "sweep.json").write_text(json.dumps({**meta, **change}))
    elif kind == "chain_files":
        (d / "sweep.json").write_text(json.dumps({**meta, "after": [{"name": "export", "module": "gpt2.export"}]}))
        (d / "chain").mkdir()
        (d / "chain" / "export.json").write_text("[]")
        (d / "chain" / "submitted.json").write_text('"export"')
    elif kind == "controller_big_time":
        (d / "sweep.json").write_text(json.dumps({**meta, "executor": "slurm"}))
        (d / advance.CONTROLLER).write_text(f'{{"state": "OK", "time": {BIG}, "message": "m"}}')
    elif kind.startswith("decision_"):
        row = {"key": "a@4", "state": "decided", "time": 1, "trial": "a", "rung": 4, "action": STOP, "next_rung": None,
               "rank": 0, "cut": 3, "reported": 9, "trials": 9, "closed": True, "ranking": [["a", 3.0]]}
        line = {"decision_text_value": json.dumps({**row, "ranking": [["a", "abc"]]}),
                "decision_big_time": json.dumps(row).replace('"time": 1', f'"time": {BIG}'),
                "decision_stop_unknown": json.dumps({**row, "key": "zz@4", "trial": "zz"})}[kind]
        (d / advance.DECISIONS).write_text(line + "\n")
    elif kind == "metrics_big_value":
        with (d / "a" / "metrics.jsonl").open("a") as f:
            f.write(f'{{"step": 4, "val_loss": {BIG}}}\n')
    elif kind == "overrides_text_steps":
        m = record.SweepRecord(d)
        with m.locked():
            recs = m.read()
            recs["a"].overrides = ["model=tiny", "trainer.config.max_steps=abc"]
            m.write(recs)


@pytest.mark.parametrize("kind", list(SWEEP_DAMAGE))
def test_a_damaged_early_stopping_sweep_is_shown_never_a_traceback(tmp_path: Path, kind: str,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   submitted: list[tuple[str, list[str]]],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each was a traceback (or, for reduction 1, a status that never returned) before."""
    monkeypatch.setattr(intent, "queued_with", lambda tag: [])  # the SLURM controller's lookup
    d = fake_sweep(tmp_path, LOSSES)
    damage_sweep(d, kind)
    capsys.readouterr()
    code = sw.main(["status", str(d)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    words = SWEEP_DAMAGE[kind][1]
    if kind == "overrides_text_steps":  # a trial's target is unknown: advance refuses it in one line
        assert sw.main(["advance", str(d)]) == 2 and words in capsys.readouterr().err and not submitted
    assert code == 0, err
    assert words in out + err, out + err
    assert all(name in out for name in LOSSES)  # the table is shown whatever the damage
    if kind == "decision_stop_unknown":  # acting on it stops nothing and creates no run directory
        assert sw.main(["advance", str(d)]) == 0
        assert not (d / "zz").exists()
    if kind == "decision_text_value":  # the damaged line is not a decision: made again from the records
        assert sw.main(["advance", str(d)]) == 0
        assert any(json.loads(line).get("ranking", [[None, 0]])[0][1] != "abc"
                   for line in (d / advance.DECISIONS).read_text().splitlines()[1:])


ASHA_FILES = ["decisions.jsonl", "controller.json", "chain/export.json", "chain/submitted.json"]


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
@pytest.mark.parametrize("name", ASHA_FILES)
def test_a_fifo_or_a_device_under_an_early_stopping_file_never_hangs(
        tmp_path: Path, name: str, special: str, capsys: pytest.CaptureFixture[str],
        submitted: list[tuple[str, list[str]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by fuzzing: a FIFO under these names blocked status (and advance) for ever, a symlink
    to /dev/zero was a MemoryError. Status shows the sweep; advance refuses an unreadable
    decisions.jsonl in one line (what was decided cannot be known) and goes on past the others."""
    from test_record import deadline

    monkeypatch.setattr(intent, "queued_with", lambda tag: [])
    d = fake_sweep(tmp_path, LOSSES)
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path) if special == "fifo" else path.symlink_to(special)
    for argv in (["status", str(d)], ["advance", str(d)]):
        capsys.readouterr()
        with deadline(60):
            code = sw.main(argv)
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err, err
        if argv[0] == "status":
            assert code == 0 and all(n in out for n in LOSSES), err
            if name == "decisions.jsonl":
                assert "decisions.jsonl is unreadable (not a regular file)" in out + err
        elif name == "decisions.jsonl":
            assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
            assert not submitted  # nothing acted on
        else:
            assert code == 0, err


def test_a_symlink_at_decisions_jsonl_is_never_appended_through(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                submitted: list[tuple[str, list[str]]]) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    d = fake_sweep(tmp_path, LOSSES)
    (d / advance.DECISIONS).symlink_to(victim)
    assert sw.main(["advance", str(d)]) == 2
    err = capsys.readouterr().err
    assert "decisions.jsonl: a symbolic link where a file was expected" in err and len(err.splitlines()) == 1, err
    assert victim.read_text() == "precious\n"
