"""Token shards (issue 3): prepare throughput against raw tiktoken, and loader throughput.

Prepare: the pydoc corpus repeated to a few million tokens, written as .txt files, is prepared end to
end (`prepare("text:<dir>/*.txt", ...)`: read, tokenise on W threads, cut, write with fsync) and
compared with the ceiling, tiktoken's `encode_ordinary_batch(texts, num_threads=W)` on the same texts
already in memory. The two alternate round by round and each round gives a ratio, so the machine's
load cancels out; the table shows medians. Goal: prepare >= 80% of the ceiling. For the record, the
same tokenisation on a process pool of W workers is timed too (threads won: tiktoken releases the
GIL, and a pool pays for pickling every result).

Loader: `TokenLoader.next_batch()` on those shards (shuffled, as in training), tokens served per
second; goal >= 50 M tokens/s, so it is never the training loop's bottleneck. Beside it, round by
round, the same windows gathered from memory maps (how the loader read before it read each window
with pread, so that a failing file system is a storage error and a retry, not SIGBUS).

    python bench/bench_data.py [--quick]      (or python -m bench.bench_data)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from data_prep.download import _available_cores, _encode, prepare
from gpt2 import shards
from gpt2.data import TokenLoader
from gpt2.tokenizer import get_encoding

PREPARE_GOAL = 0.80
LOADER_GOAL = 50e6


def _corpus(min_tokens: int) -> tuple[list[str], int]:
    """pydoc's documents repeated until they hold at least min_tokens tokens; (texts, tokens incl. EOTs)."""
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    enc = get_encoding()
    per_copy = sum(len(t) for t in enc.encode_ordinary_batch(docs)) + len(docs)
    copies = -(-min_tokens // per_copy)
    return docs * copies, per_copy * copies


def _pool_encode(texts: list[str]) -> int:
    enc = get_encoding()
    return sum(len(_encode(enc, t)) for t in texts)


def _time_pool(texts: list[str], workers: int) -> float:
    chunks = [texts[i:i + 64] for i in range(0, len(texts), 64)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(_pool_encode, chunks[:workers])  # start-up and encoding loaded in every worker
        t0 = time.perf_counter()
        sum(pool.imap(_pool_encode, chunks))
        return time.perf_counter() - t0


def bench_prepare(quick: bool, workers: int) -> list[dict]:
    texts, tokens = _corpus(1_000_000 if quick else 5_000_000)
    enc = get_encoding()
    rounds = 2 if quick else 5
    ceiling, ours, ratios = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for i, text in enumerate(texts):
            (src / f"{i:06d}.txt").write_text(text, encoding="utf-8")
        enc.encode_ordinary_batch(texts[:200], num_threads=workers)  # warm-up
        for r in range(rounds):
            t0 = time.perf_counter()
            enc.encode_ordinary_batch(texts, num_threads=workers)
            c = tokens / (time.perf_counter() - t0)
            out = Path(tmp) / f"out{r}"
            t0 = time.perf_counter()
            result = prepare(f"text:{src}/*.txt", out, shard_size=1_000_000, num_shards=None, workers=workers)
            p = sum(result["tokens"].values()) / (time.perf_counter() - t0)
            assert sum(result["tokens"].values()) == tokens
            ceiling.append(c)
            ours.append(p)
            ratios.append(p / c)
        pool = tokens / _time_pool(texts, workers)
    c_med, p_med = statistics.median(ceiling), statistics.median(ours)
    return [
        {"name": f"prepare end to end: {tokens / 1e6:.1f}M tokens of .txt -> shards, {workers} threads",
         "value": round(p_med / 1e6, 2), "unit": "M tokens/s", "goal": f">= {PREPARE_GOAL:.0%} of ceiling",
         "ratio": round(statistics.median(ratios), 3)},
        {"name": f"ceiling: encode_ordinary_batch(num_threads={workers}), text in memory",
         "value": round(c_med / 1e6, 2), "unit": "M tokens/s", "goal": "", "ratio": ""},
        {"name": f"for the record: tokenise on a process pool of {workers} (vs ceiling)",
         "value": round(pool / 1e6, 2), "unit": "M tokens/s", "goal": "", "ratio": round(pool / c_med, 3)},
    ]


class _Mapped:
    """The loader's windows gathered from memory maps of its shards, as the loader read them before
    it read them with pread: the baseline for what reads that report storage errors cost."""

    def __init__(self, loader: TokenLoader):
        T = loader.seq_len
        # its own loader for the order, so that neither one reuses the other's permutations
        self.loader = TokenLoader(loader.root, loader.split, loader.batch_size, T, seed=loader.seed)
        maps = [np.memmap(p, dtype=shards.TOKEN_DTYPE, mode="r", offset=shards.HEADER_BYTES) for p in loader.paths]
        self.views = [np.lib.stride_tricks.as_strided(m, shape=((len(m) - 1) // T, T + 1), strides=(2 * T, 2),
                                                      writeable=False) for m in maps]
        self.buf = np.empty((loader.batch_size, T + 1), dtype=shards.TOKEN_DTYPE)
        self.consumed = 0

    def next_batch(self) -> None:
        ids, local = self.loader.windows(self.consumed, self.loader.batch_size)
        for s in np.unique(ids).tolist():
            rows = np.flatnonzero(ids == s)
            self.buf[rows] = self.views[s][local[rows]]
        assert int(self.buf.max()) < self.loader.vocab_size  # the loader's check
        self.consumed += self.loader.batch_size
        torch.from_numpy(self.buf[:, :-1].astype(np.int64)), torch.from_numpy(self.buf[:, 1:].astype(np.int64))


def bench_loader(quick: bool) -> list[dict]:
    texts, _ = _corpus(1_000_000 if quick else 4_000_000)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        src = Path(tmp) / "src.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        out = Path(tmp) / "shards"
        prepare(f"text:{src}", out, shard_size=500_000, num_shards=None)
        for B, T in ((8, 1024), (32, 1024), (64, 256)):
            loader = TokenLoader(out, "train", B, T, seed=0)
            mapped = _Mapped(loader)
            loader.next_batch(), mapped.next_batch()
            rates: dict[str, list[float]] = {"read": [], "mapped": []}
            for _ in range(3 if quick else 10):  # alternating rounds: the machine's load cancels out
                for name, it in (("read", loader), ("mapped", mapped)):
                    t0 = time.perf_counter()
                    for _ in range(20 if quick else 100):
                        it.next_batch()
                    rates[name].append((20 if quick else 100) * B * T / (time.perf_counter() - t0))
            rate, base = statistics.median(rates["read"]), statistics.median(rates["mapped"])
            rows.append({"name": f"loader next_batch, B={B} T={T}, shuffled, {len(loader.paths)} shards "
                                 f"({loader.epoch} epochs rolled over)",
                         "value": round(rate / 1e6, 1), "unit": "M tokens/s", "goal": f">= {LOADER_GOAL / 1e6:.0f}",
                         "ratio": round(rate / LOADER_GOAL, 2)})
            rows.append({"name": "for the record: the same windows gathered from memory maps (SIGBUS when the file system fails a read; "
                                 "ratio: the loader over this)",
                         "value": round(base / 1e6, 1), "unit": "M tokens/s", "goal": "",
                         "ratio": round(rate / base, 2)})
    return rows


def run(quick: bool = False) -> list[dict]:
    """All rows (name, value, unit, goal, ratio) for bench.run_all."""
    workers = _available_cores()
    return bench_prepare(quick, workers) + bench_loader(quick)


def _table(rows: list[dict]) -> str:
    cols = ("name", "value", "unit", "goal", "ratio")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller corpus, fewer rounds")
    args = ap.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_data on {_available_cores()} cores (load average {load:.1f} at start)\n")
    print(_table(run(quick=args.quick)))


if __name__ == "__main__":
    main()
