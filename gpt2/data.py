"""The training loader: memory-mapped token shards, served as (x, y) batches, with a resumable position.

How a split is read (the contract the tests pin down):

- The split's shards (`<name>_<split>_NNNNNN.bin` in `data_root`, see gpt2/shards.py) are memory-mapped.
  Shard s of n tokens holds (n - 1) // T *windows*: window j is tokens [j*T, j*T + T + 1), so
  consecutive windows overlap by the one token that is the last target of one and the first input of
  the next. Every token is thus an input once and a target once; at most T tokens per shard go unused.
  Windows never span two shards.
- One *epoch* visits all N windows once. With shuffle, the order is a two-level permutation drawn from
  (seed, epoch): the shards in a random order, and the windows of each shard in a random order. All
  ranks therefore read one shard at a time (kind to a shared filesystem's cache), and a new epoch gets
  a new order. Without shuffle (val) the order is the shards' natural order.
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

STATE_VERSION = 1
_PERM_CACHE = 8  # per-shard window permutations kept; ranks move through one shard at a time
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
    token. `state_dict()` is JSON-serialisable and independent of rank and world size; `load_state_dict`
    refuses a state whose seed, seq_len, shuffle, split or shards differ, since the position would then
    mean other tokens. Raises DataError (a UserError: one line, naming the directory or file and the
    command to run) for a missing or empty directory, a malformed shard, a split smaller than one
    global batch, or a token id >= vocab_size.
    """

    def __init__(self, data_root: str | Path, split: str, batch_size: int, seq_len: int, *,
                 rank: int = 0, world_size: int = 1, seed: int = 1337, shuffle: bool = True,
                 vocab_size: int = 50257):
        if batch_size < 1 or seq_len < 1:
            raise DataError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be >= 1; fix the config")
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
        headers = [shards.read_header(p) for p in self.paths]
        self._tokens = [shards.memmap_tokens(h.path, h.num_tokens) for h in headers]
        windows = [max(0, (h.num_tokens - 1) // seq_len) for h in headers]
        self._shard_windows = windows
        self._first = [0]  # each shard's first position in natural order, plus the end
        for w in windows:
            self._first.append(self._first[-1] + w)
        self.num_windows = self._first[-1]
        # Each shard seen as a (windows, T+1) array of overlapping rows (row stride T tokens, no copy), so
        # a batch is one fancy-indexing gather from the memmap.
        self._views = [np.lib.stride_tricks.as_strided(t, shape=(w, seq_len + 1), strides=(seq_len * t.itemsize,
                       t.itemsize), writeable=False) for t, w in zip(self._tokens, windows)]
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
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._buf = np.empty((batch_size, seq_len + 1), dtype=shards.TOKEN_DTYPE)

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
            "shuffle": self.shuffle, "windows_consumed": self._consumed, "epoch": self.epoch,
            "tokens_consumed": self._consumed * self.seq_len, "num_windows": self.num_windows,
            "num_shards": len(self.paths), "num_tokens": self.num_tokens, "shards_sha1": self._shards_sha1,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the position in `state`. Raises DataError if it was made on other data or settings."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}; "
                            "this checkpoint comes from another version of the code: start a new run")
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
        consumed = state.get("windows_consumed")
        if not isinstance(consumed, int) or consumed < 0:
            raise DataError(f"the checkpoint's data position {consumed!r} is not a window count; start a new run")
        self._consumed = consumed

    # ---- batches ----------------------------------------------------------------------------
    def _order(self, epoch: int) -> tuple[list[int], list[int]]:
        """(shard order, start position of each shard's block plus the end) for a shuffled epoch."""
        if epoch not in self._epoch_order:
            rng = np.random.default_rng([self.seed % 2**63, epoch])
            order = rng.permutation(len(self.paths)).tolist()
            starts = [0]
            for s in order:
                starts.append(starts[-1] + self._shard_windows[s])
            self._epoch_order[epoch] = (order, starts)
            while len(self._epoch_order) > 2:  # a batch spans at most two epochs
                self._epoch_order.popitem(last=False)
        return self._epoch_order[epoch]

    def _perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed % 2**63, epoch, shard + 1])
            perm = self._perms[key] = rng.permutation(self._shard_windows[shard])
            while len(self._perms) > _PERM_CACHE:
                self._perms.popitem(last=False)
        return perm

    def _locate(self, g: int) -> tuple[int, int, int, int]:
        """Global position g -> (epoch, shard, first and end position in the epoch of that shard's block)."""
        epoch, pos = divmod(g, self.num_windows)
        if not self.shuffle:
            s = bisect.bisect_right(self._first, pos) - 1  # 'right' skips shards with no windows
            return epoch, s, self._first[s], self._first[s + 1]
        order, starts = self._order(epoch)
        b = bisect.bisect_right(starts, pos) - 1
        return epoch, order[b], starts[b], starts[b + 1]

    def windows(self, start: int, count: int) -> list[tuple[int, np.ndarray]]:
        """The windows at global positions [start, start + count), as (shard, window indices) runs in order."""
        runs = []
        while count > 0:
            epoch, s, lo, hi = self._locate(start)
            pos = start - epoch * self.num_windows
            n = min(count, hi - pos)  # positions left in this shard's block
            local = np.arange(pos - lo, pos - lo + n)
            runs.append((s, self._perm(epoch, s)[local] if self.shuffle else local))
            start, count = start + n, count - n
        return runs

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), both (batch_size, seq_len) int64; advances the global position."""
        B = self.batch_size
        buf = self._buf  # (B, T+1) uint16
        row = 0
        runs = self.windows(self._consumed + self.rank * B, B)
        for s, js in runs:  # usually one run: consecutive positions lie in one shard's block
            buf[row:row + len(js)] = self._views[s][js]  # one gather from the memmap
            row += len(js)
        if int(buf.max()) >= self.vocab_size:
            self._bad_token([s for s, _ in runs])
        self._consumed += self.world_size * B
        x = torch.from_numpy(buf[:, :-1].astype(np.int64))  # (B, T), a contiguous copy
        y = torch.from_numpy(buf[:, 1:].astype(np.int64))  # (B, T)
        return x, y

    def _bad_token(self, shard_ids: list[int]) -> None:
        for s in shard_ids:
            top = int(np.asarray(self._tokens[s]).max())
            if top >= self.vocab_size:
                raise DataError(
                    f"{self.paths[s]} holds token id {top}, outside the model's vocabulary of {self.vocab_size}; "
                    f"re-create the shards with this project's tokenizer ({prepare_command(self.root)}) "
                    "or raise the model's vocab_size")
        raise AssertionError("a token was out of range but no shard of the batch holds it")
