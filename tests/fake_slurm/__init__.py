"""Fake SLURM commands for tests and the launcher benchmark: `install_fake_slurm(root)` writes
sbatch/srun/squeue/scancel/scontrol/sacct under root/bin and returns the environment to use.

sbatch records each script (state/script_<id>.sh, state/sbatch.log) and queues the array's tasks
as PENDING in state/queue (id|state|reason|comment); squeue prints that queue in its -o format
(%i, %T, %r and %k); scancel removes jobs from it and logs them;
scontrol answers `show config` (MaxArraySize from $FAKE_MAX_ARRAY_SIZE) and logs `requeue`;
sacct says accounting is disabled. They are real executables on PATH, so the launcher runs them
through the same `launch/slurm.py` lines it uses on a real cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

_SBATCH = r'''
import fcntl, json, os, re, shutil, sys, time
d = os.environ["FAKE_SLURM_DIR"]
script = sys.argv[-1]
text = open(script).read()
with open(os.path.join(d, "lock"), "w") as lk:
    fcntl.flock(lk, fcntl.LOCK_EX)
    path = os.path.join(d, "next")
    n = int(open(path).read()) if os.path.exists(path) else 1000
    open(path, "w").write(str(n + 1))
    m = re.search(r"^#SBATCH --array=(\d+)-(\d+)", text, re.M)
    ids = [f"{n}_{i}" for i in range(int(m[1]), int(m[2]) + 1)] if m else [str(n)]
    c = re.search(r"^#SBATCH --comment=(.*)$", text, re.M)
    with open(os.path.join(d, "queue"), "a") as q:
        q.writelines(f"{i}|PENDING|None|{c[1] if c else ''}\n" for i in ids)
    with open(os.path.join(d, "sbatch.log"), "a") as log:
        log.write(json.dumps({"id": n, "ids": ids, "argv": sys.argv[1:]}) + "\n")
    shutil.copy(script, os.path.join(d, f"script_{n}.sh"))
time.sleep(float(os.environ.get("FAKE_SBATCH_DELAY", "0")))
print(f"Submitted batch job {n}")
'''

_SQUEUE = r'''
import os, sys
path = os.path.join(os.environ["FAKE_SLURM_DIR"], "queue")
fmt = sys.argv[sys.argv.index("-o") + 1] if "-o" in sys.argv else "%i|%T|%r"
for line in open(path).read().splitlines() if os.path.exists(path) else []:
    fields = dict(zip("iTrk", (line.split("|", 3) + ["", "", ""])[:4]))
    print("".join(fields.get(p[0], "") + p[1:] if p else "" for p in fmt.split("%")))
'''

_SCANCEL = r'''
import fcntl, os, sys
d = os.environ["FAKE_SLURM_DIR"]
with open(os.path.join(d, "lock"), "w") as lk:
    fcntl.flock(lk, fcntl.LOCK_EX)
    open(os.path.join(d, "scancel.log"), "a").write(" ".join(sys.argv[1:]) + "\n")
    path = os.path.join(d, "queue")
    if os.path.exists(path):
        keep = [l for l in open(path) if l.split("|")[0] not in sys.argv[1:]]
        open(path, "w").writelines(keep)
'''

_SCONTROL = r'''
import os, sys
d = os.environ["FAKE_SLURM_DIR"]
if sys.argv[1:3] == ["show", "config"]:
    print("MaxArraySize            = " + os.environ.get("FAKE_MAX_ARRAY_SIZE", "1001"))
elif sys.argv[1:2] == ["requeue"]:
    open(os.path.join(d, "requeue.log"), "a").write(" ".join(sys.argv[2:]) + "\n")
else:
    sys.exit("scontrol (fake): unsupported " + " ".join(sys.argv[1:]))
'''

_SACCT = r'''
import sys
sys.exit("sacct: error: Slurm accounting storage is disabled")
'''


def install_fake_slurm(root: Path) -> dict[str, str]:
    """Write fake sbatch/srun/squeue/scancel/scontrol/sacct under root/bin; return the env to use."""
    bin_dir, state = root / "bin", root / "state"
    bin_dir.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    scripts = {"sbatch": _SBATCH, "squeue": _SQUEUE, "scancel": _SCANCEL, "scontrol": _SCONTROL,
               "sacct": _SACCT, "srun": "import sys\nsys.exit(0)\n"}
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "FAKE_SLURM_DIR": str(state)}
