"""gpt2/logs.py: tagged log lines, secrets kept out, metrics.jsonl, one W&B run across restarts.

W&B runs offline here (WANDB_MODE=offline from conftest); nothing reaches the network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from loguru import logger

from gpt2 import logs
from gpt2.compose import load_config
from gpt2.config import Config

SENTINEL = "sk-test-0123456789abcdef"  # a fake secret: must never show up in a file we write


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT",
                "GPT2_RESTART_COUNT", "SUBMITIT_LOCAL_JOB_ID", "WANDB_API_KEY", "GPT2_PEAK_FLOPS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield
    logger.remove()  # close the file sinks setup_logging opened


def _cfg(run_dir: Path, *overrides: str) -> Config:
    return load_config([f"run.dir={run_dir}", "run.sweep=sw", "run.job=j1", *overrides])


# ---- lines -------------------------------------------------------------------------------------


def test_job_tags_and_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    assert logs.job_tags() == {"job": "local", "task": "-", "restart": "0"}
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert logs.job_tags() == {"job": "100", "task": "3", "restart": "2"}
    monkeypatch.setenv("GPT2_RESTART_COUNT", "5")  # the job entry's count wins over SLURM's
    assert logs.restart_count() == 5


def test_every_rank_gets_a_tagged_file_and_only_rank0_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    monkeypatch.setenv("GPT2_RESTART_COUNT", "1")
    logs.setup_logging(tmp_path, rank=1)
    logger.info("hello from rank one")
    assert "hello from rank one" not in capsys.readouterr().err
    logs.setup_logging(tmp_path, rank=0)
    logger.info("starting fresh: no checkpoint")
    assert "job 77[4] r1 rank0 | starting fresh" in capsys.readouterr().err
    line1 = (tmp_path / "logs" / "rank1.log").read_text()
    assert "job 77[4] r1 rank1 | hello from rank one" in line1
    assert "starting fresh" in (tmp_path / "logs" / "rank0.log").read_text()


def test_secret_env_values_are_redacted_from_log_lines(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # short values are left alone
    logs.setup_logging(tmp_path, rank=0)
    logger.info(f"env dump: WANDB_API_KEY={SENTINEL} parallel=false")
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert SENTINEL not in text
    assert "WANDB_API_KEY=*** parallel=false" in text


# ---- secrets in dumps ----------------------------------------------------------------------------


@pytest.mark.parametrize("name, secret", [
    ("WANDB_API_KEY", True), ("HF_TOKEN", True), ("aws_secret_access_key", True), ("DB_PASSWORD", True),
    ("GITHUB_PAT", True), ("SLACK_AUTH", True), ("GOOGLE_APPLICATION_CREDENTIALS", True), ("MYSQL_PASS", True),
    ("authToken", True), ("AWSSECRETACCESSKEY", True), ("private_key", True), ("apiKey", True),
    ("TIKTOKEN_CACHE_DIR", False), ("TOKENIZERS_PARALLELISM", False), ("tokenizer", False), ("PATH", False),
    ("PATIENCE", False), ("MONKEY", False), ("keep_last", False), ("lr", False), ("tokens_per_s", False),
])
def test_is_secret_name(name: str, secret: bool) -> None:
    assert logs.is_secret_name(name) is secret


def test_scrub_redacts_secret_strings_at_any_depth_and_keeps_numbers() -> None:
    dump = {"env": {"WANDB_API_KEY": SENTINEL, "PATH": "/usr/bin", "HF_TOKEN": ""},
            "trainer": {"lr": 6e-4, "tokens": 1024, "hooks": [{"api_token": SENTINEL}]},
            "password": SENTINEL}
    clean = logs.scrub(dump)
    assert SENTINEL not in json.dumps(clean)
    assert clean["env"] == {"WANDB_API_KEY": "***", "PATH": "/usr/bin", "HF_TOKEN": ""}
    assert clean["trainer"]["tokens"] == 1024 and clean["trainer"]["hooks"] == [{"api_token": "***"}]
    assert dump["password"] == SENTINEL  # a copy: the input is untouched


def test_secret_values_are_redacted_whatever_they_look_like() -> None:
    env = {"A_KEY": SENTINEL, "B_TOKEN": "1", "DB_PASS": "hunter2", "CREDENTIALS_FILE": "/etc/creds.json",
           "PIN_SECRET": "4096", "PATH": "x" * 40, "TIKTOKEN_CACHE_DIR": "/tmp/tiktoken-cache"}
    assert logs.secret_values(env) == [SENTINEL, "/etc/creds.json", "hunter2", "4096"]
    assert logs.redact(f"k={SENTINEL}. pw hunter2", [SENTINEL, "hunter2"]) == "k=***. pw ***"


# ---- W&B mode ------------------------------------------------------------------------------------


@pytest.mark.parametrize("configured, env, expected", [
    ("auto", {"WANDB_API_KEY": "x" * 40}, "online"),
    ("auto", {}, "offline"),
    ("online", {}, "offline"),  # no key: offline, and MetricsLogger warns
    ("online", {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}, "offline"),
    ("auto", {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "disabled"}, "disabled"),
    ("offline", {"WANDB_API_KEY": "x" * 40}, "offline"),
    ("disabled", {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "online"}, "disabled"),
])
def test_resolve_wandb_mode(configured: str, env: dict[str, str], expected: str, tmp_path: Path) -> None:
    env = {"NETRC": str(tmp_path / "no-netrc"), **env}
    assert logs.resolve_wandb_mode(configured, env) == expected


def test_a_netrc_entry_counts_as_a_key(tmp_path: Path) -> None:
    rc = tmp_path / "netrc"
    rc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    rc.chmod(0o600)
    assert logs.has_wandb_key({"NETRC": str(rc)})
    assert not logs.has_wandb_key({"NETRC": str(rc), "WANDB_BASE_URL": "https://wandb.example.com"})


# ---- metrics.jsonl and W&B -----------------------------------------------------------------------


def _train_row(step: int) -> dict[str, float]:
    return {"step": step, "loss": 5.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0, "mfu": 0.01,
            "step_time": 0.1, "tokens": 100 * step, "peak_mem_mb": 300.0}


def _offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def test_two_sessions_of_one_run_dir_are_one_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL)  # present, but WANDB_MODE=offline keeps us local
    cfg = _cfg(tmp_path)
    logs.setup_logging(tmp_path, rank=0)
    for restart in (0, 1):  # a first session, then a requeue into the same run directory
        m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id=logs.wandb_run_id(tmp_path), restart=restart)
        m.log(_train_row(1 + restart))
        m.log({"step": 1 + restart, "val_loss": 4.5, "tokens": 100})
        m.close()
        m.close()  # idempotent
    rid = (tmp_path / "wandb_id.txt").read_text().strip()
    runs = _offline_runs(tmp_path)
    assert len(runs) == 2, runs
    # offline-run-<date>_<time>-<id>, with a "-N" suffix when two sessions start in the same second
    assert {re.fullmatch(r"offline-run-\d{8}_\d{6}-(\w+?)(?:-\d+)?", p.name).group(1) for p in runs} == {rid}, runs
    # never a secret in anything we or W&B wrote
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SENTINEL.encode() not in path.read_bytes(), path

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["restart"] for r in rows] == [0, 0, 1, 1]
    train, evals = rows[0::2], rows[1::2]
    for r in train:
        assert set(logs.TRAIN_KEYS) <= set(r), set(logs.TRAIN_KEYS) - set(r)
    for r in evals:
        assert set(logs.EVAL_KEYS) <= set(r)
    assert all(isinstance(r["time"], float) for r in rows)


def test_disabled_writes_no_wandb_dir_and_other_ranks_write_nothing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "wandb.mode=disabled")
    m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id="abc", restart=0)
    m.log(_train_row(1))
    m.close()
    assert not (tmp_path / "wandb").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1

    other = tmp_path / "rank1"
    other.mkdir()
    m1 = logs.MetricsLogger(_cfg(other), other, rank=1, wandb_id=None, restart=0)
    m1.log(_train_row(1))
    m1.close()
    assert list(other.iterdir()) == []


def test_wandb_run_id_is_created_once(tmp_path: Path) -> None:
    rid = logs.wandb_run_id(tmp_path)
    assert len(rid) == 12 and logs.wandb_run_id(tmp_path) == rid
    assert not list(tmp_path.glob("*.tmp"))


# ---- MFU denominators ----------------------------------------------------------------------------


def test_peak_flops_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert logs.peak_flops(cpu) > 1e9
    monkeypatch.setenv("GPT2_PEAK_FLOPS", "123e12")
    assert logs.peak_flops(cpu) == 123e12
    assert logs.peak_memory_mb(cpu) > 10  # this process is at least that big


def test_values_from_the_environment_are_never_written_resolved(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`${oc.env:...}` is used resolved, but config.yaml, a checkpoint's MANIFEST and W&B keep the text."""
    from gpt2.checkpoint.manager import CheckpointManager
    from gpt2.config import compat_view, config_hash, from_yaml, save_resolved, to_dict
    from gpt2.distributed import DistInfo

    value = "team-x-7f3a9c"  # under a name that marks no secret: only the interpolation keeps it out
    monkeypatch.setenv("GPT2_TEST_DATASET_LABEL", value)
    cfg = _cfg(tmp_path, "dataset.name=${oc.env:GPT2_TEST_DATASET_LABEL}")
    assert cfg.dataset.name == value  # the run uses it
    save_resolved(cfg, tmp_path / "config.yaml")
    mgr = CheckpointManager(tmp_path / "checkpoints", cfg.trainer.config.checkpoint_strategy.config,
                            DistInfo(0, 1, 0, torch.device("cpu")))

    class Nothing:
        name = "ddp"

        def save(self, ckpt_dir: Path) -> None:
            (ckpt_dir / "model.pt").write_bytes(b"")

    mgr.save(1, Nothing(), meta={"resolved_config": to_dict(cfg), "config": compat_view(cfg),
                                 "config_hash": config_hash(cfg), "wandb_id": "w1"},
             trainer_state={"step": 1, "tokens": 0, "data": {}})
    logs.setup_logging(tmp_path, rank=0)
    m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id=logs.wandb_run_id(tmp_path), restart=0)
    m.log(_train_row(1))
    m.close()
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "MANIFEST.json" for p in written) and _offline_runs(tmp_path)
    for path in written:
        assert value.encode() not in path.read_bytes(), path
    assert "${oc.env:GPT2_TEST_DATASET_LABEL}" in (tmp_path / "config.yaml").read_text()
    assert from_yaml(tmp_path / "config.yaml").dataset.name == value  # read back, resolved again


# ---- one value per step after a resume -----------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write_rows(path: Path, rows: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def _attempt(restart: int, steps: range, eval_every: int = 0) -> list[dict]:
    out: list[dict] = []
    for s in steps:
        out.append({**_train_row(s), "step_time": 0.25, "restart": restart, "time": 1000.0 + s})
        if eval_every and s % eval_every == 0:
            out.append({"step": s, "val_loss": 4.0, "tokens": 100 * s, "restart": restart, "time": 1000.5 + s})
    return out


def test_discard_replayed_keeps_one_row_per_step_and_summarizes_each_restart(tmp_path: Path) -> None:
    from gpt2.metrics_file import discard_replayed

    path = tmp_path / "metrics.jsonl"
    event = {"event": "start", "restart": 1, "time": 5.0}  # another module's event rows: always kept
    stepped = {"step": 7, "event": "save", "restart": 1, "time": 6.0}
    # restart 0 trained 1-9 (checkpoint at 4); restart 1 resumed at 4, trained 5-7 and died; now
    # restart 2 resumes from the checkpoint of step 6, after a torn last line
    rows = _attempt(0, range(1, 5), 2) + [{"event": "discarded", "restart": 0, "steps": [5, 9], "train_s": 1.25,
                                           "time": 9.0}, event] + _attempt(1, range(5, 8), 2) + [stepped]
    _write_rows(path, rows, tail='{"step": 8, "lo')
    done = discard_replayed(path, 6, now=lambda: 1234.5)
    got = _rows(path)
    assert [r["step"] for r in got if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in got if "val_loss" in r] == [2, 4, 6]
    assert got[-1] == {"event": "discarded", "restart": 1, "steps": [7, 7], "train_s": 0.25, "time": 1234.5}
    assert event in got and stepped in got and sum("event" in r for r in got) == 4
    assert done.unreadable == 1 and [json.loads(line) for _, line in done.kept] == got[:-1]
    assert done.rows_after(5) == [r for r in got if r.get("step") == 6]
    assert not list(tmp_path.glob(".*.tmp"))


def test_discard_replayed_of_several_restarts_and_of_a_fresh_start(tmp_path: Path) -> None:
    from gpt2.metrics_file import discard_replayed

    path = tmp_path / "metrics.jsonl"
    _write_rows(path, _attempt(0, range(1, 4)) + _attempt(1, range(4, 6)))  # old files: no rewrite between
    discard_replayed(path, 2, now=lambda: 7.0)
    got = _rows(path)
    assert [r["step"] for r in got if "step" in r] == [1, 2]
    assert got[2:] == [{"event": "discarded", "restart": 0, "steps": [3, 3], "train_s": 0.25, "time": 7.0},
                       {"event": "discarded", "restart": 1, "steps": [4, 5], "train_s": 0.5, "time": 7.0}]
    discard_replayed(path, 0, now=lambda: 8.0)  # a fresh start: every step row goes, events stay
    assert [r.get("steps") for r in _rows(path)] == [[3, 3], [4, 5], [1, 2]]


@pytest.mark.parametrize("damaged", [
    '{"step": 7, garbage}',  # read from its first key, then not JSON as a whole
    '{"step": 7, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"step": 1e999, "loss": 1.0, "restart": 0}',
    '{"step": 7, "loss": 1.0, "restart": "abc"}',
    '{"step": 7, "loss": 1.0, "restart": null}',
    '{"step": 7, "loss": 1.0, "restart": 1e999}',
    '{"step": 7, "loss": 1.0, "restart": 0, "note": "DAMAGED-BYTE"}',  # made a raw 0xff below
    '{"step": ' + "9" * 5000 + ', "loss": 1.0}',
])
def test_discard_replayed_survives_a_damaged_row(tmp_path: Path, damaged: str) -> None:
    """Found by fuzzing: each of these made every start of the run fail with a traceback."""
    from gpt2.metrics_file import discard_replayed

    path = tmp_path / "metrics.jsonl"
    _write_rows(path, _attempt(0, range(1, 6)), tail=damaged + "\n")
    path.write_bytes(path.read_bytes().replace(b"DAMAGED-BYTE", b"\xff"))
    discard_replayed(path, 3, now=lambda: 9.0)
    got = _rows(path)
    assert [r["step"] for r in got if "loss" in r and isinstance(r["step"], int) and r["step"] <= 3] == [1, 2, 3]
    assert {"event": "discarded", "restart": 0, "steps": [4, 5], "train_s": 0.5, "time": 9.0} in got \
        or {"event": "discarded", "restart": 0, "steps": [4, 7], "train_s": 0.5, "time": 9.0} in got


def test_a_metrics_file_that_is_no_regular_file_is_one_line(tmp_path: Path) -> None:
    import os

    from gpt2.errors import UserError
    from gpt2.metrics_file import discard_replayed

    os.mkfifo(tmp_path / "metrics.jsonl")  # reading it would block the start for ever
    with pytest.raises(UserError, match="not a regular file"):
        discard_replayed(tmp_path / "metrics.jsonl", 0)


def test_discard_replayed_changes_nothing_when_nothing_is_replayed(tmp_path: Path) -> None:
    from gpt2.metrics_file import discard_replayed

    path = tmp_path / "metrics.jsonl"
    assert not discard_replayed(path, 3).changed and not path.exists()  # nothing logged yet
    _write_rows(path, _attempt(0, range(1, 4)))
    before = path.stat()
    assert not discard_replayed(path, 3).changed
    assert path.stat().st_ino == before.st_ino and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("when", ["before_rename", "after_rename"])
def test_a_crash_during_the_rewrite_leaves_the_old_file_or_the_new(tmp_path: Path, when: str) -> None:
    """A real SIGKILL of the rewriting process, just before or just after the rename."""
    import signal
    import subprocess
    import sys

    path = tmp_path / "metrics.jsonl"
    rows = _attempt(0, range(1, 6))
    _write_rows(path, rows)
    old = path.read_text()
    (tmp_path / ".metrics.jsonl.tmp").write_text("stale: a crash of an earlier rewrite\n")
    script = f"""
import os, signal
from pathlib import Path
from gpt2 import metrics_file
replace = os.replace
def dying_replace(src, dst):
    if {when == "after_rename"}:
        replace(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
metrics_file.os.replace = dying_replace
metrics_file.discard_replayed(Path({str(path)!r}), 3)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == -signal.SIGKILL
    got = path.read_text()
    if when == "before_rename":
        assert got == old
    else:
        assert [r.get("step") for r in _rows(path)] == [1, 2, 3, None] and _rows(path)[-1]["steps"] == [4, 5]
    from gpt2.metrics_file import discard_replayed  # and the next attempt's rewrite is sound

    discard_replayed(path, 2)
    assert [r.get("step") for r in _rows(path) if "loss" in r] == [1, 2]
    assert not (tmp_path / ".metrics.jsonl.tmp").exists()


def _wandb_steps(run_dir: Path) -> list[list[tuple[int, float | None, float | None]]]:
    """Per offline session, in order: (step, loss, val_loss) of each W&B history row."""
    from gpt2.wandb_history import history, offline_sessions

    rid = (run_dir / "wandb_id.txt").read_text().strip()
    return [[(r["step"], r.get("loss"), r.get("val_loss")) for r in history(s)] for s in offline_sessions(run_dir, rid)]


def _tensorboard(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_resumed_session_logs_each_step_once_everywhere(tmp_path: Path) -> None:
    """Session 0 logs 1-6 (checkpoint at 4) and dies without finishing W&B, so W&B flushed
    nothing; session 1 resumes at 4 and trains 5-8 again with other losses. Each step has one
    value in metrics.jsonl, W&B and TensorBoard: 1-4 of session 0, 5-8 of session 1."""
    cfg = _cfg(tmp_path, "logging.tensorboard=true")
    logs.setup_logging(tmp_path, rank=0)

    def row(step: int, restart: int) -> dict:
        return {**_train_row(step), "loss": 10.0 * restart + step}

    m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id=logs.wandb_run_id(tmp_path), restart=0, resumed_step=0)
    for s in range(1, 7):
        m.log(row(s, 0))
        if s % 2 == 0:
            m.log({"step": s, "val_loss": 0.5 * s, "tokens": 100 * s})
    m._tb.close()  # a SIGKILL here: W&B's session keeps what it flushed (nothing, in 15 s), TensorBoard all
    m.wandb_run().finish()  # ... but an offline session that ended keeps every row: lose them by hand instead
    import wandb

    wandb.teardown()  # the file written to the end before it is cut
    sessions = sorted((tmp_path / "wandb").glob("offline-run-*"))
    wfile = next(sessions[0].glob("run-*.wandb"))
    wfile.write_bytes(wfile.read_bytes()[:7])  # the header only: what a killed session leaves
    import time

    time.sleep(1.1)  # TensorBoard orders sessions by the second in their file names

    m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id=logs.wandb_run_id(tmp_path), restart=1, resumed_step=4)
    for s in range(5, 9):
        m.log(row(s, 1))
        if s % 2 == 0:
            m.log({"step": s, "val_loss": 0.5 * s + 10, "tokens": 100 * s})
    m.close()

    want = {s: float(s if s <= 4 else 10 + s) for s in range(1, 9)}
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows if "loss" in r] == list(want.items())
    assert [r for r in rows if "event" in r][0]["steps"] == [5, 6]
    first, second = _wandb_steps(tmp_path)
    assert first == []  # lost, so session 1 logged 1-4 again from metrics.jsonl before its own steps
    assert [(s, loss) for s, loss, _ in second] == list(want.items())
    assert [(s, v) for s, _, v in second if v is not None] == [(2, 1.0), (4, 2.0), (6, 13.0), (8, 14.0)]
    assert _tensorboard(tmp_path, "loss") == list(want.items())
    assert _tensorboard(tmp_path, "val_loss") == [(2, 1.0), (4, 2.0), (6, 13.0), (8, 14.0)]


def test_wandb_gets_no_step_it_already_holds(tmp_path: Path) -> None:
    """Session 0 ended after logging 1-6 (W&B holds them all); session 1 resumes at 4 and
    trains 5-8 again: W&B gets 7-8 only, never a step twice nor a step lower than the last."""
    cfg = _cfg(tmp_path)
    for restart, (resumed, last) in enumerate(((0, 6), (4, 8))):
        m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id=logs.wandb_run_id(tmp_path), restart=restart,
                               resumed_step=resumed)
        for s in range(resumed + 1, last + 1):
            m.log(_train_row(s))
        m.close()
    first, second = _wandb_steps(tmp_path)
    assert [s for s, *_ in first] == [1, 2, 3, 4, 5, 6] and [s for s, *_ in second] == [7, 8]
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl") if "loss" in r] == list(range(1, 9))


def test_training_never_waits_for_wandb_to_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B starts in the background: rows logged before it is up are in metrics.jsonl at once and
    reach W&B afterwards, in order, after the rows of the earlier session it lacked."""
    import threading

    cfg = _cfg(tmp_path)
    m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id=logs.wandb_run_id(tmp_path), restart=0, resumed_step=0)
    for s in (1, 2):
        m.log(_train_row(s))
    m.event({"event": "end"})  # dies here: the session's W&B file is cut to its header (see above)
    m.wandb_run().finish()
    import wandb

    wandb.teardown()
    wfile = next(next((tmp_path / "wandb").glob("offline-run-*")).glob("run-*.wandb"))
    wfile.write_bytes(wfile.read_bytes()[:7])

    go = threading.Event()
    start = logs.MetricsLogger._start_wandb

    def slow_start(*args, **kwargs):  # a W&B service that takes its time
        assert go.wait(60)
        return start(*args, **kwargs)

    monkeypatch.setattr(logs.MetricsLogger, "_start_wandb", staticmethod(slow_start))
    m = logs.MetricsLogger(cfg, tmp_path, rank=0, wandb_id=logs.wandb_run_id(tmp_path), restart=1, resumed_step=2)
    for s in (3, 4):
        m.log(_train_row(s))
        assert m.wandb_run(wait=False) is None  # still starting: the row waits, training does not
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    go.set()
    m.close()
    assert [s for s, *_ in _wandb_steps(tmp_path)[1]] == [1, 2, 3, 4]


def test_logging_tensorboard_is_a_typed_key_free_to_change_on_resume(tmp_path: Path) -> None:
    from gpt2.config import ConfigError, config_hash

    off, on = _cfg(tmp_path), _cfg(tmp_path, "logging.tensorboard=true")
    assert (off.logging.tensorboard, on.logging.tensorboard) == (False, True)
    assert config_hash(off) == config_hash(on)  # a checkpoint resumes with TensorBoard turned on
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        _cfg(tmp_path, "logging.tensorboard=sometimes")
    m = logs.MetricsLogger(_cfg(tmp_path, "wandb.mode=disabled"), tmp_path, rank=0, wandb_id=None, restart=0,
                           resumed_step=0)
    m.log(_train_row(1))
    m.close()
    assert not (tmp_path / "tensorboard").exists()
