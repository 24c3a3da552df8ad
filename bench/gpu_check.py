"""The GPU check (issue 12): everything a CPU cannot test, in one run of at most 6 minutes on one GPU.

Stages, each in its own processes with its own time budget (a stage that fails or runs out of time
is recorded and the next one still runs; all of them together end by --deadline seconds):

1. env:      what is there (GPU, torch, CUDA, every package we import and where it came from);
2. tests:    `pytest -m gpu tests/test_gpu.py` (bf16, fused AdamW, compile, flash, FSDP2 + DCP,
             DeepSpeed ZeRO-2 bf16, export of a GPU-trained checkpoint on CPU, HF parity);
3. bench:    `python -m bench.bench_gpu` (tokens/s, MFU against the listed and a measured matmul
             peak, peak memory, gpt2_124m and gpt2_350m, eager beside compiled);
4. data:     the built-in pydoc corpus tokenised into shards (data_prep/download.py);
5. backends: `main.py` under torchrun at world size 1, uninterrupted, for DDP (RUN_STEPS steps: the
             reference curve), FSDP and DeepSpeed ZeRO-2 (BACKEND_STEPS steps, held to DDP's curve);
             at the same time where the card has the memory for all three;
6. run:      `main.py`, gpt2_124m at block size 1024, bf16 + compile: a USR2 once step RUN_SIGNAL_AT
             is logged, the checkpoint it makes, and a second process that resumes it to the end;
             its curve is set against DDP's uninterrupted one (gpu_report.TOLERANCE).

It writes one report, bench/RESULTS-gpu.md (rewritten after every stage, so a kill keeps what was
done), and copies it with the full log (gpu_check.log) to --out (default $OUT), since only files under
$OUT come back from the device machine.

On the GPU machine (python3 with its own CUDA torch, no network; the device tool carries `.wheels`,
which `make wheelhouse` builds here: the wheels we need for Python 3.12 and the GPT-2 ranks file):

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl && PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site python3 bench/gpu_check.py --out $OUT

(`make gpu-check` runs the same two commands.) The dry mode runs the same script end to end on the
CPU with tiny shapes (every stage; the CUDA tests skip): `GPU_CHECK_DRY=1 make gpu-check`, or

    GPU_CHECK_DRY=1 PYTHONPATH=$PWD .venv/bin/python bench/gpu_check.py   # report: bench/out/RESULTS-gpu-dry.md
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the repo is on the path only from here on
from bench import gpu_report as report  # noqa: E402
from gpt2.errors import EXIT_REQUEUE  # noqa: E402

PY = sys.executable
DEVICE_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .wheels/*.whl && "
                  "PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site python3 bench/gpu_check.py --out $OUT")
# seconds per stage; together at most the 6 minutes the device check is given (the deadline cuts too)
# (a stage may also use what the stages before it left unused, never what the ones after it need)
BUDGET = {"env": 10, "tests": 70, "bench": 120, "data": 10, "backends": 75, "run": 75}
DRY_SCALE = 3  # the dry mode's budgets, a multiple of these: a shared 2-core CPU is slower at everything
# steps (GPU, dry): the run and DDP's reference run; the USR2 once this step is logged; FSDP and ZeRO-2
# (the dry run's 20 steps after its USR2, a quarter second or more each, leave its watcher, which looks
# every 20 ms, seconds to send it in)
RUN_STEPS, RUN_SIGNAL_AT, BACKEND_STEPS = {"gpu": 60, "dry": 30}, {"gpu": 30, "dry": 10}, {"gpu": 20, "dry": 8}
BACKENDS = {"ddp": ["trainer=ddp"], "fsdp": ["trainer=fsdp"],
            "zero2": ["trainer=deepspeed", "trainer.config.deepspeed_config=deepspeed_configs/zero2.json"]}
GPU_BATCH, GPU_BLOCK = 16, 1024  # the GPU run's micro-batch; gpt2_124m's block size
PARALLEL_GIB = 120  # run the three backends at once on a card with at least this much memory
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
        self.dry: bool = args.dry
        self.where = "dry" if self.dry else "gpu"
        self.scale = DRY_SCALE if self.dry else 1
        self.t0 = time.monotonic()
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.stages: list[Stage] = []
        self.log = self.work / "gpu_check.log"
        self.log.write_text("")
        self.env = child_env()
        # Training stages in the dry mode: one thread per process. A CPU's kernels split their work
        # by the threads they run with, and the split changes the rounding: the same run with one
        # thread and with two leaves the other's curve by an ulp within 6 steps, and once a 2-thread
        # reference did so under load (MKL_DYNAMIC lets MKL take fewer threads). One is one order.
        self.train_env = {**self.env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if self.dry else self.env

    @property
    def deadline(self) -> float:
        return float(self.args.deadline)

    # ---- running one stage ---------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    def timeout_for(self, stage: str) -> float:
        """What is left before the deadline, less the budgets of the stages still to come."""
        later = self.args.stages[self.args.stages.index(stage) + 1:]
        return self.deadline - self.elapsed() - sum(BUDGET[s] * self.scale for s in later)

    def spawn(self, st: Stage, label: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `cmd` in its own process group, its output to <work>/<label>.out."""
        with open(self.log, "a") as log:
            log.write(f"\n===== {st.name} ({label}): {' '.join(cmd)}\n")
        with open(self.work / f"{label}.out", "w") as f:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        proc.label = label  # type: ignore[attr-defined]
        return proc

    def reap(self, st: Stage, procs: list[subprocess.Popen], timeout: float,
             watch: Callable[[], None] | None = None) -> list[int | None]:
        """Wait for every process (calling `watch` every 20 ms meanwhile), kill the process groups of
        those still running at the timeout; their output goes to st.output and the log. Returns each
        exit code, None for one that ran out of time."""
        deadline = time.monotonic() + max(1.0, timeout)
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if watch is not None:
                watch()
            time.sleep(0.02)
        codes: list[int | None] = []
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # torchrun's workers too
                p.wait()
                codes.append(None)
            else:
                codes.append(p.returncode)
            text = (self.work / f"{p.label}.out").read_text(errors="replace")  # type: ignore[attr-defined]
            st.output += f"----- {p.label}\n{text}"  # type: ignore[attr-defined]
            with open(self.log, "a") as log:
                log.write(f"----- {p.label}\n{text}\n===== {st.name} ({p.label}): "  # type: ignore[attr-defined]
                          f"exit {'timeout' if codes[-1] is None else codes[-1]}\n")
        return codes

    def sh(self, st: Stage, cmd: list[str], timeout: float) -> int | None:
        """Run one command to its end (or the timeout: None)."""
        return self.reap(st, [self.spawn(st, st.name, cmd)], timeout)[0]

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

    def done(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name and s.status == "ok"), None)

    # ---- the stages ----------------------------------------------------------------------------
    def run_env(self, st: Stage) -> None:
        rc = self.sh(st, [PY, str(Path(__file__)), "--probe"], st.budget)
        lines = [ln for ln in st.output.splitlines() if ln.startswith("PROBE ")]
        if lines:
            st.data = json.loads(lines[-1][len("PROBE "):])
        optional = ("triton",) if self.dry else ()  # torch.compile on a GPU needs it; the dry mode does not
        missing = [k for k, v in st.data.get("packages", {}).items() if v.startswith("MISSING") and k not in optional]
        self.outcome(st, rc if not missing else 1, f"missing: {', '.join(missing)}" if missing else
                     st.data.get("gpu", ""))
        if not self.dry and not st.data.get("cuda"):
            st.status, st.note = "failed", "no CUDA device visible: the GPU stages will fail (GPU_CHECK_DRY=1 here)"

    def run_tests(self, st: Stage) -> None:
        junit = self.work / "junit.xml"
        rc = self.sh(st, [PY, "-m", "pytest", "-v", "--tb=short", "-p", "no:cacheprovider", "-m", "gpu",
                          f"--junitxml={junit}", "tests/test_gpu.py"], st.budget)
        st.data["tests"] = report.parse_tests(junit, st.output)
        counts: dict[str, int] = {}
        for t in st.data["tests"]:
            counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        self.outcome(st, rc, summary or "no test reported")
        if not self.dry and rc == 0 and (counts.get("skipped") or not counts):
            st.status, st.note = "failed", f"{st.note}; on a GPU machine no CUDA test may skip"

    def run_bench(self, st: Stage) -> None:
        rows_path = self.work / "bench.jsonl"
        rows_path.unlink(missing_ok=True)
        cmd = [PY, "-m", "bench.bench_gpu", "--jsonl", str(rows_path)] + (["--dry"] if self.dry else [])
        rc = self.sh(st, cmd, st.budget)
        rows = [json.loads(ln) for ln in rows_path.read_text().splitlines()] if rows_path.exists() else []
        st.data["rows"] = rows
        errors = sum(1 for r in rows if r.get("error") or r.get("note") == "no GPU")
        self.outcome(st, 1 if rc == 0 and errors else rc,
                     f"{len(rows)} rows" + (f", {errors} with an error" if errors else ""))

    def run_data(self, st: Stage) -> None:
        data = self.work / "pydoc"
        rc = self.sh(st, [PY, "data_prep/download.py", *data_args(data, self.dry)], st.budget)
        last = (st.output.strip().splitlines() or [""])[-1]
        self.outcome(st, rc, last[:160])
        st.data["dir"] = str(data)

    def run_backends(self, st: Stage) -> None:
        """DDP, FSDP and ZeRO-2 under torchrun, one rank each, uninterrupted; DDP's curve is the
        reference of the run stage, FSDP's and ZeRO-2's are held to it."""
        data = self.done("data")
        if data is None:
            st.status, st.note = "skipped", "no data (the data stage failed)"
            return
        steps = {name: RUN_STEPS[self.where] if name == "ddp" else BACKEND_STEPS[self.where] for name in BACKENDS}
        gib = next((s.data.get("gpu_memory_gib", 0) for s in self.stages if s.name == "env"), 0)
        parallel = self.dry or gib >= PARALLEL_GIB
        st.data["what"] = (f"{self.model_words()}; DDP {steps['ddp']} steps, FSDP and ZeRO-2 {steps['fsdp']}; "
                           f"{'all three at once' if parallel else 'one after the other'}.")
        torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "main.py"]

        def start(name: str) -> subprocess.Popen:
            args = train_overrides(Path(data.data["dir"]), self.work / f"backend_{name}", self.dry,
                                   RUN_STEPS[self.where], BACKENDS[name])
            return self.spawn(st, name, [*torchrun, *args, f"trainer.config.max_steps={steps[name]}"], self.train_env)

        codes: dict[str, int | None] = {}
        if parallel:
            procs = [start(name) for name in BACKENDS]
            codes = dict(zip(BACKENDS, self.reap(st, procs, st.budget)))
        else:
            t0 = time.monotonic()
            for name in BACKENDS:
                codes[name] = self.reap(st, [start(name)], st.budget - (time.monotonic() - t0))[0]
        reference = report.train_rows(self.work / "backend_ddp" / "metrics.jsonl")
        runs = {}
        for name in BACKENDS:
            rows = report.train_rows(self.work / f"backend_{name}" / "metrics.jsonl")
            runs[name] = report.summarize_backend(rows, codes[name], steps[name],
                                                  None if name == "ddp" else reference,
                                                  report.TOLERANCE["backend"][self.where])
        st.data["runs"] = runs
        st.data["reference"] = str(self.work / "backend_ddp" / "metrics.jsonl")
        bad = {name: r["problems"] for name, r in runs.items() if r["problems"]}
        timed_out = any(rc is None for rc in codes.values())
        self.outcome(st, None if timed_out else 1 if bad else 0,
                     "; ".join(f"{n}: {', '.join(p)}" for n, p in bad.items()) or
                     ", ".join(f"{n} {r['loss_first_last']}" for n, r in runs.items()))

    def run_train(self, st: Stage) -> None:
        """main.py to RUN_STEPS, a USR2 once step RUN_SIGNAL_AT is logged (it must save and exit 75),
        then a second process that resumes from that checkpoint to the end."""
        data = self.done("data")
        if data is None:
            st.status, st.note = "skipped", "no data (the data stage failed)"
            return
        end, at = RUN_STEPS[self.where], RUN_SIGNAL_AT[self.where]
        st.data["what"] = (f"{self.model_words()}; DDP in one process (`python main.py`), {end} steps; a USR2 "
                           f"once step {at} is logged, then a second process resumes from the checkpoint it made.")
        run_dir = self.work / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        metrics = run_dir / "metrics.jsonl"
        cmd = [PY, "main.py", *train_overrides(Path(data.data["dir"]), run_dir, self.dry, end, BACKENDS["ddp"]),
               f"trainer.config.max_steps={end}"]
        t0 = time.monotonic()
        first = self.spawn(st, "run_first", cmd, self.train_env)
        signalled: list[int] = []

        def watch() -> None:
            if not signalled and (step := report.last_step(metrics)) >= at:
                os.kill(first.pid, signal.SIGUSR2)  # as SLURM does before a time limit or a preemption
                signalled.append(step)

        rc1 = self.reap(st, [first], 0.6 * st.budget, watch)[0]  # the resume compiles from a warm cache
        st.data["first_exit"] = rc1
        rc2: int | None = None
        if rc1 == EXIT_REQUEUE:
            second = self.spawn(st, "run_resume", cmd, env={**self.train_env, "GPT2_RESTART_COUNT": "1"})
            rc2 = self.reap(st, [second], st.budget - (time.monotonic() - t0))[0]
        backends = next((s.data for s in self.stages if s.name == "backends"), {})
        ddp_ok = backends.get("runs", {}).get("ddp", {}).get("problems") == []  # whatever FSDP and ZeRO-2 did
        ref_rows = report.train_rows(Path(backends["reference"])) if ddp_ok else None
        st.data.update(report.summarize_run(report.train_rows(metrics), st.output, end,
                                            signalled[0] if signalled else None, ref_rows,
                                            report.TOLERANCE["resume"][self.where]))
        if rc1 != EXIT_REQUEUE:
            st.status = "timeout" if rc1 is None else "failed"
            st.note = (f"the first process {'timed out' if rc1 is None else f'exited {rc1}'}, not "
                       f"{EXIT_REQUEUE} (stopped by the USR2 after a checkpoint)")
            return
        problems = st.data["problems"]
        vs = st.data.get("vs_reference")
        after = vs["after_resume"] if isinstance(vs, dict) else None
        self.outcome(st, 1 if rc2 == 0 and problems else rc2, "; ".join(problems) or (
            f"resumed at step {st.data['resumed_at']}; after it, max |loss - uninterrupted| "
            f"{after['max_abs_diff']:.3g}{' (bitwise)' if after['bitwise'] else ''}" if after else
            f"resumed at step {st.data['resumed_at']}; no reference to compare"))

    def model_words(self) -> str:
        return ("tiny model (2 layers, block 64, batch 4) on the CPU, fp32, eager" if self.dry else
                f"gpt2_124m, block size {GPU_BLOCK}, batch {GPU_BATCH}, bf16 autocast, compile=true, pydoc corpus")

    # ---- the report ----------------------------------------------------------------------------
    def write(self) -> None:
        text = report.render(self, DEVICE_COMMAND)
        path = Path(self.args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        summary = self.work / "gpu_check.json"  # the same, for programs: every stage without its output
        summary.write_text(json.dumps({"dry": self.dry, "elapsed_s": self.elapsed(), "stages": [
            {k: v for k, v in asdict(s).items() if k != "output"} for s in self.stages]}, indent=1, default=str))
        if self.args.out:
            out = Path(self.args.out)
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / path.name)
            for f in (self.log, summary):
                shutil.copyfile(f, out / f.name)

    def main(self) -> int:
        mode = "DRY RUN on the CPU (tiny shapes)" if self.dry else "GPU"
        self.say(f"gpu_check: {mode}; work dir {self.work}; deadline {self.deadline:.0f} s")
        stages = {"env": self.run_env, "tests": self.run_tests, "bench": self.run_bench, "data": self.run_data,
                  "backends": self.run_backends, "run": self.run_train}
        for name in self.args.stages:
            self.stage(name, stages[name])
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


def data_args(data: Path, dry: bool) -> list[str]:
    """data_prep/download.py's arguments: the pydoc corpus in 40k-token shards, and a val split of at
    least one global batch of the run (the loader refuses fewer windows, even with evaluation off)."""
    val = 10_000 if dry else 2 * GPU_BATCH * (GPU_BLOCK + 1)
    return ["--dataset", "pydoc", "--dir", str(data), "--shard_size", "40000", "--val_size", str(val)]


def train_overrides(data: Path, run_dir: Path, dry: bool, end: int, trainer: list[str]) -> list[str]:
    """main.py's overrides (max_steps is added per process). The lr schedule is fixed by
    lr_decay_steps=end, so a run stopped early follows the same curve; no periodic checkpoints (the
    USR2 makes the one the run stage resumes from)."""
    common = [
        *trainer, "dataset=pydoc", f"dataset.train_dataset.data_root={data}",
        f"dataset.val_dataset.data_root={data}", f"run.dir={run_dir}", "wandb.mode=disabled",
        f"trainer.config.lr_decay_steps={end}", "trainer.config.eval_interval=0",
        "trainer.config.checkpoint_strategy.config.interval=0",
        "trainer.config.checkpoint_strategy.config.save_on_finish=false", "trainer.config.log_interval=1",
    ]
    if dry:
        return [*common, "model=tiny", "model.config.n_layer=2", "model.config.block_size=64", "dataset.seq_len=64",
                "trainer.config.batch_size=4", "run.device=cpu", "trainer.config.warmup_steps=2"]
    return [*common, "model=gpt2_124m", f"trainer.config.batch_size={GPU_BATCH}", "trainer.config.use_mixed_precision=true",
            "trainer.config.compile=true", "run.device=cuda", "trainer.config.warmup_steps=10"]


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
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY", "") not in ("", "0"),
                    help="no GPU needed: every stage on the CPU with tiny shapes (default: on when GPU_CHECK_DRY=1)")
    ap.add_argument("--out", default=os.environ.get("OUT") or None,
                    help="also copy the report and the log here (default $OUT)")
    ap.add_argument("--results", default=None,
                    help="the report (default bench/RESULTS-gpu.md; bench/out/RESULTS-gpu-dry.md in the dry mode)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--deadline", type=float, default=None,
                    help=f"seconds for all stages together (default: the sum of their budgets, "
                         f"{sum(BUDGET.values())} for all; {DRY_SCALE} times that in the dry mode)")
    ap.add_argument("--stages", default=",".join(BUDGET),
                    help=f"the stages to run, comma-separated (default all: {','.join(BUDGET)}); data comes "
                         "with backends and run, which need it (a rerun of what failed on the device)")
    ap.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.probe:
        probe()
        return 0
    wanted = {s.strip() for s in args.stages.split(",") if s.strip()}
    if unknown := wanted - set(BUDGET):
        ap.error(f"unknown stage(s) {', '.join(sorted(unknown))}: choose from {', '.join(BUDGET)}")
    if wanted & {"backends", "run"}:
        wanted.add("data")
    args.stages = [s for s in BUDGET if s in wanted]  # always in the order of BUDGET
    args.results = args.results or str(ROOT / "bench" / ("out/RESULTS-gpu-dry.md" if args.dry else "RESULTS-gpu.md"))
    args.deadline = args.deadline or sum(BUDGET[s] for s in args.stages) * (DRY_SCALE if args.dry else 1)
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
