"""The loader (gpt2/data.py): batch contents, deterministic order, and exact resume across world sizes."""

from __future__ import annotations

import errno
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2 import shards
from gpt2.data import DataError, ShardError, TokenLoader

B, T = 4, 32


def run(loaders: list[TokenLoader], steps: int) -> torch.Tensor:
    """`steps` synchronous steps of all ranks; the rows in global order (rank 0's batch, rank 1's, ...)."""
    rows = []
    for _ in range(steps):
        for loader in loaders:
            x, y = loader.next_batch()
            rows.append(torch.cat([x, y[:, -1:]], dim=1))  # (B, T+1): the whole window
    return torch.cat(rows)


def ranks(root: Path, world: int, **kw) -> list[TokenLoader]:
    return [TokenLoader(root, "train", B, T, rank=r, world_size=world, **kw) for r in range(world)]


def test_batch_is_shifted_window_of_a_shard(pydoc_shards: Path) -> None:
    loader = TokenLoader(pydoc_shards, "train", B, T)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    streams = [shards.read_tokens(p).astype(np.int64) for p in loader.paths]
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():  # every row is an aligned window of some shard
        hits = [(s, j) for s, tok in enumerate(streams) for j in range(len(tok) // T)
                if np.array_equal(tok[j * T:j * T + T + 1], row)]
        assert hits


def test_val_in_order_and_reset_repeats(pydoc_shards: Path) -> None:
    val = TokenLoader(pydoc_shards, "val", B, T, shuffle=False)
    tokens = shards.read_tokens(val.paths[0]).astype(np.int64)
    x, y = val.next_batch()
    expected = np.stack([tokens[j * T:j * T + T + 1] for j in range(B)])
    assert np.array_equal(x.numpy(), expected[:, :-1]) and np.array_equal(y.numpy(), expected[:, 1:])
    first = run([val], 3)
    val.reset()
    val.next_batch()
    assert torch.equal(run([val], 3), first)


def window_ids(loader: TokenLoader, start: int, count: int) -> list[tuple[int, int]]:
    """(shard, window) identities of global positions [start, start + count)."""
    shard_ids, local = loader.windows(start, count)
    return list(zip(shard_ids.tolist(), local.tolist()))


@pytest.mark.parametrize("pool", [1, 2, 8])
def test_epoch_visits_every_window_once_then_reshuffles(pydoc_shards: Path, pool: int) -> None:
    loader = TokenLoader(pydoc_shards, "train", 1, T, seed=7, pool_shards=pool)
    n = loader.num_windows
    epoch0, epoch1 = window_ids(loader, 0, n), window_ids(loader, n, n)
    everything = sorted((s, j) for s, w in enumerate(loader._shard_windows) for j in range(w))
    assert sorted(epoch0) == sorted(epoch1) == everything  # each window exactly once per epoch
    assert epoch0 != epoch1  # a new order each epoch
    # the batches served are those windows' tokens, in that order
    rows = run([loader], 2 * n).numpy()
    streams = [shards.read_tokens(p) for p in loader.paths]
    for row, (s, j) in zip(rows[::97], (epoch0 + epoch1)[::97]):
        assert np.array_equal(row, streams[s][j * T:j * T + T + 1])
    assert loader.epoch == 2 and loader.tokens_per_epoch == n * T
    same = TokenLoader(pydoc_shards, "train", 1, T, seed=7, pool_shards=pool)
    assert window_ids(same, 0, n) == epoch0  # same seed, same order
    assert window_ids(TokenLoader(pydoc_shards, "train", 1, T, seed=8, pool_shards=pool), 0, n) != epoch0


def max_open_shards(ids: list[tuple[int, int]], windows_per_shard: list[int]) -> int:
    """The most shards being read at once: begun (a window served) but not finished (windows left)."""
    left, open_now, most = list(windows_per_shard), set(), 0
    for s, _ in ids:
        open_now.add(s)
        most = max(most, len(open_now))
        left[s] -= 1
        if left[s] == 0:
            open_now.discard(s)
    return most


@pytest.mark.parametrize("pool", [1, 2, 3, 8])
def test_pool_bounds_the_shards_read_at_once(pydoc_shards: Path, pool: int) -> None:
    loader = TokenLoader(pydoc_shards, "train", B, T, pool_shards=pool)
    n, shards_n = loader.num_windows, len(loader.paths)
    assert shards_n == 6 and loader.pool_shards == min(pool, shards_n)
    for epoch in range(2):
        ids = window_ids(loader, epoch * n, n)
        assert max_open_shards(ids, loader._shard_windows) == min(pool, shards_n)  # never more, and all used
    # the order's memory: the cached permutations of at most two pools, each of at most K shards' windows
    run([loader], 2 * n // B + 3)
    biggest = sum(sorted(loader._shard_windows)[-loader.pool_shards:])
    assert 1 <= len(loader._pools) <= 2 and all(len(perm) <= biggest for _, _, perm in loader._pools.values())


def test_first_batches_mix_several_shards(pydoc_shards: Path) -> None:
    first_steps = window_ids(TokenLoader(pydoc_shards, "train", B, T), 0, 4 * B)  # default pool: all 6 shards
    assert len({s for s, _ in first_steps}) >= 4
    first_steps = window_ids(TokenLoader(pydoc_shards, "train", B, T, pool_shards=2), 0, 4 * B)
    assert len({s for s, _ in first_steps}) == 2


def test_pool_of_one_is_the_version_1_order(pydoc_shards: Path) -> None:
    # Version 1 read the shards in a seeded order, each shard's windows in a seeded order; its states
    # resume on pool_shards=1, so that order must be reproduced exactly.
    loader = TokenLoader(pydoc_shards, "train", B, T, seed=5, pool_shards=1)
    n = loader.num_windows
    for epoch in range(2):
        expected = []
        for s in np.random.default_rng([5, epoch]).permutation(len(loader.paths)).tolist():
            perm = np.random.default_rng([5, epoch, s + 1]).permutation(loader._shard_windows[s])
            expected += [(s, int(j)) for j in perm]
        assert window_ids(loader, epoch * n, n) == expected


def test_stream_is_the_same_on_1_2_or_4_ranks(pydoc_shards: Path) -> None:
    total = 3 * 4 * B * 100  # global windows; more than an epoch (~3.7K), so it crosses pools and an epoch
    streams = [run(ranks(pydoc_shards, world, pool_shards=2), total // (B * world)) for world in (1, 2, 4)]
    assert len(streams[0]) == total > TokenLoader(pydoc_shards, "train", B, T).num_windows
    assert torch.equal(streams[0], streams[1]) and torch.equal(streams[0], streams[2])


def test_resume_at_any_position_continues_the_stream(pydoc_shards: Path) -> None:
    one = TokenLoader(pydoc_shards, "train", 1, T, pool_shards=2)
    n = one.num_windows
    stream = run([one], 2 * n + 64)  # one window per step: row i is global position i
    order, starts = one._order(0)
    pool_end = starts[1]
    for world in (1, 2):
        for pos in (1, 517, pool_end - 3, n - 5, n, 2 * n - 1):  # inside a pool, across a pool, across an epoch
            resumed = ranks(pydoc_shards, world, pool_shards=2)
            state = resumed[0].state_dict() | {"windows_consumed": pos}
            for lo in resumed:
                lo.load_state_dict(state)
            steps = 3
            assert torch.equal(run(resumed, steps), stream[pos:pos + steps * world * B]), (world, pos)


def test_resume_gives_the_same_next_8_batches(pydoc_shards: Path) -> None:
    for world in (1, 2):
        straight = ranks(pydoc_shards, world)
        run(straight, 5)
        state = json.loads(json.dumps(straight[0].state_dict()))  # what a checkpoint stores
        assert all(lo.state_dict() == state for lo in straight)  # identical on every rank
        expected = run(straight, 8)
        resumed = ranks(pydoc_shards, world)
        for lo in resumed:
            lo.load_state_dict(state)
        assert torch.equal(run(resumed, 8), expected)


@pytest.mark.parametrize(("before", "after", "pool"), [(2, 1, 2), (1, 2, 8)])
def test_resume_on_another_world_size_sees_every_token_once(pydoc_shards: Path, before: int, after: int,
                                                             pool: int) -> None:
    # The uninterrupted run on 1 rank fixes the global window sequence; so does any split of it.
    # Enough steps to cross an epoch boundary (the 6 train shards hold ~3.7K windows of 33 tokens).
    switch, total = 1200, 4000  # global windows before the switch, and in all
    baseline = run(ranks(pydoc_shards, 1, pool_shards=pool), total // B)
    part1_loaders = ranks(pydoc_shards, before, pool_shards=pool)
    part1 = run(part1_loaders, switch // (B * before))
    state = json.loads(json.dumps(part1_loaders[0].state_dict()))
    part2_loaders = ranks(pydoc_shards, after, pool_shards=pool)
    for lo in part2_loaders:
        lo.load_state_dict(state)
    part2 = run(part2_loaders, (total - len(part1)) // (B * after))
    seen = torch.cat([part1, part2])
    assert part2_loaders[0].epoch >= 1  # the run crossed into a new epoch after the switch
    assert torch.equal(seen, baseline[:len(seen)]) and len(seen) == total  # same windows, same order


def test_state_refuses_other_seed_shards_or_seq_len(pydoc_shards: Path, tmp_path: Path) -> None:
    state = TokenLoader(pydoc_shards, "train", B, T, seed=1).state_dict()
    with pytest.raises(DataError, match="seed=1"):
        TokenLoader(pydoc_shards, "train", B, T, seed=2).load_state_dict(state)
    with pytest.raises(DataError, match="seq_len"):
        TokenLoader(pydoc_shards, "train", B, T * 2, seed=1).load_state_dict(state)
    other = tmp_path / "fewer"
    other.mkdir()
    for p in sorted(pydoc_shards.glob("*_train_*.bin"))[:-1]:  # one shard short
        (other / p.name).write_bytes(p.read_bytes())
    with pytest.raises(DataError, match="differ from the ones the checkpoint was trained on"):
        TokenLoader(other, "train", B, T, seed=1).load_state_dict(state)
    # batch size is not part of the position: a different one resumes fine
    TokenLoader(pydoc_shards, "train", B * 2, T, seed=1).load_state_dict(state)


def test_state_refuses_another_pool_and_reads_version_1_as_pool_of_one(pydoc_shards: Path) -> None:
    state = TokenLoader(pydoc_shards, "train", B, T, pool_shards=2).state_dict()
    assert state["pool_shards"] == 2
    with pytest.raises(DataError, match=r"pool_shards=2, this run has 3 .*set dataset\.pool_shards=2"):
        TokenLoader(pydoc_shards, "train", B, T, pool_shards=3).load_state_dict(state)
    # K is capped at the 6 shards: 8 and 50 mean the same order
    TokenLoader(pydoc_shards, "train", B, T, pool_shards=50).load_state_dict(
        TokenLoader(pydoc_shards, "train", B, T, pool_shards=8).state_dict())
    # the unshuffled val order does not depend on K
    TokenLoader(pydoc_shards, "val", B, T, shuffle=False, pool_shards=1).load_state_dict(
        TokenLoader(pydoc_shards, "val", B, T, shuffle=False).state_dict())
    old = {k: v for k, v in TokenLoader(pydoc_shards, "train", B, T).state_dict().items() if k != "pool_shards"}
    old["version"], old["windows_consumed"] = 1, 1234
    with pytest.raises(DataError, match=r"pool_shards=1, .*set dataset\.pool_shards=1"):
        TokenLoader(pydoc_shards, "train", B, T).load_state_dict(old)
    loader = TokenLoader(pydoc_shards, "train", B, T, pool_shards=1)
    loader.load_state_dict(old)
    assert loader.windows_consumed == 1234
    with pytest.raises(DataError, match="pool_shards \\(0\\) must be >= 1"):
        TokenLoader(pydoc_shards, "train", B, T, pool_shards=0)


def test_missing_or_empty_dir_prints_the_prepare_command(tmp_path: Path) -> None:
    root = tmp_path / "data" / "pydoc"
    with pytest.raises(DataError) as err:
        TokenLoader(root, "train", B, T)
    assert f"`python data_prep/download.py --dataset pydoc --dir {root}`" in str(err.value)
    root.mkdir(parents=True)
    with pytest.raises(DataError) as err:
        TokenLoader(root, "train", B, T)
    assert "holds no train shards" in str(err.value)
    assert f"`python data_prep/download.py --dataset pydoc --dir {root}`" in str(err.value)
    with pytest.raises(DataError, match="--dataset NAME"):
        TokenLoader(tmp_path / "mine", "val", B, T)


def test_too_small_split_and_bad_shards(tmp_path: Path) -> None:
    header = np.zeros(256, dtype=np.int32)
    header[:3] = [20240520, 1, 100]
    good = header.tobytes() + np.arange(100, dtype=np.uint16).tobytes()
    (tmp_path / "x_val_000000.bin").write_bytes(good)
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(tmp_path, "val", 4, 32, world_size=2)
    TokenLoader(tmp_path, "val", 3, 32)  # (100 - 1) // 32 = 3 windows: exactly one batch
    bad = header.tobytes() + np.full(100, 50300, dtype=np.uint16).tobytes()
    (tmp_path / "x_train_000001.bin").write_bytes(bad)
    loader = TokenLoader(tmp_path, "train", 2, 32)
    with pytest.raises(DataError, match=r"x_train_000001\.bin holds token id 50300.*vocabulary of 50257"):
        loader.next_batch()
    TokenLoader(tmp_path, "train", 2, 32, vocab_size=50304).next_batch()  # a padded vocabulary accepts it
    (tmp_path / "x_train_000001.bin").write_bytes(bad[:-5])
    with pytest.raises(ShardError, match="truncated"):
        TokenLoader(tmp_path, "train", 2, 32)


CUT_SHORT = """
import os, shutil, sys
from pathlib import Path
from gpt2.data import ShardError, TokenLoader
from gpt2.shards import HEADER_BYTES

src, tmp = Path(sys.argv[1]), Path(sys.argv[2])
for when in ("before its first batch", "between two batches", "far past the cut"):
    root = tmp / when.replace(" ", "_")
    shutil.copytree(src, root)
    loader = TokenLoader(root, "val", 2, 32, shuffle=False)
    if when != "before its first batch":
        loader.next_batch()
    if when == "far past the cut":  # window 200: byte 13,824, pages past the new end of the file
        loader.load_state_dict({**loader.state_dict(), "windows_consumed": 200})
    os.truncate(loader.paths[0], HEADER_BYTES + 2 * 10)  # 10 tokens left
    try:
        x, y = loader.next_batch()
        print(when, "served", x[0, :4].tolist(), flush=True)
    except ShardError as e:
        print(when, "refused", e, flush=True)
"""


def test_a_shard_cut_short_under_a_running_loader_is_an_error_not_a_crash(pydoc_shards: Path, tmp_path: Path) -> None:
    """A shard truncated after the loader read its header (before its first batch, between two, or
    far before the position): the next read raises ShardError naming the file and the fix. Read
    through a memory map (what this loader did before), the same file served zeros as tokens where
    the cut fell in the file's last page, and past it died of SIGBUS with no report; so the check
    runs in a child process: a regression fails this test, not the session."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-c", CUT_SHORT, str(pydoc_shards), str(tmp_path)], cwd=root,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)  # -7: SIGBUS
    said = dict(line.split(" refused ", 1) for line in p.stdout.splitlines() if " refused " in line)
    assert list(said) == ["before its first batch", "between two batches", "far past the cut"], p.stdout
    assert "pydoc_val_000000.bin is now 1044 bytes, not the 41024 its 20000 tokens take: it changed after this " \
        "job first read it; re-create it: delete" in said["before its first batch"], said
    for when in ("between two batches", "far past the cut"):
        assert "pydoc_val_000000.bin is now 1044 bytes, short of the 41024 its 20000 tokens take: it was cut " \
            "short while this job read it; re-create it: delete" in said[when], said


def test_a_read_the_file_system_fails_is_a_storage_error_and_the_batch_is_not_lost(pydoc_shards: Path,
                                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """EIO on a shard read (a flaky network mount; the one state reached by a stand-in for os.preadv):
    an OSError naming the shard, which the watchdog reports as a storage error (a retry, no node
    blamed). The position does not move, so the batch that failed is the next one served."""
    from gpt2.errors import is_storage_error, storage_error_line

    loader, twin = TokenLoader(pydoc_shards, "train", B, T), TokenLoader(pydoc_shards, "train", B, T)
    loader.next_batch(), twin.next_batch()
    real = os.preadv

    def failing(fd: int, buffers: list, offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "preadv", failing)
    with pytest.raises(OSError) as info:
        loader.next_batch()
    assert is_storage_error(info.value) and info.value.filename in {str(p) for p in loader.paths}, info.value
    assert storage_error_line(info.value).startswith(f"{info.value.filename}: a storage error (EIO")
    monkeypatch.setattr(os, "preadv", real)
    assert loader.windows_consumed == twin.windows_consumed
    assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), twin.next_batch()))


def test_the_loader_keeps_few_shard_files_open(pydoc_shards: Path, tmp_path: Path) -> None:
    """Files are opened as pools reach them and closed past 2K + 2, not all of a split's at once."""
    import shutil

    root = shutil.copytree(pydoc_shards, tmp_path / "shards")  # files no other loader holds

    def held() -> int:  # this process's open files among them
        return sum(os.path.realpath(f"/proc/self/fd/{fd}").startswith(f"{root}/") for fd in os.listdir("/proc/self/fd"))

    loader = TokenLoader(root, "train", B, T, pool_shards=1)
    assert held() == 0  # the headers read and closed; nothing held yet
    run([loader], loader.num_windows // B + 1)  # one epoch: every one of the 6 shards read
    assert len(loader.paths) == 6 and len(loader._readers) == held() == 4  # 2K + 2 = 4 of 6
    loader.close()
    assert held() == 0


REAL_EIO = """
import sys
from pathlib import Path
import numpy as np
from gpt2 import shards
from gpt2.data import TokenLoader
from gpt2.errors import is_storage_error

mount, switch, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
loader = TokenLoader(mount, "train", 8, 1024, shuffle=False)
loader.next_batch()  # the file system answers
mapped = np.memmap(loader.paths[0], dtype=shards.TOKEN_DTYPE, mode="r", offset=shards.HEADER_BYTES)
switch.touch()  # from now on every read the kernel asks the file system for fails
far = 4000  # window 4000: 8 MB into the shard, pages nothing has read yet
if how == "mapped":
    print("mapped served", int(mapped[far * 1024:(far + 1) * 1024].max()), flush=True)
else:
    loader.load_state_dict({**loader.state_dict(), "windows_consumed": far})
    try:
        loader.next_batch()
        print("loader served a batch", flush=True)
    except OSError as e:
        print(f"loader refused: storage error {is_storage_error(e)}: {e}", flush=True)
"""


def test_a_real_eio_from_the_kernel_is_a_storage_error_where_a_memory_map_dies(failing_mount) -> None:
    """A real failing file system (FUSE, tests/failing_fs.py), no stand-in: once its reads fail, the
    loader's next batch raises an OSError (EIO) naming the shard, a storage error, while a memory map
    of the same shard (what the loader read through before) kills its process with SIGBUS."""
    import subprocess
    import sys

    rng = np.random.default_rng(0)
    for name in ("x_val_000000.bin", "x_train_000001.bin"):
        shards.write_shard(failing_mount.source / name, rng.integers(0, 50257, 5_000_000).astype(np.uint16))
    root = Path(__file__).resolve().parents[1]
    said = {}
    for how in ("loader", "mapped"):
        p = subprocess.run([sys.executable, "-c", REAL_EIO, str(failing_mount.mount), str(failing_mount.switch), how],
                           cwd=root, capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(root)})
        said[how] = (p.returncode, p.stdout.strip())
        failing_mount.switch.unlink()
    shard = failing_mount.mount / "x_train_000001.bin"
    assert said["loader"] == (0, f"loader refused: storage error True: [Errno 5] Input/output error: '{shard}'"), said
    assert said["mapped"] == (-signal.SIGBUS, ""), said
