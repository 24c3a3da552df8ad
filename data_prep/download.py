#!/usr/bin/env python
"""Prepare token shards once, on the shared filesystem: text -> GPT-2 tokens -> llm.c `.bin` shards.

    python data_prep/download.py --dataset wikitext --dir data/wikitext --shard_size 100000000 --num_shards 10
    python data_prep/download.py --dataset pydoc --dir data/pydoc --shard_size 20000
    python data_prep/download.py --dataset 'text:corpus/**/*.jsonl' --dir data/mine
    python data_prep/download.py verify data/pydoc

Sources (`--dataset`):
  pydoc            CPython's own documentation (`pydoc_data.topics`), built in, offline (~139K tokens).
  text:<glob>      local files: .txt/.md (one document per file), .jsonl (one per line, field --text_field),
                   .parquet (one per row, column --text_field).
  wikitext         Salesforce/wikitext, wikitext-103-raw-v1 (rows regrouped into articles); wikitext-2 too.
  openwebtext      Skylion007/openwebtext (the hub's parquet conversion).
  fineweb-edu      HuggingFaceFW/fineweb-edu, the sample-10BT config, streamed.
The hub sources stream through `datasets.load_dataset`; `--hf_root DIR` reads a local copy of the hub
repository instead (DIR/<owner>/<repo>, e.g. made by `huggingface-cli download` elsewhere).

The token stream is `<|endoftext|> doc1 <|endoftext|> doc2 ...` (llm.c's convention: the separator
precedes every document). It is cut into shards in order: the first `--val_shards` shards (of
`--val_size` tokens each, default `--shard_size`) are the validation split, the rest the training
split. The output depends only on the input and these flags, never on `--workers` or timing.

Re-running skips finished shards: each of our shards records in its header where the next one starts
in the input, so a killed run resumes without re-tokenising. Shards are written under a temporary
name and renamed, so an interrupted run never leaves a truncated shard that looks complete. Nothing
already in `--dir` is overwritten or deleted; a clash is reported with what to do.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import sys
import time
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from gpt2 import shards
from gpt2.errors import ArgumentParser, UserError, one_line, report
from gpt2.shards import DataError, Provenance, ShardError
from gpt2.tokenizer import EOT, VOCAB_SIZE, get_encoding

# Bump when the way text is cut into units changes: resume points of older shards would be wrong.
_UNIT_FORMAT = 1
# Documents longer than this are tokenised in pieces (cut only where tokenisation is unchanged, see
# `_safe_pieces`), so one huge .txt file neither occupies one thread nor builds one giant array.
_MAX_UNIT_CHARS = 1 << 20
_BATCH_CHARS = 1 << 18  # text per tokeniser task: large enough to amortise overhead, small for balance


@dataclass(frozen=True)
class HubSpec:
    """Where a named dataset lives on the Hugging Face hub."""

    repo: str
    config: str | None
    split: str = "train"
    text_field: str = "text"
    revision: str | None = None  # only for the hub itself; a local copy (--hf_root) has one revision
    wikitext_articles: bool = False  # rows are lines: regroup them into articles


HUB: dict[str, HubSpec] = {
    "wikitext": HubSpec("Salesforce/wikitext", "wikitext-103-raw-v1", wikitext_articles=True),
    "wikitext-2": HubSpec("Salesforce/wikitext", "wikitext-2-raw-v1", wikitext_articles=True),
    # The original repository is a loading script, which `datasets` no longer runs; the hub's
    # automatic parquet conversion of it is plain data.
    "openwebtext": HubSpec("Skylion007/openwebtext", "plain_text", revision="refs/convert/parquet"),
    "fineweb-edu": HubSpec("HuggingFaceFW/fineweb-edu", "sample-10BT"),
}
DATASETS = ("pydoc", *HUB, "text:<glob>")


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):  # respects SLURM's and taskset's CPU binding
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_name(dataset: str) -> str:
    """The shard file prefix for a dataset: `pydoc`, `wikitext`, `fineweb_edu`, `text`, ..."""
    return "text" if dataset.startswith("text:") else dataset.replace("-", "_")


def _prepare_command(dataset: str, out_dir: Path | str) -> str:
    return f"python data_prep/download.py --dataset {dataset} --dir {out_dir}"


# ---- sources: each yields documents (str) in a fixed order ----------------------------------------

def _pydoc_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        yield topics[key]


_TEXT_SUFFIXES = (".txt", ".md", ".text")
_JSON_SUFFIXES = (".jsonl", ".json")


def _text_documents(pattern: str, text_field: str) -> Iterator[str]:
    """Files are resolved and checked now (so a bad glob fails before any output); read lazily."""
    files = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
    if not files:
        raise DataError(f"--dataset 'text:{pattern}' matches no files; give a glob of .txt/.jsonl/.parquet files, "
                        "e.g. --dataset 'text:corpus/**/*.txt'")
    for f in files:
        suffix = Path(f).suffix.lower()
        if suffix not in (*_TEXT_SUFFIXES, *_JSON_SUFFIXES, ".parquet"):
            raise DataError(f"{f}: unsupported file type {suffix!r}; text:<glob> reads .txt, .md, .jsonl and "
                            ".parquet files, so narrow the glob")

    def read() -> Iterator[str]:
        for f in files:
            suffix = Path(f).suffix.lower()
            if suffix in _TEXT_SUFFIXES:
                with open(f, encoding="utf-8", errors="replace") as fh:
                    yield fh.read()
            elif suffix in _JSON_SUFFIXES:
                yield from _jsonl_documents(Path(f), text_field)
            else:
                yield from _parquet_documents(Path(f), text_field)

    return read()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[text_field]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{lineno}: not a JSON object with a string {text_field!r} field "
                                f"({type(e).__name__}); fix the line or pass --text_field") from None
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string; pass --text_field")
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if text_field not in pf.schema_arrow.names:
        raise DataError(f"{path} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                        "pass --text_field")
    for batch in pf.iter_batches(batch_size=4096, columns=[text_field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = \n?$")  # " = Title = " starts an article; " = = Sub = = " does not


def _wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """wikitext rows are single lines; an article starts at each top-level " = Title = " heading."""
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_TITLE.match(line) and any(s.strip() for s in article):
            yield "".join(article)
            article = []
        article.append(line)
    if any(s.strip() for s in article):
        yield "".join(article)


def check_hub_reachable(timeout_s: float = 5.0) -> None:
    """Fail fast, in one line, when the hub cannot be reached (instead of minutes of retries).

    Skipped under HF_HUB_OFFLINE=1, where `datasets` reads its local cache and reports a miss itself.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError as e:
        raise DataError(_unreachable(host, str(e) or type(e).__name__)) from None


def _unreachable(where: str, reason: str) -> str:
    reason = reason.splitlines()[0] if reason else "no reason given"
    return (f"the Hugging Face hub ({where}) is unreachable from this machine ({reason}); prepare from local "
            "files with --dataset 'text:<glob>' (.txt/.jsonl/.parquet), or copy the hub repository here and "
            "pass --hf_root DIR")


def _hub_documents(name: str, spec: HubSpec, hf_root: Path | None, text_field: str | None) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"--dataset {name} needs the `datasets` package; run `pip install -e '.[hf]'`") from None
    field = text_field or spec.text_field
    if hf_root is not None:
        path, revision = Path(hf_root) / spec.repo, None
        if not path.is_dir():
            raise DataError(f"--hf_root {hf_root} has no {spec.repo}/ directory; download the hub repository "
                            f"{spec.repo} into {path}")
        where = str(path)
    else:
        check_hub_reachable()
        path, revision, where = spec.repo, spec.revision, f"huggingface.co/datasets/{spec.repo}"
    load_errors = (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError)
    try:
        ds = datasets.load_dataset(str(path), spec.config, split=spec.split, streaming=True, revision=revision)
    except ConnectionError as e:
        raise DataError(_unreachable(where, str(e))) from None
    except load_errors as e:
        raise DataError(f"cannot load {where} config {spec.config!r}: {_first_line(e)}") from None

    def read() -> Iterator[str]:
        # Streaming reads lazily, so the network can also fail here, mid-way.
        try:
            rows = (row[field] for row in ds)
            texts = _wikitext_articles(rows) if spec.wikitext_articles else rows
            for text in texts:
                if text:
                    yield text
        except ConnectionError as e:
            raise DataError(_unreachable(where, str(e))) from None
        except KeyError:
            raise DataError(f"{where} ({spec.config}) has no {field!r} column; pass --text_field") from None
        except load_errors as e:
            raise DataError(f"cannot read {where} config {spec.config!r}: {_first_line(e)}") from None

    return read()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def documents(dataset: str, *, hf_root: Path | None = None, text_field: str | None = None) -> Iterator[str]:
    """The dataset's documents in their fixed order. Raises DataError for an unknown name."""
    if dataset == "pydoc":
        return _pydoc_documents()
    if dataset.startswith("text:"):
        return _text_documents(dataset[len("text:"):], text_field or "text")
    if dataset in HUB:
        return _hub_documents(dataset, HUB[dataset], hf_root, text_field)
    raise DataError(f"unknown --dataset {dataset!r}; choose one of {', '.join(DATASETS)}, e.g. "
                    f"`{_prepare_command('pydoc', 'data/pydoc')}`")


# ---- tokenising: documents -> units -> token batches -----------------------------------------------

def _safe_pieces(text: str, max_chars: int) -> list[str]:
    """Cut a long document where tokenising the pieces gives the same tokens as the whole.

    A cut just before a newline that follows a non-space character is safe for GPT-2's pre-tokeniser:
    no pre-token spans "x|\\n" (letter, digit and punctuation runs exclude whitespace, and whitespace
    runs never include the "x"), and the only end-sensitive rules (`\\s+(?!\\S)`, `\\s++$`) concern
    whitespace, which the left piece never ends in. Long stretches with no such place stay whole.
    """
    pieces, start = [], 0
    while len(text) - start > max_chars:
        cut = text.find("\n", start + max_chars // 2)  # search from halfway: pieces stay >= max/2
        while cut != -1 and text[cut - 1].isspace():
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _units(docs: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(text, starts_document) in order; a unit that starts a document gets <|endoftext|> before it."""
    for doc in docs:
        if not doc:
            continue
        for i, piece in enumerate(_safe_pieces(doc, _MAX_UNIT_CHARS)):
            yield piece, i == 0


def _encode(enc, text: str) -> np.ndarray:
    try:
        return enc.encode_to_numpy(text, disallowed_special=())  # (n,) uint32, no Python list in between
    except UnicodeEncodeError:  # lone surrogates (from JSON): replace them, as tiktoken's encode_ordinary does
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return enc.encode_to_numpy(text, disallowed_special=())


_EOT_ARRAY = np.array([EOT], dtype=np.uint32)


def _encode_units(enc, units: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """Runs in a worker thread (tiktoken releases the GIL): -> (uint16 tokens, tokens per unit)."""
    parts, lengths = [], np.empty(len(units), dtype=np.int64)
    for i, (text, starts_doc) in enumerate(units):
        if starts_doc:
            parts.append(_EOT_ARRAY)
        tokens = _encode(enc, text)
        parts.append(tokens)
        lengths[i] = len(tokens) + starts_doc
    joined = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return joined.astype(shards.TOKEN_DTYPE), lengths


def token_batches(units: Iterable[tuple[str, bool]], workers: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Tokenise units on `workers` threads, yielding (tokens, tokens per unit) batches in input order.

    At most 2 x workers batches are in flight, so memory stays bounded on a streamed source.
    """
    enc = get_encoding()
    assert enc.n_vocab <= shards.MAX_TOKEN + 1, "the vocabulary must fit uint16 shards"

    def batches() -> Iterator[list[tuple[str, bool]]]:
        batch, chars = [], 0
        for unit in units:
            batch.append(unit)
            chars += len(unit[0])
            if chars >= _BATCH_CHARS:
                yield batch
                batch, chars = [], 0
        if batch:
            yield batch

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenise")
    pending: deque[Future] = deque()
    try:
        for batch in batches():
            pending.append(pool.submit(_encode_units, enc, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- shards: resume, cut, write ------------------------------------------------------------------

def _fingerprint(dataset: str, shard_size: int, val_shards: int, val_size: int, text_field: str | None) -> int:
    """crc32 of everything that decides the bytes of the shards (not --workers, --num_shards, --hf_root)."""
    flags = {"dataset": dataset, "shard_size": shard_size, "val_shards": val_shards, "val_size": val_size,
             "text_field": text_field, "tokenizer": "gpt2", "units": _UNIT_FORMAT}
    return zlib.crc32(json.dumps(flags, sort_keys=True).encode())


@dataclass
class _Resume:
    next_index: int = 0  # first shard still to write
    next_unit: int = 0
    next_offset: int = 0
    done: bool = False  # the data ended in the last finished shard
    tokens: dict[str, int] = field(default_factory=lambda: {"val": 0, "train": 0})  # in the finished shards


def _resume_point(out_dir: Path, name: str, fingerprint: int, val_shards: int, dataset: str) -> _Resume:
    """Find our finished shards (a contiguous prefix) and where the input continues after them.

    Raises DataError if `out_dir` holds shards of this name that this command with these flags would
    not have written (other flags, another program, a gap): they are never overwritten.
    """
    state = _Resume()
    ours = {p.name for p in out_dir.glob(f"{name}_*.bin") if (s := shards.parse_shard_name(p.name)) and s[0] == name}
    while True:
        split = "val" if state.next_index < val_shards else "train"
        path = out_dir / shards.shard_name(name, split, state.next_index)
        if path.name not in ours:
            break
        header = shards.read_header(path)  # a truncated or corrupt shard raises, naming the file
        prov = header.provenance
        if prov is None or prov.fingerprint != fingerprint:
            raise DataError(f"{path} was written by another program or with other flags than --dataset {dataset} "
                            "and these sizes; use a new --dir, or delete that directory's shards to start over")
        ours.discard(path.name)
        state.tokens[split] += header.num_tokens
        state.next_index += 1
        state.next_unit, state.next_offset, state.done = prov.next_unit, prov.next_offset, prov.final
        if prov.final:
            break
    if ours:
        stray = sorted(ours)[0]
        raise DataError(f"{out_dir / stray} does not continue the finished shards of {name} (a gap, another split, "
                        "or other flags); use a new --dir, or delete that directory's shards to start over")
    return state


def prepare(dataset: str, out_dir: Path, shard_size: int, num_shards: int | None, *, val_shards: int = 1,
            val_size: int | None = None, workers: int | None = None, name: str | None = None,
            text_field: str | None = None, hf_root: Path | None = None, progress: bool = False) -> dict:
    """Tokenise `dataset` into llm.c shards in `out_dir`; returns a summary dict.

    `num_shards` counts all shards (val included); None means all the data. Shard i holds `val_size`
    tokens (default `shard_size`) if i < val_shards, else `shard_size`; only the last one may hold fewer.
    Finished shards from an earlier run with the same flags are kept and skipped. Raises DataError /
    ShardError (UserError) on bad input; nothing already in `out_dir` is overwritten or deleted, except
    temporary files of killed runs on this host.
    """
    out_dir = Path(out_dir)
    val_size = shard_size if val_size is None else val_size
    for flag, value, low in (("--shard_size", shard_size, 1), ("--val_size", val_size, 1),
                             ("--val_shards", val_shards, 0)):
        if not low <= value < 2**31:  # the header stores counts as int32
            raise DataError(f"{flag} {value} is out of range [{low}, 2^31); pass a value in it")
    if num_shards is not None and num_shards < 1:
        raise DataError(f"--num_shards {num_shards} must be >= 1 (or left out for all the data)")
    name = name or default_name(dataset)
    workers = workers or _available_cores()
    docs = documents(dataset, hf_root=hf_root, text_field=text_field)  # an unknown name fails before any I/O
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--dir {out_dir} exists and is not a directory; pass another --dir")
    out_dir.mkdir(parents=True, exist_ok=True)
    shards.clean_stale_tmp(out_dir)

    fingerprint = _fingerprint(dataset, shard_size, val_shards, val_size, text_field)
    resume = _resume_point(out_dir, name, fingerprint, val_shards, dataset)
    tokens = resume.tokens
    skipped, written = resume.next_index, []
    t0 = time.perf_counter()
    new_tokens = 0
    limit_reached = num_shards is not None and resume.next_index >= num_shards
    if not resume.done and not limit_reached:
        new_tokens = _write_shards(docs, out_dir, name, fingerprint, resume, shard_size, val_shards, val_size,
                                   num_shards, workers, progress, written, tokens)
    seconds = time.perf_counter() - t0
    if resume.next_index == 0 and not written:
        raise DataError(f"--dataset {dataset} produced no text; check the source (e.g. the glob matches non-empty files)")
    if num_shards is None or num_shards > val_shards:
        if tokens["train"] == 0:
            print(f"warning: {name} has no train shards (all {tokens['val']} tokens went to val); "
                  "use a smaller --shard_size/--val_size", file=sys.stderr)
    return {
        "dir": str(out_dir), "name": name, "dataset": dataset, "written": [p.name for p in written],
        "skipped": skipped, "shards": skipped + len(written), "tokens": tokens,
        "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds > 0 else 0.0,
    }


def _write_shards(docs: Iterable[str], out_dir: Path, name: str, fingerprint: int, resume: _Resume,
                  shard_size: int, val_shards: int, val_size: int, num_shards: int | None, workers: int,
                  progress: bool, written: list[Path], tokens: dict[str, int]) -> int:
    """Cut the token stream after `resume` into shards; returns the number of tokens written."""
    from tqdm import tqdm

    def capacity(index: int) -> int:
        return val_size if index < val_shards else shard_size

    changed = (f"the input changed since the {name} shards in {out_dir} were written, so they cannot be "
               "continued; use a new --dir")
    units = _units(docs)
    if resume.next_unit:  # skip finished input without tokenising it
        for _ in range(resume.next_unit):
            if next(units, None) is None:
                raise DataError(changed)
    index, skip = resume.next_index, resume.next_offset
    buf = np.empty(capacity(index), dtype=shards.TOKEN_DTYPE)
    fill, total = 0, 0
    unit_base = resume.next_unit  # global index of the current batch's first unit
    expected = None if num_shards is None else sum(capacity(i) for i in range(index, num_shards))
    bar = tqdm(total=expected, unit="tok", unit_scale=True, desc=f"{name} -> {out_dir}", disable=not progress)

    def flush(next_unit: int, next_offset: int, final: bool) -> None:
        nonlocal index, fill, total
        split = "val" if index < val_shards else "train"
        path = out_dir / shards.shard_name(name, split, index)
        if path.exists():  # a concurrent run, or a file that appeared since we looked: keep it
            raise DataError(f"{path} appeared while preparing (another run on the same --dir?); let that run "
                            "finish, then re-run this command to continue")
        prov = Provenance(fingerprint=fingerprint, capacity=capacity(index), next_unit=next_unit,
                          next_offset=next_offset, crc32=0, final=final)
        shards.write_shard(path, buf[:fill], prov)
        written.append(path)
        tokens[split] += fill
        total += fill
        index += 1
        fill = 0

    try:
        for batch, lengths in token_batches(units, workers):
            ends = np.cumsum(lengths)
            pos = 0
            if skip:  # the first unit continues a finished shard: drop what that shard already holds
                if skip >= lengths[0]:
                    raise DataError(changed)
                pos, skip = skip, 0
            while pos < len(batch):
                take = min(len(buf) - fill, len(batch) - pos)
                buf[fill:fill + take] = batch[pos:pos + take]
                fill, pos = fill + take, pos + take
                bar.update(take)
                if fill == len(buf):
                    k = int(np.searchsorted(ends, pos, side="right"))  # the unit holding the next token
                    flush(unit_base + k, pos - (int(ends[k - 1]) if k else 0), final=False)
                    if num_shards is not None and index >= num_shards:
                        return total
                    buf = np.empty(capacity(index), dtype=shards.TOKEN_DTYPE)
            unit_base += len(lengths)
        if fill:
            flush(unit_base, 0, final=True)
    finally:
        bar.close()
    return total


# ---- command line ------------------------------------------------------------------------------

def _prepare_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="data_prep/download.py", description="Tokenise a dataset into llm.c token shards "
        "(`data_prep/download.py verify DIR` checks a shard directory).")
    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(DATASETS)}")
    p.add_argument("--dir", type=Path, default=None, help="output directory (default data/<name>)")
    p.add_argument("--shard_size", type=int, default=100_000_000, help="tokens per shard (default 1e8, as llm.c)")
    p.add_argument("--num_shards", type=int, default=None, help="shards to write, val included (default: all data)")
    p.add_argument("--val_shards", type=int, default=1, help="how many leading shards form the val split")
    p.add_argument("--val_size", type=int, default=None, help="tokens per val shard (default --shard_size)")
    p.add_argument("--workers", type=int, default=None, help="tokeniser threads (default: all cores)")
    p.add_argument("--name", default=None, help="shard file prefix (default from --dataset)")
    p.add_argument("--text_field", default=None, help="text column/field for .jsonl/.parquet/hub rows")
    p.add_argument("--hf_root", type=Path, default=None, help="read hub datasets from a local copy DIR/<owner>/<repo>")
    return p


def _verify_parser() -> ArgumentParser:
    p = ArgumentParser(prog="data_prep/download.py verify",
                                description="Check every shard's header, size, token range and checksum.")
    p.add_argument("dir", type=Path)
    p.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    return p


def verify(directory: Path, vocab_size: int = VOCAB_SIZE) -> dict:
    """Check every shard in `directory`; returns {split: {shards, tokens}}. Raises ShardError if any is bad
    (after printing one line per bad shard to stderr)."""
    summary, problems = shards.verify_dir(directory, vocab_size)
    for line in problems:
        print(f"bad shard: {one_line(line)}", file=sys.stderr)  # a crafted file name holds no terminal escape
    if problems:
        raise ShardError(f"{len(problems)} bad shard(s) in {directory} (listed above); delete them and re-run "
                         "the prepare command, which re-creates only what is missing")
    return {split: {"shards": s.shards, "tokens": s.tokens} for split, s in summary.items()}


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0 on success, 2 with one line on stderr for bad input."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["verify"]:
            args = _verify_parser().parse_args(argv[1:])
            result = verify(args.dir, args.vocab_size)
            total = sum(s["tokens"] for s in result.values())
            print(f"{args.dir}: OK, {sum(s['shards'] for s in result.values())} shards, {total:,} tokens")
            for split, s in result.items():
                print(f"  {split:5s} {s['shards']:4d} shards {s['tokens']:>16,} tokens")
            return 0
        args = _prepare_parser().parse_args(argv)
        out_dir = args.dir or Path("data") / default_name(args.dataset)
        result = prepare(args.dataset, out_dir, args.shard_size, args.num_shards, val_shards=args.val_shards,
                         val_size=args.val_size, workers=args.workers, name=args.name, text_field=args.text_field,
                         hf_root=args.hf_root, progress=sys.stderr.isatty())
        new = len(result["written"])
        print(f"{out_dir}: {result['shards']} shards ({new} written, {result['skipped']} already there), "
              f"val {result['tokens']['val']:,} tokens, train {result['tokens']['train']:,} tokens"
              + (f", {result['tokens_per_s'] / 1e6:.2f} M tokens/s" if new else ""))
        return 0
    except (UserError, OSError) as e:
        return report(e)
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
