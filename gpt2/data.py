"""The training loader: token shards read window by window, served as (x, y) batches, with a resumable position.

How a split is read (the contract the tests pin down):

- The split's shards (`<name>_<split>_NNNNNN.bin` in `data_root`, see gpt2/shards.py) are read with
  positional reads, one per window, never memory-mapped: a file system that fails a read raises a
  storage error the watchdog reports (a retry, no node blamed), where a mapping would die of SIGBUS.
  Shard s of n tokens holds (n - 1) // T *windows*: window j is tokens [j*T, j*T + T + 1), so
  consecutive windows overlap by the one token that is the last target of one and the first input of
  the next. Every token is thus an input once and a target once; at most T tokens per shard go unused.
  Windows never span two shards.
- One *epoch* visits all N windows once. With shuffle, the order is drawn from (seed, epoch) in two
  levels: the shards in a random order, cut into *pools* of `pool_shards` consecutive shards (K; the
  last pool may hold fewer), and the windows of each pool in a random order, so a batch mixes windows
  of K shards. Pools are served one after the other: every rank reads from at most K shards at a time
  (kind to a shared filesystem's cache), and the order's state is one permutation of a pool's windows
  (4 bytes a window: 3 MB for 8 of llm.c's 100M-token shards at T=1024), never one of the whole split.
  K=1 reads one shard at a time (the order of this loader's version-1 states); K >= the number of
  shards shuffles the whole split. A new epoch gets a new order. Without shuffle (val) the order is
  the shards' natural order and K plays no part.
- The position is one number, the count of *global* windows consumed since the start (across epochs).
  A call to `next_batch()` on rank r of W takes the windows at positions
  [consumed + r*B, consumed + (r+1)*B) of that endless sequence, and every rank then advances consumed
  by W*B. Nothing depends on W except which slice a rank takes, so a run resumed with another number
  of ranks continues at exactly the next window: no gap, no repeat. An epoch boundary can fall inside
  a batch; the batch simply takes the end of one epoch and the start of the next.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from gpt2 import shards
from gpt2.shards import DataError, ShardError

__all__ = ["DataError", "ShardError", "TokenLoader", "prepare_command"]

STATE_VERSION = 2  # 2 added pool_shards; a version-1 state is read as pool_shards=1, its order
POOL_SHARDS = 8  # default K: shards whose windows are mixed together
_POOL_CACHE = 2  # pool permutations kept; ranks move through one pool at a time
_MAX_OPEN = 256  # shard files a loader keeps open at most (2K + 2 of them: a batch reads from at most 2K)
# Directory names the prepare command uses by default (data/<name>), mapped back to --dataset.
_DIR_TO_DATASET = {"pydoc": "pydoc", "wikitext": "wikitext", "wikitext_2": "wikitext-2", "wikitext-2": "wikitext-2",
                   "openwebtext": "openwebtext", "fineweb_edu": "fineweb-edu", "fineweb-edu": "fineweb-edu"}


def prepare_command(data_root: str | Path) -> str:
    """The command that creates shards in `data_root`, in backticks, --dataset guessed from the directory name."""
    dataset = _DIR_TO_DATASET.get(Path(data_root).name)
    if dataset is None:
        return (f"`python data_prep/download.py --dataset NAME --dir {data_root}` "
                "(NAME: pydoc, wikitext, openwebtext, fineweb-edu or text:<glob>)")
    return f"`python data_prep/download.py --dataset {dataset} --dir {data_root}`"


class TokenLoader:
    """Batches of (x, y) windows from one split of a shard directory; see the module docstring.

    `next_batch()` returns int64 CPU tensors x, y of shape (batch_size, seq_len), y being x shifted by one
    token. `pool_shards` (K) is how many shards' windows a shuffled order mixes at once; it is capped at
    the number of shards. `state_dict()` is JSON-serialisable and independent of rank and world size;
    `load_state_dict` refuses a state whose seed, seq_len, shuffle, pool_shards (when shuffled), split or
    shards differ, since the position would then mean other tokens. Raises DataError (a UserError: one line, naming the directory or file and the
    command to run) for a missing or empty directory, a malformed shard, a split smaller than one
    global batch, or a token id >= vocab_size.
    """

    def __init__(self, data_root: str | Path, split: str, batch_size: int, seq_len: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, shuffle: bool = True,
                 vocab_size: int = 50257, pool_shards: int = POOL_SHARDS):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1; fix the config")
        if pool_shards < 1:
            raise DataError(f"pool_shards ({pool_shards}) must be >= 1; fix dataset.pool_shards")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}; check the launcher's environment")
        if split not in shards.SPLITS:
            raise DataError(f"split {split!r} is not one of {', '.join(shards.SPLITS)}; fix dataset.*.split")
        self.root, self.split = Path(data_root), split
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle, self.vocab_size = seed, shuffle, vocab_size

        if not self.root.is_dir():
            raise DataError(f"data directory {self.root} does not exist; prepare it with {prepare_command(self.root)}")
        self.paths = shards.find_shards(self.root, split)
        if not self.paths:
            raise DataError(f"{self.root} holds no {split} shards (*_{split}_NNNNNN.bin); prepare them with "
                            f"{prepare_command(self.root)}")
        self.pool_shards = min(pool_shards, len(self.paths))  # what the order depends on, hence the state
        headers = [shards.read_header(p) for p in self.paths]
        self._headers = headers
        self._readers: OrderedDict[int, shards.ShardReader] = OrderedDict()  # open files, most recent last
        self._max_open = min(2 * self.pool_shards + 2, _MAX_OPEN)  # past 127 shards a pool, files reopen
        windows = [max(0, (h.num_tokens - 1) // seq_len) for h in headers]
        self._shard_windows = windows
        self._first = [0]  # each shard's first position in natural order, plus the end
        for w in windows:
            self._first.append(self._first[-1] + w)
        self.num_windows = self._first[-1]
        self.num_tokens = sum(h.num_tokens for h in headers)
        global_batch = world_size * batch_size
        if self.num_windows < global_batch:
            raise DataError(
                f"the {split} split in {self.root} has {self.num_windows} windows of {seq_len + 1} tokens "
                f"({self.num_tokens:,} tokens), fewer than one global batch ({world_size} ranks x {batch_size}); "
                "lower batch_size or seq_len, or prepare more data (for val: a larger --val_size)")
        desc = json.dumps([[p.name, h.num_tokens] for p, h in zip(self.paths, headers)])
        self._shards_sha1 = hashlib.sha1(desc.encode()).hexdigest()
        self._consumed = 0
        self._epoch_order: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self._pools: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._buf = np.empty((batch_size, seq_len + 1), dtype=shards.TOKEN_DTYPE)
        self._rows = [memoryview(row).cast("B") for row in self._buf]  # what each window is read into

    # ---- position ---------------------------------------------------------------------------
    @property
    def tokens_per_epoch(self) -> int:
        """Input tokens served per epoch (windows x seq_len)."""
        return self.num_windows * self.seq_len

    @property
    def windows_consumed(self) -> int:
        """Global windows consumed by all ranks together since the start."""
        return self._consumed

    @property
    def epoch(self) -> int:
        return self._consumed // self.num_windows

    def reset(self) -> None:
        """Back to the first window of epoch 0 (val: every eval then sees the same batches)."""
        self._consumed = 0

    def state_dict(self) -> dict:
        """The position and what it depends on; identical on every rank, whatever the world size."""
        return {
            "version": STATE_VERSION, "split": self.split, "seed": self.seed, "seq_len": self.seq_len,
            "shuffle": self.shuffle, "pool_shards": self.pool_shards, "windows_consumed": self._consumed, "epoch": self.epoch,
            "tokens_consumed": self._consumed * self.seq_len, "num_windows": self.num_windows,
            "num_shards": len(self.paths), "num_tokens": self.num_tokens, "shards_sha1": self._shards_sha1,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the position in `state`. Raises DataError if it was made on other data or settings."""
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise DataError(f"data loader state version {version!r} is not {STATE_VERSION}; "
                            "this checkpoint comes from another version of the code: start a new run")
        if version == 1:  # before pools: one shard at a time
            state = {**state, "pool_shards": 1}
        for key, now in (("split", self.split), ("seed", self.seed), ("seq_len", self.seq_len),
                         ("shuffle", self.shuffle)):
            if state.get(key) != now:
                raise DataError(f"the checkpoint's data position was made with {key}={state.get(key)!r}, this run "
                                f"has {key}={now!r}; set it back to resume exactly, or start a new run")
        if state.get("shards_sha1") != self._shards_sha1:
            raise DataError(
                f"the {self.split} shards in {self.root} ({len(self.paths)} shards, {self.num_tokens:,} tokens) differ "
                f"from the ones the checkpoint was trained on ({state.get('num_shards')} shards, "
                f"{state.get('num_tokens')} tokens); point data_root at the original shards or start a new run")
        if self.shuffle and state.get("pool_shards") != self.pool_shards:
            raise DataError(f"the checkpoint's data position was made with pool_shards={state.get('pool_shards')!r}, "
                            f"this run has {self.pool_shards} (at most the {len(self.paths)} shards); set "
                            f"dataset.pool_shards={state.get('pool_shards')!r} to resume exactly, or start a new run")
        consumed = state.get("windows_consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise DataError(f"the checkpoint's data position {consumed!r} is not a window count; start a new run")
        self._consumed = consumed

    # ---- batches ----------------------------------------------------------------------------
    def _order(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard order, start position of each pool's block plus the end) for a shuffled epoch."""
        if epoch not in self._epoch_order:
            rng = np.random.default_rng([self.seed % 2**63, epoch])
            order = rng.permutation(len(self.paths)).tolist()
            K = self.pool_shards
            starts = [0]
            for p in range(0, len(order), K):
                starts.append(starts[-1] + sum(self._shard_windows[s] for s in order[p:p + K]))
            self._epoch_order[epoch] = (order, starts)
            while len(self._epoch_order) > 2:  # a batch spans at most two epochs
                self._epoch_order.popitem(last=False)
        return self._epoch_order[epoch]

    def _pool(self, epoch: int, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pool p of an epoch: (its shards, each one's first window in the pool plus the end, the pool's order).

        The order is a permutation of the pool's windows, drawn from (seed, epoch, first shard of the pool):
        with K=1 exactly the per-shard permutation of the version-1 loader.
        """
        key = (epoch, p)
        pool = self._pools.get(key)
        if pool is None:
            K = self.pool_shards
            members = np.array(self._order(epoch)[0][p * K:(p + 1) * K])
            first = np.concatenate([[0], np.cumsum([self._shard_windows[s] for s in members])])
            rng = np.random.default_rng([self.seed % 2**63, epoch, int(members[0]) + 1])
            n = int(first[-1])
            perm = rng.permutation(np.arange(n, dtype=np.int32 if n < 2**31 else np.int64))
            pool = self._pools[key] = (members, first, perm)
            while len(self._pools) > _POOL_CACHE:
                self._pools.popitem(last=False)
        return pool

    def windows(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """The windows at global positions [start, start + count): (shard ids, window indices), each (count,)."""
        shard_ids = np.empty(count, dtype=np.int64)
        local = np.empty(count, dtype=np.int64)
        done = 0
        while done < count:
            epoch, pos = divmod(start + done, self.num_windows)
            if not self.shuffle:  # blocks are the shards, in natural order
                s = bisect.bisect_right(self._first, pos) - 1  # 'right' skips shards with no windows
                lo, hi = self._first[s], self._first[s + 1]
                n = min(count - done, hi - pos)  # positions left in this shard's block
                shard_ids[done:done + n] = s
                local[done:done + n] = np.arange(pos - lo, pos - lo + n)
            else:  # blocks are the pools, in the epoch's order
                starts = self._order(epoch)[1]
                p = bisect.bisect_right(starts, pos) - 1
                lo, hi = starts[p], starts[p + 1]
                n = min(count - done, hi - pos)  # positions left in this pool's block
                members, first, perm = self._pool(epoch, p)
                u = perm[pos - lo:pos - lo + n]  # windows of the pool, numbered across its shards
                k = np.searchsorted(first, u, side="right") - 1  # 'right' skips shards with no windows
                shard_ids[done:done + n] = members[k]
                local[done:done + n] = u - first[k]
            done += n
        return shard_ids, local

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), both (batch_size, seq_len) int64; advances the global position."""
        B = self.batch_size
        buf = self._buf  # (B, T+1) uint16
        shard_ids, local = self.windows(self._consumed + self.rank * B, B)
        for s in np.unique(shard_ids).tolist():  # window j of shard s: its tokens [j*T, j*T + T + 1)
            rows = np.flatnonzero(shard_ids == s).tolist()
            self._reader(s).read_many([self._rows[r] for r in rows], (local[rows] * self.seq_len).tolist())
        if int(buf.max()) >= self.vocab_size:
            self._bad_token(np.unique(shard_ids).tolist())
        self._consumed += self.world_size * B
        x = torch.from_numpy(buf[:, :-1].astype(np.int64))  # (B, T), a contiguous copy
        y = torch.from_numpy(buf[:, 1:].astype(np.int64))  # (B, T)
        return x, y

    def _reader(self, s: int) -> shards.ShardReader:
        """Shard s's open file. Pools keep the shards in use few (at most 2K), so few stay open."""
        reader = self._readers.get(s)
        if reader is None:
            h = self._headers[s]
            reader = self._readers[s] = shards.ShardReader(h.path, h.num_tokens)
            while len(self._readers) > self._max_open:
                self._readers.popitem(last=False)[1].close()
        self._readers.move_to_end(s)
        return reader

    def close(self) -> None:
        """Close the shard files (reopened if a batch is asked for again)."""
        while self._readers:
            self._readers.popitem()[1].close()

    def _bad_token(self, shard_ids: list[int]) -> None:
        for s in shard_ids:
            top = max((int(chunk.max()) for _, chunk in self._reader(s).chunks()), default=0)
            if top >= self.vocab_size:
                raise DataError(
                    f"{self.paths[s]} holds token id {top}, outside the model's vocabulary of {self.vocab_size}; "
                    f"re-create the shards with this project's tokenizer ({prepare_command(self.root)}) "
                    "or raise the model's vocab_size")
        raise AssertionError("a token was out of range but no shard of the batch holds it")
