"""Names a user gives (sweeps, jobs, clusters) become paths only through `child`.

A plain name is letters, digits and `_.=,+-`, not starting with `.` or `-`: no `/`, no `..`, no
hidden or option-like names, no control characters. The joined path must also still lie inside
its folder once symlinks are resolved, so a link planted in `runs/` cannot lead elsewhere either.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpt2.errors import UserError

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=,+-]*")


def child(root: Path, name: str, what: str, suffix: str = "") -> Path:
    """`root / (name + suffix)` when `name` is a plain name and the path stays inside `root`;
    UserError (one line, naming `what`) otherwise. Nothing is created."""
    from launch.slurm import show

    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise UserError(f"{what} {show(name)} is not a plain name: use letters, digits and _.=,+- "
                        f"(not starting with . or -)")
    path = root / f"{name}{suffix}"
    # A plain name cannot climb out by itself; only a symbolic link can lead elsewhere (checked
    # with one lstat, and resolved only when it is a link: status looks at thousands of names).
    if path.is_symlink() and not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{what} {show(name)} leads outside {root} (a symbolic link?): pick another name")
    return path
