"""Rehearse the GPU machine on this CPU before a GPU is lent: its torch, only its packages, `.wheels/`.

The device machine runs what no CI machine has: torch 2.11 built for CUDA 13 (not the CPU build CI
pins), its own package versions, and our imports from `.wheels/` on PYTHONPATH. A CUDA build of torch
runs on a CPU, so most of what differs can be tried here:

1. a venv (`--venv`, default .device-venv/, about 5 GB) with PyPI's torch==DEVICE_TORCH (the CUDA
   build; several GB to download the first time) and the packages the device has (wheelhouse.DEVICE_HAS,
   transformers at its version), and nothing else of ours;
2. `.wheels/` installed with `--target` into <venv>/site, as the device command does (a cp312 wheel
   is replaced by the same release built for the venv's Python when that is not 3.12: `--python`
   names a CPython 3.12 to rehearse with the very wheels the device gets);
3. `bench/gpu_check.py --dry` run by that interpreter with PYTHONPATH=<repo>:<venv>/site;
4. the GPU runs' own main.py command lines (gpu_check.train_overrides, data_args), each backend under
   torchrun for 2 steps, on the CPU with a 1-layer model swapped in (everything else as on the GPU:
   gpt2_124m's block size and batch, bf16, compile=true, the data stage's shards).

    python -m bench.device_rehearsal [--venv .device-venv] [--work DIR]      # make device-rehearsal
    python -m bench.device_rehearsal --python /path/to/python3.12 --venv .device-venv-312

Exit 0 when every step passed. Not part of CI: it downloads a CUDA build of torch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from bench import gpu_check, wheelhouse

ROOT = Path(__file__).resolve().parent.parent
DEVICE_TORCH = "2.11.0"  # /work/.library/device/KINDS.md: python3's torch there is 2.11.0+cu130
DEVICE_PINS = ("transformers==5.17.0",)  # the device's own versions, where a test depends on them
SMALL = ["run.device=cpu", "model.config.n_layer=1", "model.config.n_embd=64", "model.config.n_head=1",
         "trainer.config.max_steps=2"]


def sh(cmd: list[str], **kw: object) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, cwd=ROOT, **kw)  # type: ignore[call-overload]


def make_venv(venv: Path, python: str = sys.executable) -> Path:
    """The device's torch and packages in `venv` (kept between runs; made by `python`); returns its python."""
    py = venv / "bin" / "python"
    if not py.exists():
        sh([python, "-m", "venv", str(venv)], check=True)
    have = sh([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    if not have.stdout.startswith(DEVICE_TORCH):
        names = sorted(wheelhouse.DEVICE_HAS - {"torch", "triton", "pip", "setuptools", "wheel", "transformers"})
        sh([str(py), "-m", "pip", "install", "-q", f"torch=={DEVICE_TORCH}", *DEVICE_PINS, *names], check=True)
    return py


def install_wheels(py: Path, site: Path) -> None:
    """`.wheels/*.whl` into `site` with --target, as on the device; a wheel that `py` cannot install
    (a cp312 one, `py` being another Python) as the same release built for `py`."""
    wheels = sorted((ROOT / ".wheels").glob("*.whl"))
    if not wheels:
        raise SystemExit(".wheels/ holds no wheels: run `make wheelhouse` first")
    supported = set(sh([str(py), "-c", "from pip._vendor.packaging.tags import sys_tags; "
                        "print(*sys_tags(), sep='\\n')"], capture_output=True, text=True, check=True).stdout.split())
    with tempfile.TemporaryDirectory() as tmp:
        here = []
        for whl in wheels:
            name, version, _, tags = parse_wheel_filename(whl.name)
            if {str(t) for t in tags} & supported:
                here.append(str(whl))
                continue
            sh([str(py), "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", tmp,
                f"{canonicalize_name(name)}=={version}"], check=True)
        here += [str(p) for p in Path(tmp).glob("*.whl")]
        sh([str(py), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
            "--target", str(site), *here], check=True)


def gpu_command_lines(py: Path, env: dict[str, str], work: Path) -> dict[str, int]:
    """Each backend's GPU command line, shrunk to a 1-layer model on the CPU: {backend: exit code}."""
    data = work / "pydoc"
    sh([str(py), "data_prep/download.py", *gpu_check.data_args(data, dry=False)], env=env, check=True)
    codes = {}
    for name, trainer in gpu_check.BACKENDS.items():
        args = gpu_check.train_overrides(data, work / name, False, gpu_check.RUN_STEPS["gpu"], trainer)
        log = work / f"{name}.log"
        with open(log, "w") as f:
            codes[name] = sh([str(py), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                              "main.py", *args, *SMALL], env=env, stdout=f, stderr=subprocess.STDOUT,
                             timeout=900).returncode
        print(f"{name}: exit {codes[name]} ({log})", flush=True)
    return codes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", type=Path, default=ROOT / ".device-venv")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter a new venv is made with (the device's is CPython 3.12; default: this one)")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="device-rehearsal-"))
    py = make_venv(args.venv.resolve(), args.python)
    site = args.venv.resolve() / "site"
    install_wheels(py, site)
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_CHECK_DRY", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=f"{ROOT}:{site}", PYTHONUNBUFFERED="1", GPT2_TIKTOKEN_FILE=str(ROOT / ".wheels" / "gpt2.tiktoken"))
    dry = sh([str(py), "bench/gpu_check.py", "--dry", "--work", str(work / "dry"), "--results",
              str(work / "RESULTS-gpu-dry.md")], env=env).returncode
    codes = gpu_command_lines(py, env, work)
    failed = [n for n, c in {"dry check": dry, **codes}.items() if c != 0]
    version = sh([str(py), "-c", "import platform; print(platform.python_version())"], capture_output=True,
                 text=True).stdout.strip()
    print(f"device rehearsal (Python {version}, torch {DEVICE_TORCH}, CUDA build, on the CPU): "
          f"{'FAILED: ' + ', '.join(failed) if failed else 'all passed'}; logs in {work}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
