"""The README says what exists: every command it shows names a make target, script, subcommand,
flag, config key and file that exist, the ones that touch nothing run for real, and its layout
names every module (a stale README is the first bug a new user meets)."""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
OUTPUTS = ("runs", "data", "exported", "fp32", ".wheels", "$OUT")  # what the commands make, not in the repo
PYTHONS = {"python", "python3", sys.executable, str(ROOT / ".venv" / "bin" / "python"), ".venv/bin/python"}
EXTERNAL = ("pip", "torch.distributed.run")  # python -m modules that are not ours
WRITTEN = {"bench/RESULTS-gpu.md"}  # committed once the GPU check has run on a GPU


def readme_commands(text: str = README) -> list[list[str]]:
    """Every command line of the ```bash blocks, split as the shell splits it, comments dropped."""
    out, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = line.strip() == "```bash"
            continue
        if inside and (argv := shlex.split(line, comments=True)):
            out.append(argv)
    return out


def parts(argv: list[str]) -> list[list[str]]:
    """The commands of one line (split at `&&`), each without its leading VAR=value assignments."""
    out, part = [], []
    for word in [*argv, "&&"]:
        if word != "&&":
            part.append(word)
            continue
        while part and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", part[0]):
            part.pop(0)
        if part:
            out.append(part)
        part = []
    return out


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", text, re.M))


def makes(argv: list[str]) -> list[list[str]]:
    """What `make ...` runs (make -n: printed, not run), each line split; the ones that set up the
    venv or the corpus are dropped (no command of the README is about them)."""
    proc = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"make -n {' '.join(argv[1:])}: {proc.stderr.strip()}"
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip() and not line.startswith("#")]


def script_of(argv: list[str]) -> tuple[list[str], list[str]] | None:
    """(how to run the script or module, its arguments) for a project Python command, else None."""
    if argv[0] in ("torchrun", "deepspeed") and "main.py" in argv:
        return ["main.py"], argv[argv.index("main.py") + 1:]
    if argv[0] not in PYTHONS or len(argv) < 2:
        return None
    if argv[1] == "-m":
        return (None if argv[2] in EXTERNAL else (["-m", argv[2]], argv[3:]))
    if argv[1].split("/")[0] in OUTPUTS:  # a script a run wrote (DeepSpeed's zero_to_fp32.py)
        return None
    return [argv[1]], argv[2:]


def python_commands() -> list[tuple[list[str], list[str]]]:
    """Every project Python command the README shows, directly or through a make target."""
    out = []
    for argv in readme_commands():
        found = [script_of(p) for a in (makes(argv) if argv[0] == "make" else [argv]) for p in parts(a)]
        out += [f for f in found if f is not None]
    return out


def subcommand(args: list[str]) -> str | None:
    """A first argument that is a plain word (`status`, `verify`) names a subcommand."""
    return args[0] if args and re.fullmatch(r"[a-z]+", args[0]) else None


@functools.cache
def help_text(how: tuple[str, ...], sub: str | None) -> str:
    cmd = [sys.executable, *how, *([sub] if sub else []), "--help"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
    return proc.stdout


def test_the_readme_shows_the_commands_this_test_reads() -> None:
    """The reader itself (a README this test cannot read would pass every check below)."""
    text = "x\n```bash\nmake a B=1   # c\nPYTHONPATH=$PWD python3 x.py --y 2 && echo\n```\n```\nnot bash\n```\n"
    assert readme_commands(text) == [["make", "a", "B=1"], ["PYTHONPATH=$PWD", "python3", "x.py", "--y", "2", "&&", "echo"]]
    assert parts(readme_commands(text)[1]) == [["python3", "x.py", "--y", "2"], ["echo"]]
    assert len(readme_commands()) >= 25
    assert {" ".join(h) for h, _ in python_commands()} >= {
        "main.py", "launch/sweep.py", "launch/render.py", "launch/plot.py", "launch/drill.py",
        "data_prep/download.py", "-m gpt2.export", "-m gpt2.generate", "bench/gpu_check.py"}


def test_every_make_target_and_variable_the_readme_uses_exists() -> None:
    targets, makefile = make_targets(), (ROOT / "Makefile").read_text()
    for argv in readme_commands():
        if argv[0] != "make":
            continue
        for word in argv[1:]:
            if "=" in word:
                var = word.split("=", 1)[0]
                assert f"$({var})" in makefile, f"`{' '.join(argv)}`: the Makefile has no variable {var}"
            else:
                assert word in targets, f"`{' '.join(argv)}`: the Makefile has no target {word}"


def test_every_script_subcommand_and_flag_the_readme_runs_exists() -> None:
    for how, args in python_commands():
        if how == ["main.py"]:
            continue  # hydra-style overrides, no flags: the next test composes them
        if how[0] != "-m":
            assert (ROOT / how[0]).is_file(), f"{how[0]} does not exist"
        sub = subcommand(args)
        text = help_text(tuple(how), sub)
        if sub:
            assert re.search(rf"usage: \S+ {sub}\b", text), f"{' '.join(how)} has no subcommand {sub}:\n{text[:300]}"
        for word in args:
            flag = word.split("=", 1)[0]
            if re.fullmatch(r"--?[a-zA-Z][\w-]*", flag):
                assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                    f"{' '.join(how)}{' ' + sub if sub else ''} has no flag {flag}"


def test_the_training_commands_and_the_overrides_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    """main.py's overrides in every README command compose into a valid config; the key overrides
    given to a sweep or a drill exist in the schema."""
    from gpt2.compose import load_config
    from main import split_args

    monkeypatch.chdir(ROOT)  # the commands' relative paths (deepspeed_configs/...) are from the repo root
    checked = 0
    for how, args in python_commands():
        if how == ["main.py"]:
            cfg = load_config(split_args(args))
            assert cfg.trainer is not None
            checked += 1
        elif how[0] in ("launch/sweep.py", "launch/drill.py"):
            keys = [a for a in args if re.fullmatch(r"(model|trainer|dataset|run|wandb)\.[\w.]+=.*", a)]
            if keys:
                load_config(keys)
                checked += 1
    assert checked >= 5


@pytest.mark.parametrize("what", ["sweep --dry-run", "render"])
def test_the_readme_commands_that_touch_nothing_run(what: str, tmp_path: Path) -> None:
    """`launch/sweep.py ... --dry-run` and `launch/render.py ...` as the README writes them, for real."""
    argv = next(a for a in readme_commands() if (what == "render") == ("launch/render.py" in a)
                and ("--dry-run" in a or what == "render") and a[0] == "python")
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "RUNS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH" in proc.stdout
    assert list(tmp_path.iterdir()) == []  # nothing submitted, nothing written


@functools.cache
def tracked() -> tuple[str, ...]:
    return tuple(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())


def in_git(path: str) -> bool:
    """A tracked file, a folder holding one, or a glob matching one (what a fresh clone has)."""
    folder = path.rstrip("/") + "/"
    return any(fnmatch.fnmatch(t, path) or t.startswith(folder) for t in tracked())


def ignored(path: str) -> bool:
    return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def repo_paths(text: str = README) -> set[str]:
    """Paths into the repository that the README names: in backticks or in its commands, starting
    with a folder git tracks (outputs such as runs/ and data/ are not; globs are kept as globs)."""
    tops = {t.split("/")[0] for t in tracked() if "/" in t}
    words = re.findall(r"`([^`\s]+)`", text) + [w for argv in readme_commands(text) for w in argv]
    out = set()
    for word in words:
        for part in re.split(r"[=\s]", word):
            part = part.strip("(),;:")
            if "/" in part and part.split("/")[0] in tops and not re.search(r"[<>$]", part):
                out.add(part)
    return out


def test_every_file_and_folder_the_readme_names_exists() -> None:
    paths = repo_paths()
    assert {"gpt2/model.py", "jobs/sweep_lr_model.yaml", "deepspeed_configs/zero1.json"} <= paths
    missing = sorted(p for p in paths if not in_git(p) and not ignored(p) and p not in WRITTEN)
    assert missing == []
    assert "writes `bench/RESULTS-gpu.md`" in README.replace("\n", " ")  # WRITTEN's one file, and who writes it
    for argv in readme_commands():  # make submit/drill EXP=x reads jobs/x.yaml
        exp = next((w.split("=", 1)[1] for w in argv if w.startswith("EXP=")), None)
        assert exp is None or (ROOT / "jobs" / f"{exp}.yaml").is_file(), f"EXP={exp}: no jobs/{exp}.yaml"


def layout() -> dict[str, str]:
    """The README's Layout block: folder -> the text describing it (continuation lines included)."""
    block = README.split("### Layout", 1)[1].split("```")[1]
    out: dict[str, str] = {}
    folder = ""
    for line in block.splitlines():
        if line and not line[0].isspace():
            folder, _, rest = line.partition(" ")
            out[folder] = rest
        elif folder:
            out[folder] += " " + line.strip()
    return out


def test_the_layout_names_every_module_and_no_module_that_is_gone() -> None:
    entries = layout()
    top = {t.split("/")[0] for t in tracked() if "/" in t and not t.startswith(".")}
    named = set(" ".join(entries).replace("/", " ").split()) | set(re.findall(r"[\w.-]+(?=/)", " ".join(entries.values())))
    assert top - named == set(), "top-level folders the Layout does not name"
    for folder in ("gpt2/", "gpt2/checkpoint/", "launch/", "data_prep/"):
        modules = {p.name for p in (ROOT / folder).glob("*.py") if p.name != "__init__.py"}
        shown = set(re.findall(r"\b\w+\.py\b", entries[folder]))
        assert shown - modules == set(), f"{folder}: the Layout names modules that do not exist"
        assert modules - shown == set(), f"{folder}: modules the Layout does not name"
    assert "backends/" in entries["gpt2/"]


def test_the_console_commands_the_readme_names_are_installed_entry_points() -> None:
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    named = set(re.findall(r"`(gpt2-[a-z]+)`", README))
    assert named and named <= set(scripts)
    for target in scripts.values():
        module, func = target.split(":")
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file()
        assert re.search(rf"^def {func}\(", (ROOT / (module.replace(".", "/") + ".py")).read_text(), re.M), target


def test_the_readme_gives_the_gpu_command_the_check_itself_reports() -> None:
    from bench.gpu_check import DEVICE_COMMAND

    assert shlex.split(DEVICE_COMMAND) in readme_commands()
