"""The floors of the code base (../DESIGN's arrows that must never exist), read from the source.

A file imports only what stands below it: main.py and launch/ stand on gpt2/, data_prep/ on
gpt2/'s shard format and tokenizer; gpt2/ knows no scheduler; the model file knows nothing of the
project; backends never import each other; the shard format lives in one file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = ("gpt2", "launch", "data_prep", "bench", "tests", "main")


def project_imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every project name `path` imports, anywhere in the file (inside functions too), dotted: a
    `from m import x` gives m and m.x (x may be a module); a relative import is resolved against the
    file's package under `root`."""
    package = path.relative_to(root).parent.parts
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else ()
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in PROJECT}
    return out


def sources(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def offenders(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for path in files:
        hits = sorted(m for m in project_imports(path) if m.split(".")[0] in forbidden)
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


def test_project_imports_are_read_from_every_kind_of_import_statement(tmp_path: Path) -> None:
    """The reader itself: plain, from, relative and function-level imports all count."""
    probe = tmp_path / "gpt2" / "backends" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("import os\nimport launch.sweep\nfrom gpt2 import model\nfrom . import fsdp\n"
                     "def f():\n    from launch.slurm import run_cmd\n    from ..checkpoint import writer\n")
    assert project_imports(probe, tmp_path) == {
        "launch.sweep", "gpt2", "gpt2.model", "gpt2.backends", "gpt2.backends.fsdp", "launch.slurm",
        "launch.slurm.run_cmd", "gpt2.checkpoint", "gpt2.checkpoint.writer"}


def test_gpt2_never_imports_the_launcher_the_data_tools_or_the_benchmarks() -> None:
    """The trainer knows no scheduler: it reports "preempted" or an exit code, and launch/ decides."""
    assert offenders(sources("gpt2"), ("launch", "data_prep", "bench", "tests", "main")) == {}


def test_the_model_file_imports_nothing_of_the_project() -> None:
    assert project_imports(ROOT / "gpt2" / "model.py") == set()


@pytest.mark.parametrize("backend", ["ddp", "fsdp", "deepspeed"])
def test_a_backend_imports_no_other_backend(backend: str) -> None:
    others = tuple(f"gpt2.backends.{b}" for b in ("ddp", "fsdp", "deepspeed") if b != backend)
    imported = project_imports(ROOT / "gpt2" / "backends" / f"{backend}.py")
    assert [m for m in imported if m in others or m.startswith(tuple(o + "." for o in others))] == []


def test_the_doors_and_the_launcher_stand_on_gpt2_only() -> None:
    """main.py calls gpt2/; launch/ and data_prep/ never reach into the benchmarks or the tests,
    and data_prep/ never into the launcher."""
    assert offenders([ROOT / "main.py"], ("launch", "data_prep", "bench", "tests")) == {}
    assert offenders(sources("launch"), ("bench", "tests", "main")) == {}
    assert offenders(sources("data_prep"), ("launch", "bench", "tests", "main")) == {}


def test_the_shard_format_lives_in_one_file() -> None:
    """llm.c's magic number and header size are written once, in gpt2/shards.py; the loader and
    data_prep/ use that module."""
    from gpt2 import shards

    magic = re.compile(rf"\b{shards.MAGIC}\b")
    files = [p for p in sources("gpt2", "data_prep", "launch", "bench") + [ROOT / "main.py"]
             if magic.search(p.read_text())]
    assert [str(p.relative_to(ROOT)) for p in files] == ["gpt2/shards.py"]
    for user in ("gpt2/data.py", "data_prep/download.py"):
        assert "gpt2.shards" in project_imports(ROOT / user), user
