"""The GPU check (issue 12): everything a CPU cannot test, in one run of at most 6 minutes on one GPU.

Stages, each in its own process with its own time budget (a stage that fails or runs out of time is
recorded and the next one still runs; all of them together end by --deadline seconds):

1. env:   what is there (GPU, torch, CUDA, every package we import and where it came from);
2. tests: `pytest -m gpu tests/test_gpu.py` (bf16, fused AdamW, compile, flash, FSDP2 + DCP,
          DeepSpeed ZeRO-2 bf16, export of a GPU-trained checkpoint on CPU, HF parity);
3. bench: `python -m bench.bench_gpu` (tokens/s, MFU against the listed and a measured matmul peak,
          peak memory, gpt2_124m and gpt2_350m, eager beside compiled);
4. data:  the built-in pydoc corpus tokenised into shards (data_prep/download.py);
5. run:   `main.py` under torchrun: gpt2_124m at block size 1024, DDP on one rank, bf16 + compile,
          to step 30 with a checkpoint, then a second process resumes it to step 60.

It writes one report, bench/RESULTS-gpu.md (rewritten after every stage, so a kill keeps what was
done), and copies it with the full log (gpu_check.log) to --out (default $OUT), since only files under
$OUT come back from the device machine.

On the GPU machine (python3 with its own CUDA torch, no network; the device tool carries `.wheels`,
which `make wheelhouse` builds here: the wheels we need for Python 3.12 and the GPT-2 ranks file):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl && PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site python3 bench/gpu_check.py --out $OUT

(`make gpu-check` runs the same two commands.) Without CUDA it runs end to end in a minute or two:
the tests skip, the benchmark says "no GPU", and the run is a tiny model on the CPU:

    PYTHONPATH=$PWD .venv/bin/python bench/gpu_check.py --cpu-smoke     # report: bench/out/RESULTS-gpu-smoke.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.run_all import fmt, table  # noqa: E402 - the repo is on the path only from here on

PY = sys.executable
DEVICE_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl && "
                  "PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site python3 bench/gpu_check.py --out $OUT")
# seconds per stage; together at most the 6 minutes the device check is given (the deadline cuts too)
# (a stage may also use what the stages before it left unused, never what the ones after it need)
BUDGET = {"env": 15, "tests": 75, "bench": 130, "data": 10, "run": 125}
DIST = {"hydra": "hydra-core", "typing_extensions": "typing-extensions", "pydantic_core": "pydantic-core"}
PACKAGES = ("torch", "triton", "transformers", "tiktoken", "safetensors", "numpy", "omegaconf", "hydra",
            "submitit", "loguru", "deepspeed", "pydantic", "pydantic_core", "hjson", "typing_extensions", "pytest")


@dataclass
class Stage:
    name: str
    status: str = "not run"  # ok | failed | timeout | skipped | not run
    seconds: float = 0.0
    budget: float = 0.0
    note: str = ""
    output: str = ""  # the stage's whole output (the log file gets it all; the report a tail on failure)
    data: dict[str, Any] = field(default_factory=dict)


class Check:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.smoke: bool = args.cpu_smoke
        self.scale = 3 if self.smoke else 1  # a CPU (and a shared one) is slower at everything
        self.t0 = time.monotonic()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.stages: list[Stage] = []
        self.log = self.work / "gpu_check.log"
        self.log.write_text("")
        self.env = child_env()

    # ---- running one stage ---------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def timeout_for(self, stage: str) -> float:
        """What is left before the deadline, less the budgets of the stages still to come."""
        later = list(BUDGET)[list(BUDGET).index(stage) + 1:]
        return self.args.deadline - self.elapsed() - sum(BUDGET[s] * self.scale for s in later)

    def sh(self, st: Stage, cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> int | None:
        """Run `cmd` (its own process group, killed whole at the timeout); output appended to st.output
        and the log. Returns the exit code, or None when it ran out of time."""
        out = self.work / f"{st.name}.out"
        with open(self.log, "a") as log:
            log.write(f"\n===== {st.name}: {' '.join(cmd)}\n")
        with open(out, "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc: int | None = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # torchrun's workers too
                proc.wait()
                rc = None
        text = out.read_text(errors="replace")
        st.output += text
        with open(self.log, "a") as log:
            log.write(text + f"\n===== {st.name}: exit {'timeout' if rc is None else rc}\n")
        return rc

    def stage(self, name: str, fn: Any) -> Stage:
        st = Stage(name, budget=self.timeout_for(name))
        self.stages.append(st)
        if st.budget < 3:
            st.status, st.note = "skipped", "no time left before the deadline"
            self.say(f"{name}: skipped (no time left)")
            self.write()
            return st
        self.say(f"{name}: start (budget {st.budget:.0f} s)")
        start = time.monotonic()
        try:
            fn(st)
        except Exception as exc:  # a bug of this script must not lose the other stages
            st.status, st.note = "failed", f"{type(exc).__name__}: {exc}"
        st.seconds = time.monotonic() - start
        self.say(f"{name}: {st.status} in {st.seconds:.1f} s" + (f" - {st.note}" if st.note else ""))
        if st.status not in ("ok", "skipped"):
            for line in st.output.strip().splitlines()[-12:]:
                print(f"    | {line}", flush=True)
        self.write()
        return st

    @staticmethod
    def outcome(st: Stage, rc: int | None, ok_note: str = "") -> None:
        st.status = "timeout" if rc is None else "ok" if rc == 0 else "failed"
        if rc is None:
            st.note = f"killed after {st.budget:.0f} s" + (f"; {ok_note}" if ok_note else "")
        elif rc != 0:
            st.note = f"exit {rc}" + (f"; {ok_note}" if ok_note else "")
        else:
            st.note = ok_note

    # ---- the stages ----------------------------------------------------------------------------
    def run_env(self, st: Stage) -> None:
        rc = self.sh(st, [PY, str(Path(__file__)), "--probe"], st.budget)
        lines = [ln for ln in st.output.splitlines() if ln.startswith("PROBE ")]
        if lines:
            st.data = json.loads(lines[-1][len("PROBE "):])
        optional = ("triton",) if self.smoke else ()  # torch.compile on a GPU needs it; a CPU smoke does not
        missing = [k for k, v in st.data.get("packages", {}).items() if v.startswith("MISSING") and k not in optional]
        self.outcome(st, rc if not missing else 1, f"missing: {', '.join(missing)}" if missing else
                     st.data.get("gpu", ""))
        if not self.smoke and not st.data.get("cuda"):
            st.status, st.note = "failed", "no CUDA device visible: the GPU stages will skip (use --cpu-smoke here)"

    def run_tests(self, st: Stage) -> None:
        junit = self.work / "junit.xml"
        rc = self.sh(st, [PY, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", "-m", "gpu",
                          f"--junitxml={junit}", "tests/test_gpu.py"], st.budget)
        st.data["tests"] = parse_tests(junit, st.output)
        counts: dict[str, int] = {}
        for t in st.data["tests"]:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        self.outcome(st, rc, summary or "no test reported")

    def run_bench(self, st: Stage) -> None:
        rows_path = self.work / "bench.jsonl"
        rows_path.unlink(missing_ok=True)
        cmd = [PY, "-m", "bench.bench_gpu", "--jsonl", str(rows_path)] + (["--quick"] if self.smoke else [])
        rc = self.sh(st, cmd, st.budget)
        rows = [json.loads(ln) for ln in rows_path.read_text().splitlines()] if rows_path.exists() else []
        st.data["rows"] = rows
        errors = sum(1 for r in rows if r.get("error"))
        self.outcome(st, 1 if rc == 0 and errors else rc,
                     f"{len(rows)} rows" + (f", {errors} with an error" if errors else ""))

    def run_data(self, st: Stage) -> None:
        data = self.work / "pydoc"
        rc = self.sh(st, [PY, "data_prep/download.py", "--dataset", "pydoc", "--dir", str(data),
                          "--shard_size", "40000", "--val_size", "10000"], st.budget)
        last = (st.output.strip().splitlines() or [""])[-1]
        self.outcome(st, rc, last[:160])
        st.data["dir"] = str(data)

    def run_train(self, st: Stage) -> None:
        data = next((s.data.get("dir") for s in self.stages if s.name == "data" and s.status == "ok"), None)
        if data is None:
            st.status, st.note = "skipped", "no data (the data stage failed)"
            return
        mid, end = (3, 6) if self.smoke else (30, 60)
        run_dir = self.work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        common = train_overrides(Path(data), run_dir, self.smoke, end)
        torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "main.py"]
        first_budget = st.budget - 45 * self.scale  # the resume compiles from a warm cache: it needs less
        t = time.monotonic()
        rc1 = self.sh(st, [*torchrun, *common, f"trainer.config.max_steps={mid}",
                           "trainer.config.checkpoint_strategy.config.save_on_finish=true"], first_budget)
        st.data["first_rc"] = rc1
        rc2: int | None = -1
        if rc1 == 0:
            left = st.budget - (time.monotonic() - t)
            rc2 = self.sh(st, [*torchrun, *common, f"trainer.config.max_steps={end}",
                               "trainer.config.checkpoint_strategy.config.save_on_finish=false"], left,
                          env={**self.env, "GPT2_RESTART_COUNT": "1"})
        st.data.update(summarize_run(run_dir / "metrics.jsonl", st.output, mid, end))
        problems = st.data["problems"]
        rc = rc1 if rc1 != 0 else rc2
        self.outcome(st, 1 if rc == 0 and problems else rc, "; ".join(problems) or
                     f"loss {st.data.get('loss_at', {})}")
        if rc1 != 0:
            st.note = f"the first process (to step {mid}) {'timed out' if rc1 is None else f'exited {rc1}'}"

    # ---- the report ----------------------------------------------------------------------------
    def write(self) -> None:
        text = render(self)
        path = Path(self.args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if self.args.out:
            out = Path(self.args.out)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / path.name)
            shutil.copyfile(self.log, out / "gpu_check.log")

    def main(self) -> int:
        mode = "CPU smoke (tiny model, run.device=cpu)" if self.smoke else "GPU"
        self.say(f"gpu_check: {mode}; work dir {self.work}; deadline {self.args.deadline:.0f} s")
        for name, fn in (("env", self.run_env), ("tests", self.run_tests), ("bench", self.run_bench),
                         ("data", self.run_data), ("run", self.run_train)):
            self.stage(name, fn)
        bad = [s.name for s in self.stages if s.status != "ok"]
        self.say(f"gpu_check: done; {'all stages ok' if not bad else 'not ok: ' + ', '.join(bad)}; "
                 f"report {self.args.results}" + (f" (copied to {self.args.out})" if self.args.out else ""))
        return 1 if bad else 0


# ---- pieces ------------------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """The environment of every stage: the repo on PYTHONPATH, no W&B, no network, the ranks file."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(ROOT) not in paths:
        paths.insert(0, str(ROOT))
    env["PYTHONPATH"] = os.pathsep.join(paths)
    ranks = ROOT / ".wheels" / "gpt2.tiktoken"
    if "GPT2_TIKTOKEN_FILE" not in env and ranks.is_file():
        env["GPT2_TIKTOKEN_FILE"] = str(ranks)
    env.update(PYTHONUNBUFFERED="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def train_overrides(data: Path, run_dir: Path, smoke: bool, end: int) -> list[str]:
    """main.py's overrides for both processes (max_steps and save_on_finish are added per process).
    The lr schedule is fixed by lr_decay_steps=end, so stopping at `mid` changes nothing."""
    common = [
        "trainer=ddp", "dataset=pydoc", f"dataset.train_dataset.data_root={data}",
        f"dataset.val_dataset.data_root={data}", f"run.dir={run_dir}", "wandb.mode=disabled",
        "trainer.config.warmup_steps=10", f"trainer.config.lr_decay_steps={end}", "trainer.config.eval_interval=0",
        f"trainer.config.checkpoint_strategy.config.interval={end // 2}", "trainer.config.log_interval=1",
    ]
    if smoke:
        return [*common, "model=tiny", "model.config.n_layer=2", "model.config.block_size=64", "dataset.seq_len=64",
                "trainer.config.batch_size=4", "run.device=cpu", "trainer.config.warmup_steps=2"]
    return [*common, "model=gpt2_124m", "trainer.config.batch_size=16", "trainer.config.use_mixed_precision=true",
            "trainer.config.compile=true", "run.device=cuda"]


def parse_tests(junit: Path, output: str) -> list[dict[str, Any]]:
    """Per test: name, outcome, seconds, message. From the JUnit XML when pytest wrote it, else from
    the -v lines it printed before it was killed."""
    tests: list[dict[str, Any]] = []
    if junit.is_file():
        try:
            for case in ET.parse(junit).getroot().iter("testcase"):
                outcome, message = "passed", ""
                for tag in ("failure", "error", "skipped"):
                    el = case.find(tag)
                    if el is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                        message = (el.get("message") or "").strip().splitlines()[0][:200] if el.get("message") else ""
                tests.append(dict(test=case.get("name", "?"), outcome=outcome,
                                  seconds=float(case.get("time", 0) or 0), message=message))
            return tests
        except ET.ParseError:
            pass
    for m in re.finditer(r"::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", output):
        tests.append(dict(test=m.group(1), outcome=m.group(2).lower(), seconds=None, message=""))
    return tests


def summarize_run(metrics: Path, output: str, mid: int, end: int) -> dict[str, Any]:
    """Loss at steps 1, mid, mid+1 and end; median tokens/s and MFU per process (its first 3 steps,
    which compile, left out); and whether the second process really resumed from step `mid`."""
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines()] if metrics.is_file() else []
    train = {}
    for r in rows:  # the last row written for a step wins (see gpt2/logs.py)
        if "loss" in r:
            train[r["step"]] = r
    out: dict[str, Any] = {"loss_at": {s: round(train[s]["loss"], 4) for s in (1, mid, mid + 1, end) if s in train},
                           "steps_logged": len(train), "problems": []}
    for name, first, last in (("first", 1, mid), ("resume", mid + 1, end)):
        warm = first + min(3, (last - first + 1) // 2)  # the first steps compile (and warm the allocator)
        steady = sorted(train[s]["tokens_per_s"] for s in range(warm, last + 1) if s in train)
        mfu = sorted(train[s]["mfu"] for s in range(warm, last + 1) if s in train)
        if steady:
            out[f"{name}_tokens_per_s"] = steady[len(steady) // 2]
            out[f"{name}_mfu"] = mfu[len(mfu) // 2]
        firsts = [train[s]["step_time"] for s in range(first, min(first + 1, last) + 1) if s in train]
        if firsts:
            out[f"{name}_first_step_s"] = firsts[0]
        if name == "first" and train.get(mid):
            out["peak_mem_mb"] = train[mid]["peak_mem_mb"]
    resumed = re.search(r"resumed from \S+ at step (\d+)", output)
    out["resumed_at"] = int(resumed.group(1)) if resumed else None
    if train:
        if out["resumed_at"] != mid:
            out["problems"].append(f"the second process did not resume from step {mid} ({out['resumed_at']})")
        if end in train and train.get(mid + 1, {}).get("restart") != 1:
            out["problems"].append(f"step {mid + 1} was not logged by the restarted process")
        if 1 in train and end in train and not train[end]["loss"] < train[1]["loss"]:
            out["problems"].append("the loss did not fall")
        learnt = train[1]["loss"] - train[mid]["loss"] if 1 in train and mid in train else 0.0
        if learnt > 1.0 and mid + 1 in train and train[mid + 1]["loss"] > train[1]["loss"] - 0.5 * learnt:
            out["problems"].append(f"loss at step {mid + 1} is back near step 1's: the weights were not restored")
        missing = [s for s in range(1, end + 1) if s not in train]
        if missing:
            out["problems"].append(f"{len(missing)} steps missing from metrics.jsonl (first {missing[0]})")
    else:
        out["problems"].append("no metrics.jsonl rows")
    return out


def cell(value: Any) -> str:
    """A table cell: integers as they are, other numbers as bench/run_all.py writes them."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else fmt("", value)


def render(c: Check) -> str:
    env = next((s.data for s in c.stages if s.name == "env"), {})
    lines = ["# GPU check results", "",
             f"Written by `bench/gpu_check.py` (issue 12) on {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}"
             f"{' - CPU smoke run, not a GPU measurement' if c.smoke else ''}; {c.elapsed():.0f} s so far "
             f"(deadline {c.args.deadline:.0f} s). On the GPU machine:", "", f"    {DEVICE_COMMAND}", "",
             "## Machine", "", "| | |", "|---|---|"]
    for key in ("gpu", "gpu_memory_gib", "torch", "cuda_runtime", "python", "cpus", "deepspeed_accelerator",
                "tokenizer", "git_commit"):
        if key in env:
            lines.append(f"| {key} | {cell(env[key])} |")
    if env.get("packages"):
        lines += ["", "| package | version (folder) |", "|---|---|"]
        lines += [f"| {k} | {cell(v)} |" for k, v in env["packages"].items()]
    lines += ["", "## Stages", "", "| stage | status | s | budget s | note |", "|---|---|---:|---:|---|"]
    lines += [f"| {s.name} | {s.status} | {s.seconds:.1f} | {s.budget:.0f} | {cell(s.note)} |" for s in c.stages]
    for s in c.stages:
        if s.name == "tests" and s.data.get("tests"):
            lines += ["", "## Tests: `pytest -m gpu tests/test_gpu.py`", "", "| test | outcome | s | message |",
                      "|---|---|---:|---|"]
            lines += [f"| {t['test']} | {t['outcome']} | {fmt('', t['seconds'])} | {fmt('', t['message'])} |"
                      for t in s.data["tests"]]
        if s.name == "bench" and s.data.get("rows"):
            lines += ["", "## Benchmark: `python -m bench.bench_gpu`", "", table(s.data["rows"])]
        if s.name == "run" and s.data:
            d = s.data
            lines += ["", "## Training run: `main.py` under torchrun, one rank", "",
                      ("tiny model on the CPU (smoke)" if c.smoke else
                       "gpt2_124m, block size 1024, batch 16, DDP, bf16 autocast, compile=true, pydoc corpus; "
                       "checkpoint at step 30 by the first process, resumed to step 60 by a second one."), "",
                      "| | |", "|---|---|"]
            for key in ("loss_at", "resumed_at", "steps_logged", "first_tokens_per_s", "resume_tokens_per_s",
                        "first_mfu", "resume_mfu", "first_first_step_s", "resume_first_step_s", "peak_mem_mb",
                        "problems"):
                if key in d:
                    lines.append(f"| {key} | {cell(d[key])} |")
    failed = [s for s in c.stages if s.status in ("failed", "timeout")]
    if failed:
        lines += ["", "## What failed (last lines of each stage's output; all of it in gpu_check.log)"]
        for s in failed:
            tail = "\n".join(s.output.strip().splitlines()[-40:])
            lines += ["", f"### {s.name}: {s.status}", "", "```", tail, "```"]
    return "\n".join(lines) + "\n"


def probe() -> None:
    """Print one `PROBE {json}` line: the GPU, torch, and every package we import (version, folder)."""
    import importlib
    import importlib.metadata
    import platform

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    packages: dict[str, str] = {}
    for name in PACKAGES:
        try:
            mod = importlib.import_module(name)
            where = Path(getattr(mod, "__file__", "") or "?").parent
            where = where.parent if (where / "__init__.py").exists() else where  # a package, or a module file
            try:
                version = importlib.metadata.version(DIST.get(name, name))
            except importlib.metadata.PackageNotFoundError:
                version = getattr(mod, "__version__", "?")
            packages[name] = f"{version} ({where})"
        except Exception as exc:
            packages[name] = f"MISSING ({type(exc).__name__}: {exc})"
    info["packages"] = packages
    import torch

    info["torch"] = torch.__version__
    info["cuda_runtime"] = torch.version.cuda or "-"
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} x{torch.cuda.device_count()}"
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        info["gpu"] = "no GPU"
    try:
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_accelerator"] = get_accelerator()._name
    except Exception as exc:
        info["deepspeed_accelerator"] = f"{type(exc).__name__}: {exc}"
    try:
        from gpt2.tokenizer import encode, ranks_path

        info["tokenizer"] = f"{ranks_path()}: 'Hello world' -> {encode('Hello world')}"
    except Exception as exc:
        info["tokenizer"] = f"{type(exc).__name__}: {exc}"
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = "unknown"
    print("PROBE " + json.dumps(info), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU here: a tiny model on the CPU, all stages")
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="also copy the report and the log here (default $OUT)")
    ap.add_argument("--results", default=None,
                    help="the report (default bench/RESULTS-gpu.md; bench/out/RESULTS-gpu-smoke.md with --cpu-smoke)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds for all stages together (default 355, the sum of the stage budgets; "
                         "3 times that with --cpu-smoke)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        probe()
        return 0
    args.results = args.results or str(ROOT / "bench" / ("out/RESULTS-gpu-smoke.md" if args.cpu_smoke
                                                         else "RESULTS-gpu.md"))
    args.deadline = args.deadline or sum(BUDGET.values()) * (3 if args.cpu_smoke else 1)
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
