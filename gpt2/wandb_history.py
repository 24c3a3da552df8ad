"""What W&B already holds of a run's steps, read from its offline sessions' own files.

After a resume the trainer logs to W&B only the steps W&B does not hold yet (gpt2/logs.py), so
every step appears once and the chart never goes back. An online run tells its next step itself
(`run.step`); an offline session knows nothing of the earlier ones, so we read them: every
session of the run keeps everything in one transaction log, `<run.dir>/wandb/offline-run-<time>-<id>/
run-<id>.wandb`, the file `wandb sync` uploads. What a session killed with SIGKILL had not flushed
yet (wandb-core flushes every 15 s) is not in it: those steps count as not held, and the trainer
logs them again from metrics.jsonl.

The file's layout (wandb 0.31 ships no Python reader): a 7-byte header (`:W&B`, magic 0xBEE1
little-endian, version 0), then records in LevelDB's log layout: 32 KiB blocks, each chunk a
7-byte header (masked crc32c: 4 bytes, length: 2, type: 1, where 1 = full, 2 = first, 3 = middle,
4 = last) and its payload; a block's tail shorter than a header is zero padding. A record is one
`wandb_internal_pb2.Record`; history rows are its `history` field (a key and a JSON value per
item). The CRC is not checked: a torn last record fails to parse and ends the read.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[bytes]:
    """The payloads of every complete record of a `.wandb` file, in order ([] for a file that is
    not one)."""
    data = path.read_bytes()
    if data[:4] != b":W&B" or len(data) < HEADER or struct.unpack("<HB", data[4:7]) != (0xBEE1, 0):
        return []
    out: list[bytes] = []
    pos, parts = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the block's padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:  # zeros: the end of what was written
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length:
            break  # torn
        pos += HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            parts = chunk
        elif kind == MIDDLE:
            parts += chunk
        elif kind == LAST:
            out.append(parts + chunk)
            parts = b""
    return out


def history(session: Path) -> list[dict[str, Any]]:
    """The history rows of one session directory (`offline-run-<time>-<id>`), in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for path in sorted(session.glob("run-*.wandb")):
        for raw in records(path):
            rec = pb.Record()
            try:
                rec.ParseFromString(raw)
            except Exception:  # a torn record at the end of a killed session
                break
            if rec.WhichOneof("record_type") == "history":
                rows.append({(it.key or "/".join(it.nested_key)): json.loads(it.value_json)
                             for it in rec.history.item})
    return rows


def offline_sessions(run_dir: Path, run_id: str) -> list[Path]:
    """The offline sessions of W&B run `run_id` under `run_dir/wandb/`, in start order: directories
    `offline-run-<YYYYmmdd_HHMMSS>-<id>`, and `...-<id>-<n>` for the n-th more in the same second."""
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{re.escape(run_id)}(?:-(\d+))?")
    found = [(m[1], int(m[2] or 0), p) for p in (run_dir / "wandb").glob("offline-run-*")
             if (m := pattern.fullmatch(p.name))]
    return [p for *_, p in sorted(found)]


def last_offline_step(run_dir: Path, run_id: str, exclude: Path | None = None) -> int:
    """The highest "step" the offline sessions of `run_id` hold (0: none), `exclude` (the session
    now starting) left out. Sessions log increasing steps, so the newest one with a row has it."""
    for session in reversed(offline_sessions(run_dir, run_id)):
        if exclude is not None and session.resolve() == exclude.resolve():
            continue
        steps = [r["step"] for r in history(session) if isinstance(r.get("step"), int | float)]
        if steps:
            return int(max(steps))
    return 0
