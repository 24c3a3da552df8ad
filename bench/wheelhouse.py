"""Build `.wheels/`: what `make gpu-check` installs on a GPU machine that has no network (issue 12).

That machine runs Python 3.12 with a CUDA PyTorch, transformers, tiktoken, numpy & co. already
installed (DEVICE_HAS). The wheelhouse brings the rest of our imports, pinned to the versions this
project is tested with, as wheels for CPython 3.12 on manylinux x86_64 (or pure-Python wheels):

- downloaded (`pip download --only-binary=:all: --python-version 3.12 ... --no-deps`): BINARY_PINS;
- built here, because PyPI has no wheel of them: deepspeed (pure Python with DS_BUILD_OPS=0) and
  antlr4-python3-runtime (an sdist only);
- the GPT-2 ranks file, copied to `.wheels/gpt2.tiktoken` (point GPT2_TIKTOKEN_FILE at it).

torch is never included and wandb is left out (the check runs with wandb.mode=disabled). Then every
wheel is checked: its tags, the total size (MAX_MB), one version per package, and every
`Requires-Dist` that applies to Linux/CPython 3.12 met by the wheelhouse or by DEVICE_HAS.

    python -m bench.wheelhouse [--dir .wheels]      # `make wheelhouse`
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parent.parent
MAX_MB = 40
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# Wheels on PyPI (pure-Python ones are py3-none-any), at the versions this project is tested with.
BINARY_PINS = (
    "omegaconf==2.3.1", "hydra-core==1.3.8", "submitit==1.5.4", "loguru==0.7.3", "hjson==3.1.0",
    "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",  # pydantic needs >=4.16; the device's own may be older
)
BUILT_PINS = ("deepspeed==0.19.8", "antlr4-python3-runtime==4.9.3")
NEVER = {"torch", "wandb"}
# Installed on the device machine (/work/.library/device/KINDS.md, "Python packages already there").
DEVICE_HAS = {canonicalize_name(n) for n in """
    torch triton numpy tiktoken safetensors transformers matplotlib tqdm filelock pyyaml psutil pytest
    tensorboard einops msgpack ninja py-cpuinfo nvidia-ml-py packaging cloudpickle regex requests
    huggingface-hub tokenizers pytest-timeout setuptools wheel pip jinja2 networkx sympy fsspec
""".split()}
DEVICE_ENV = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
              "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
              "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix"}


def pip(*args: str, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def build(dest: Path) -> None:
    """Fill `dest` with the wheels and the ranks file (old wheels removed first)."""
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
        *plat, "-d", str(dest), *BINARY_PINS)
    with tempfile.TemporaryDirectory() as tmp:
        # DS_BUILD_OPS=0: no compiled op, the wheel is pure Python (ops JIT-build on demand, none is used)
        env = {**os.environ, "DS_BUILD_OPS": "0"}
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, *BUILT_PINS, env=env)
        for whl in Path(tmp).glob("*.whl"):
            shutil.move(str(whl), dest / whl.name)
    from gpt2.tokenizer import RANKS_SHA256, _sha256, ranks_path

    ranks = ranks_path()
    if not ranks.is_file() or _sha256(ranks) != RANKS_SHA256:
        raise SystemExit(f"{ranks}: the GPT-2 ranks file is missing or wrong; run `make setup` first")
    shutil.copyfile(ranks, dest / "gpt2.tiktoken")


def requires(whl: Path) -> list[Requirement]:
    """The wheel's Requires-Dist lines that apply on the device (no extras, markers for Linux/3.12)."""
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    out = []
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is None or req.marker.evaluate({**DEVICE_ENV, "extra": ""}):
            out.append(req)
    return out


def check(dest: Path) -> list[str]:
    """Problems with the wheelhouse (empty: fine). Prints one line per wheel with its size."""
    problems: list[str] = []
    wheels = sorted(dest.glob("*.whl"))
    have: dict[str, str] = {}
    total = 0
    for whl in wheels:
        name, version, _, tags = parse_wheel_filename(whl.name)
        size = whl.stat().st_size
        total += size
        print(f"{size / 2**20:8.2f} MiB  {whl.name}")
        key = canonicalize_name(name)
        if key in have:
            problems.append(f"two versions of {key}: {have[key]} and {version}")
        have[key] = str(version)
        if key in NEVER:
            problems.append(f"{whl.name}: {key} must not be in the wheelhouse")
        ok = any((t.interpreter in ("py3", "cp312") and t.abi in ("none", "abi3", "cp312")
                  and (t.platform == "any" or (t.platform.startswith("manylinux") and t.platform.endswith("x86_64"))))
                 for t in tags)
        if not ok:
            problems.append(f"{whl.name}: not a cp312/py3 manylinux x86_64 or none-any wheel")
    for whl in wheels:
        for req in requires(whl):
            key = canonicalize_name(req.name)
            if key in have:
                if not req.specifier.contains(have[key], prereleases=True):
                    problems.append(f"{whl.name} needs {req} but the wheelhouse has {key} {have[key]}")
            elif key not in DEVICE_HAS:
                problems.append(f"{whl.name} needs {req}: neither in the wheelhouse nor on the device")
    ranks = dest / "gpt2.tiktoken"
    if not ranks.is_file():
        problems.append(f"{ranks} is missing")
    else:
        total += ranks.stat().st_size
        print(f"{ranks.stat().st_size / 2**20:8.2f} MiB  {ranks.name}")
    print(f"{total / 2**20:8.2f} MiB  in all ({len(wheels)} wheels; limit {MAX_MB} MiB)")
    if total > MAX_MB * 2**20:
        problems.append(f"{total / 2**20:.1f} MiB is over the {MAX_MB} MiB limit")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=ROOT / ".wheels")
    ap.add_argument("--check-only", action="store_true", help="check an existing wheelhouse, build nothing")
    args = ap.parse_args(argv)
    if not args.check_only:
        build(args.dir)
    problems = check(args.dir)
    for p in problems:
        print(f"wheelhouse: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
