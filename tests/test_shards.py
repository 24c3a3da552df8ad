"""The shard format (gpt2/shards.py): llm.c's layout byte for byte, atomic writes, and every way a shard can be bad."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2 import shards
from gpt2.errors import UserError
from gpt2.shards import DataError, Provenance, ShardError

ROOT = Path(__file__).resolve().parent.parent


def llmc_write(path: Path, tokens: list[int]) -> None:
    """A shard written the way llm.c's data scripts write one (header words 3.. left zero)."""
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.array(tokens, dtype=np.uint16).tobytes())


def ours(path: Path, tokens: np.ndarray) -> None:
    prov = Provenance(fingerprint=123, capacity=len(tokens), next_unit=2**33 + 5, next_offset=7, crc32=0, final=True)
    shards.write_shard(path, tokens.astype(np.uint16), prov)


def test_layout_is_llmc(tmp_path: Path) -> None:
    path = tmp_path / "x_val_000000.bin"
    tokens = np.arange(1000, dtype=np.uint16)
    ours(path, tokens)
    raw = path.read_bytes()
    assert len(raw) == 1024 + 2 * 1000
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:3]) == [20240520, 1, 1000]
    assert np.array_equal(np.frombuffer(raw[1024:], dtype="<u2"), tokens)
    h = shards.read_header(path)
    assert h.num_tokens == 1000
    assert h.provenance is not None
    assert (h.provenance.next_unit, h.provenance.next_offset, h.provenance.final) == (2**33 + 5, 7, True)
    assert np.array_equal(shards.read_tokens(path), tokens)
    shards.check_tokens(path, vocab_size=50257)


def test_llmc_file_reads_and_verifies(tmp_path: Path) -> None:
    tokens = [50256, 15496, 995, 0, 50256, 1, 2, 3]
    llmc_write(tmp_path / "fineweb_val_000000.bin", tokens)
    llmc_write(tmp_path / "fineweb_train_000001.bin", tokens * 3)
    h = shards.read_header(tmp_path / "fineweb_val_000000.bin")
    assert h.num_tokens == len(tokens) and h.provenance is None
    assert shards.read_tokens(h.path).tolist() == tokens
    summary, problems = shards.verify_dir(tmp_path, vocab_size=50257)
    assert problems == []
    assert (summary["val"].shards, summary["val"].tokens) == (1, 8)
    assert (summary["train"].shards, summary["train"].tokens) == (1, 24)


def test_names() -> None:
    assert shards.shard_name("pydoc", "train", 3) == "pydoc_train_000003.bin"
    assert shards.parse_shard_name("edu_fineweb_val_000000.bin") == ("edu_fineweb", "val", 0)
    assert shards.parse_shard_name("x_train_1.bin") is None
    assert shards.parse_shard_name(".x_train_000001.bin.host.12.tmp") is None


def corrupt(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / "c_train_000001.bin"
    ours(path, np.arange(100, 200, dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    if kind == "truncated":
        raw = raw[:-10]
    elif kind == "short":
        raw = raw[:100]
    elif kind == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif kind == "version":
        raw[4:8] = np.int32(2).tobytes()
    elif kind == "longer":
        raw += b"\0\0"
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(("kind", "words"), [("truncated", "truncated"), ("short", "shorter than"),
                                             ("magic", "magic 1234"), ("version", "version 2"),
                                             ("longer", "longer than")])
def test_bad_header_is_one_clear_line(tmp_path: Path, kind: str, words: str) -> None:
    path = corrupt(tmp_path, kind)
    with pytest.raises(ShardError) as err:
        shards.read_header(path)
    msg = str(err.value)
    assert words in msg and str(path) in msg and "data_prep/download.py" in msg and "\n" not in msg
    assert isinstance(err.value, UserError) and isinstance(err.value, DataError)


def test_token_out_of_range_and_checksum(tmp_path: Path) -> None:
    bad = tmp_path / "b_train_000001.bin"
    llmc_write(bad, [1, 2, 60000, 3])
    with pytest.raises(ShardError, match="token id 60000 at position 2"):
        shards.check_tokens(bad, vocab_size=50257)
    flipped = tmp_path / "f_train_000001.bin"
    ours(flipped, np.arange(50, dtype=np.uint16))
    raw = bytearray(flipped.read_bytes())
    raw[1024 + 10] ^= 1  # one bit of one token, still in range: only the checksum sees it
    flipped.write_bytes(bytes(raw))
    shards.read_header(flipped)  # the header and size are fine
    with pytest.raises(ShardError, match="checksum"):
        shards.check_tokens(flipped, vocab_size=50257)


def test_verify_cli_rejects_corrupt_shard_and_keeps_it(tmp_path: Path) -> None:
    good = tmp_path / "c_val_000000.bin"
    ours(good, np.arange(10, dtype=np.uint16))
    bad = corrupt(tmp_path, "truncated")
    before = bad.read_bytes()
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "download.py"), "verify", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "truncated" in proc.stderr
    assert bad.read_bytes() == before and good.exists()  # verify never deletes or rewrites


def test_a_fifo_named_like_a_shard_is_one_line_not_a_hang(tmp_path: Path) -> None:
    ours(tmp_path / "c_val_000000.bin", np.arange(10, dtype=np.uint16))
    os.mkfifo(tmp_path / "c_train_000001.bin")  # reading it blocked verify, the loader and training for ever
    with pytest.raises(ShardError, match="is not a regular file"):
        shards.read_header(tmp_path / "c_train_000001.bin")
    problems = shards.verify_dir(tmp_path, 50257)[1]
    assert len(problems) == 1 and "not a regular file" in problems[0]


def test_verify_prints_a_crafted_shard_name_without_its_terminal_escapes(tmp_path: Path) -> None:
    name = "c\x1b]0;pwned\x07\x1b[2J\rx_train_000001.bin"
    llmc_write(tmp_path / "c_val_000000.bin", [1, 2, 3])
    (tmp_path / name).write_bytes(b"\0" * 1100)  # magic 0: a bad shard, listed by name
    proc = subprocess.run([sys.executable, str(ROOT / "data_prep" / "download.py"), "verify", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "bad shard: " in proc.stderr and "pwned" in proc.stderr
    assert not any(c in proc.stderr for c in "\x1b\x07\r"), repr(proc.stderr)


def test_verify_empty_or_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no shards"):
        shards.verify_dir(tmp_path, 50257)
    with pytest.raises(DataError, match="not a directory"):
        shards.verify_dir(tmp_path / "nope", 50257)


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "a_train_000001.bin"

    def boom(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(shards.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        shards.write_shard(path, np.arange(10, dtype=np.uint16))
    assert list(tmp_path.iterdir()) == []  # neither the shard nor its temporary file


def test_clean_stale_tmp_spares_live_writers(tmp_path: Path) -> None:
    host = shards.socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".a_train_000001.bin.{host}.{dead.pid}.tmp"
    live = tmp_path / f".a_train_000002.bin.{host}.{os.getpid()}.tmp"
    other_host = tmp_path / f".a_train_000003.bin.elsewhere.{dead.pid}.tmp"
    for p in (stale, live, other_host):
        p.write_bytes(b"partial")
    assert shards.clean_stale_tmp(tmp_path) == [stale]
    assert live.exists() and other_host.exists() and not stale.exists()


def test_find_shards_orders_and_refuses_mixtures(tmp_path: Path) -> None:
    for i in (3, 1, 2):
        llmc_write(tmp_path / f"a_train_{i:06d}.bin", [1, 2])
    llmc_write(tmp_path / "a_val_000000.bin", [1, 2])
    assert [p.name for p in shards.find_shards(tmp_path, "train")] == [
        "a_train_000001.bin", "a_train_000002.bin", "a_train_000003.bin"]
    llmc_write(tmp_path / "b_train_000001.bin", [1, 2])
    with pytest.raises(DataError, match="mixes train shards of several datasets"):
        shards.find_shards(tmp_path, "train")
