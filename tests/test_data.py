"""The loader (gpt2/data.py): batch contents, deterministic order, and exact resume across world sizes."""

from __future__ import annotations

import json
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
    streams = [shards.memmap_tokens(p).astype(np.int64) for p in loader.paths]
    for row in torch.cat([x, y[:, -1:]], dim=1).numpy():  # every row is an aligned window of some shard
        hits = [(s, j) for s, tok in enumerate(streams) for j in range(len(tok) // T)
                if np.array_equal(tok[j * T:j * T + T + 1], row)]
        assert hits


def test_val_in_order_and_reset_repeats(pydoc_shards: Path) -> None:
    val = TokenLoader(pydoc_shards, "val", B, T, shuffle=False)
    tokens = shards.memmap_tokens(val.paths[0]).astype(np.int64)
    x, y = val.next_batch()
    expected = np.stack([tokens[j * T:j * T + T + 1] for j in range(B)])
    assert np.array_equal(x.numpy(), expected[:, :-1]) and np.array_equal(y.numpy(), expected[:, 1:])
    first = run([val], 3)
    val.reset()
    val.next_batch()
    assert torch.equal(run([val], 3), first)


def window_ids(loader: TokenLoader, start: int, count: int) -> list[tuple[int, int]]:
    """(shard, window) identities of global positions [start, start + count)."""
    return [(s, int(j)) for s, js in loader.windows(start, count) for j in js]


def test_epoch_visits_every_window_once_then_reshuffles(pydoc_shards: Path) -> None:
    loader = TokenLoader(pydoc_shards, "train", 1, T, seed=7)
    n = loader.num_windows
    epoch0, epoch1 = window_ids(loader, 0, n), window_ids(loader, n, n)
    everything = sorted((s, j) for s, w in enumerate(loader._shard_windows) for j in range(w))
    assert sorted(epoch0) == sorted(epoch1) == everything  # each window exactly once per epoch
    assert epoch0 != epoch1  # a new order each epoch
    # the batches served are those windows' tokens, in that order
    rows = run([loader], 2 * n).numpy()
    streams = [shards.memmap_tokens(p) for p in loader.paths]
    for row, (s, j) in zip(rows[::97], (epoch0 + epoch1)[::97]):
        assert np.array_equal(row, streams[s][j * T:j * T + T + 1])
    assert loader.epoch == 2 and loader.tokens_per_epoch == n * T
    assert window_ids(TokenLoader(pydoc_shards, "train", 1, T, seed=7), 0, n) == epoch0  # same seed, same order
    assert window_ids(TokenLoader(pydoc_shards, "train", 1, T, seed=8), 0, n) != epoch0


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


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_resume_on_another_world_size_sees_every_token_once(pydoc_shards: Path, before: int, after: int) -> None:
    # The uninterrupted run on 1 rank fixes the global window sequence; so does any split of it.
    # Enough steps to cross an epoch boundary (the 6 train shards hold ~3.7K windows of 33 tokens).
    switch, total = 1200, 4000  # global windows before the switch, and in all
    baseline = run(ranks(pydoc_shards, 1), total // B)
    part1_loaders = ranks(pydoc_shards, before)
    part1 = run(part1_loaders, switch // (B * before))
    state = part1_loaders[0].state_dict()
    part2_loaders = ranks(pydoc_shards, after)
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
