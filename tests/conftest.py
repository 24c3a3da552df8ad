"""Shared fixtures. Everything runs on CPU with tiny models; nothing downloads."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def pydoc_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A shard directory made from CPython's built-in docs: one val shard, several train shards."""
    from data_prep.download import prepare

    out = tmp_path_factory.mktemp("pydoc_shards")
    prepare(dataset="pydoc", out_dir=out, shard_size=20_000, num_shards=None)
    return out


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    """Messages logged (loguru) at WARNING or above while the test runs."""
    from loguru import logger

    seen: list[str] = []
    sink = logger.add(lambda msg: seen.append(msg.record["message"]), level="WARNING")
    yield seen
    logger.remove(sink)


def billion_laughs(levels: int = 9, flow: bool = False) -> str:
    """YAML whose anchors repeat anchors: 10**levels values once its aliases are expanded, in a few
    hundred bytes (block style: one key per level; flow: one list, for a single-line value)."""
    lists = ["&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lists += [f"&l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    if flow:
        return f"[{', '.join(lists)}]"
    return "".join(f"l{i}: {text}\n" for i, text in enumerate(lists))
