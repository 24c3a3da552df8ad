"""Preparing shards (data_prep/download.py): round trip, determinism, resume, sources, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from data_prep import download
from data_prep.download import prepare
from gpt2 import shards
from gpt2.data import TokenLoader
from gpt2.shards import DataError, ShardError
from gpt2.tokenizer import decode, encode

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "data_prep" / "download.py")
EOT_TEXT = "<|endoftext|>"

DOCS = [
    "Hello world. Tokens, shards and loaders.\n\n\n  Indented line\twith tab \n",
    "Ünïcödé — “quotes” and emoji 🚀; numbers 12345 and 3.14159.\r\nWindows line end.",
    "x" * 50 + "\n" + "word " * 200 + "\n   \n" + "trailing spaces   ",
    "Short.",
]


def write_texts(directory: Path, docs: list[str]) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (directory / f"{i:03d}.txt").write_text(doc, encoding="utf-8")
    return f"text:{directory}/*.txt"


def all_tokens(out: Path, name: str) -> np.ndarray:
    paths = sorted(out.glob(f"{name}_*.bin"), key=lambda p: shards.parse_shard_name(p.name)[2])  # type: ignore[index]
    return np.concatenate([shards.read_tokens(p) for p in paths])


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_round_trip_text_shards_loader_decode(tmp_path: Path) -> None:
    spec = write_texts(tmp_path / "src", DOCS)
    out = tmp_path / "out"
    result = prepare(spec, out, shard_size=40, num_shards=None, workers=2)
    expected = "".join(EOT_TEXT + d.replace("\r\n", "\n") for d in DOCS)  # text mode reads \r\n as \n
    assert decode(all_tokens(out, "text").tolist()) == expected
    assert result["shards"] == len(list(out.glob("*.bin"))) > 3 and result["tokens"]["val"] == 40
    # through the loader: seq_len 1 makes every token but a shard's last an input, that one a target
    text = ""
    for split in ("val", "train"):
        loader = TokenLoader(out, split, 1, 1, shuffle=False)
        per_shard = [shards.read_header(p).num_tokens - 1 for p in loader.paths]
        for n in per_shard:
            xs = [loader.next_batch() for _ in range(n)]
            text += decode([int(x[0, 0]) for x, _ in xs] + [int(xs[-1][1][0, 0])])
    assert text == expected


def test_tokenizer_is_gpt2s() -> None:
    assert encode("Hello world") == [15496, 995]
    assert decode([50256]) == EOT_TEXT


def test_long_documents_are_cut_without_changing_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    doc = "".join(f"Line {i}:  text\n\n\nmore  \n x\n\t\n" for i in range(60))
    monkeypatch.setattr(download, "_MAX_UNIT_CHARS", 64)  # force many pieces
    whole = encode(doc)
    for max_chars in range(8, 90, 3):  # cuts land at many different places
        pieces = download._safe_pieces(doc, max_chars)
        assert len(pieces) > 10 and "".join(pieces) == doc
        assert sum((encode(p) for p in pieces), []) == whole, max_chars
    out = tmp_path / "out"
    prepare(write_texts(tmp_path / "src", [doc, doc]), out, shard_size=100, num_shards=None)
    assert all_tokens(out, "text").tolist() == [50256, *encode(doc)] * 2


def test_output_is_deterministic_and_resumes_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    one = tmp_path / "one"
    prepare("pydoc", one, shard_size=20_000, num_shards=None, workers=1)
    monkeypatch.setattr(download, "_BATCH_CHARS", 5_000)  # many small batches, out-of-order completion
    two = tmp_path / "two"
    prepare("pydoc", two, shard_size=20_000, num_shards=None, workers=2)
    assert files(one) == files(two)

    # a run killed after 3 shards, then re-run: the rest is written, the finished ones skipped
    killed = tmp_path / "killed"
    real_write, count = shards.write_shard, [0]

    def dies_after_three(path: Path, tokens: np.ndarray, prov: shards.Provenance | None = None) -> None:
        if count[0] == 3:
            raise KeyboardInterrupt
        count[0] += 1
        real_write(path, tokens, prov)

    monkeypatch.setattr(shards, "write_shard", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare("pydoc", killed, shard_size=20_000, num_shards=None)
    monkeypatch.setattr(shards, "write_shard", real_write)
    assert len(list(killed.glob("*.bin"))) == 3 and not list(killed.glob(".*"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in killed.iterdir()}
    result = prepare("pydoc", killed, shard_size=20_000, num_shards=None)
    assert result["skipped"] == 3 and len(result["written"]) == len(files(one)) - 3
    assert files(killed) == files(one)
    assert all(killed.joinpath(n).stat().st_mtime_ns == t for n, t in mtimes.items())  # not rewritten
    assert prepare("pydoc", killed, shard_size=20_000, num_shards=None)["written"] == []  # all done


def test_num_shards_then_more(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = prepare("pydoc", out, shard_size=20_000, num_shards=3)
    assert [n for n in first["written"]] == ["pydoc_val_000000.bin", "pydoc_train_000001.bin",
                                             "pydoc_train_000002.bin"]
    assert first["tokens"] == {"val": 20_000, "train": 40_000}
    more = prepare("pydoc", out, shard_size=20_000, num_shards=5, val_shards=1)
    assert more["skipped"] == 3 and more["written"] == ["pydoc_train_000003.bin", "pydoc_train_000004.bin"]
    ref = tmp_path / "ref"
    prepare("pydoc", ref, shard_size=20_000, num_shards=5)
    assert files(out) == files(ref)


def test_val_shards_and_val_size(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = prepare("pydoc", out, shard_size=50_000, num_shards=4, val_shards=2, val_size=5_000)
    assert result["written"] == ["pydoc_val_000000.bin", "pydoc_val_000001.bin", "pydoc_train_000002.bin",
                                 "pydoc_train_000003.bin"]
    assert result["tokens"] == {"val": 10_000, "train": 100_000}


def test_jsonl_and_parquet_sources(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(DOCS[:2])) + "\n\n")
    pq.write_table(pa.table({"content": DOCS[2:]}), src / "b.parquet")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b\.parquet has no column 'text'"):
        prepare(f"text:{src}/*", out, shard_size=1000, num_shards=None)
    (src / "b.parquet").unlink()
    pq.write_table(pa.table({"text": DOCS[2:]}), src / "b.parquet")
    prepare(f"text:{src}/*", out, shard_size=1000, num_shards=None)
    assert decode(all_tokens(out, "text").tolist()) == "".join(EOT_TEXT + d for d in DOCS)


def test_bad_jsonl_line_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: .*--text_field"):
        prepare(f"text:{src}/*.jsonl", tmp_path / "out", shard_size=1000, num_shards=None)


def test_existing_shards_are_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare("pydoc", out, shard_size=20_000, num_shards=2)
    before = files(out)
    with pytest.raises(DataError, match="other flags"):
        prepare("pydoc", out, shard_size=30_000, num_shards=None)
    assert files(out) == before
    # a truncated finished shard: named, left in place for the user to delete
    train = out / "pydoc_train_000001.bin"
    train.write_bytes(before[train.name][:-100])
    with pytest.raises(ShardError, match=r"pydoc_train_000001\.bin is truncated"):
        prepare("pydoc", out, shard_size=20_000, num_shards=None)
    assert train.read_bytes() == before[train.name][:-100]
    # a foreign file where our next shard would go
    train.write_bytes(before[train.name])
    (out / "pydoc_train_000005.bin").write_bytes(before[train.name])
    with pytest.raises(DataError, match="does not continue the finished shards"):
        prepare("pydoc", out, shard_size=20_000, num_shards=None)


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "never"
    for args, words in [(["--dataset", "nope", "--dir", str(out)], "unknown --dataset 'nope'"),
                        (["--dataset", f"text:{tmp_path}/none/*.txt", "--dir", str(out)], "matches no files"),
                        (["verify", str(out)], "not a directory")]:
        proc = cli(*args)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and words in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()  # nothing was created for bad input


def test_cli_prepare_then_verify(tmp_path: Path) -> None:
    out = tmp_path / "pydoc"
    proc = cli("--dataset", "pydoc", "--dir", str(out), "--shard_size", "20000", "--num_shards", "8")
    assert proc.returncode == 0, proc.stderr
    assert (out / "pydoc_val_000000.bin").exists() and len(list(out.glob("*.bin"))) == 7  # all the data fits 7
    proc = cli("verify", str(out))
    assert proc.returncode == 0 and "OK, 7 shards" in proc.stdout


def test_hub_unreachable_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download.socket, "create_connection", no_network)
    with pytest.raises(DataError) as err:
        download.check_hub_reachable()
    msg = str(err.value)
    assert "unreachable" in msg and "Name or service not known" in msg and "text:<glob>" in msg and "\n" not in msg


def hub_env(tmp_path: Path) -> dict[str, str]:
    # Offline and with a private cache: these tests never touch the network or the user's ~/.cache.
    # USE_TORCH=0 spares `datasets` importing torch, which is most of these subprocesses' time.
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "USE_TORCH": "0"}


def test_hub_dataset_offline_cli_error(tmp_path: Path) -> None:
    proc = cli("--dataset", "fineweb-edu", "--dir", str(tmp_path / "fw"), env=hub_env(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "unreachable" in proc.stderr and "--hf_root" in proc.stderr


def test_hub_code_path_on_local_copies(tmp_path: Path) -> None:
    """wikitext-2 and fineweb-edu through `datasets.load_dataset`, from local copies in the hub's layout."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hub = tmp_path / "hub"
    wt = hub / "Salesforce" / "wikitext"
    (wt / "wikitext-2-raw-v1").mkdir(parents=True)
    (wt / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: wikitext-2-raw-v1
          data_files:
          - split: train
            path: wikitext-2-raw-v1/train-*
        ---
        """))
    lines = ["", " = First = \n", "", " Body one .\n", " = = Section = = \n", " More .\n", "",
             " = Second = \n", "", " Body two .\n"]
    pq.write_table(pa.table({"text": lines}), wt / "wikitext-2-raw-v1" / "train-00000-of-00001.parquet")
    fw = hub / "HuggingFaceFW" / "fineweb-edu"
    (fw / "sample" / "10BT").mkdir(parents=True)
    (fw / "README.md").write_text(textwrap.dedent("""\
        ---
        configs:
        - config_name: sample-10BT
          data_files:
          - split: train
            path: sample/10BT/*
        ---
        """))
    for i in range(2):
        pq.write_table(pa.table({"text": [f"doc {i}.{j}" for j in range(3)], "score": [3.0] * 3}),
                       fw / "sample" / "10BT" / f"00{i}_00000.parquet")
    script = textwrap.dedent(f"""
        import json, sys
        from pathlib import Path
        from data_prep.download import prepare
        from gpt2 import shards
        from gpt2.tokenizer import decode
        out = {{}}
        for name in ("wikitext-2", "fineweb-edu"):
            d = Path({str(tmp_path)!r}) / name
            prepare(name, d, shard_size=8, num_shards=None, hf_root=Path({str(hub)!r}))
            paths = sorted(d.glob("*.bin"), key=lambda p: shards.parse_shard_name(p.name)[2])
            out[name] = decode([int(t) for p in paths for t in shards.read_tokens(p)])
        print(json.dumps(out))
        """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, **hub_env(tmp_path)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # wikitext rows are lines: regrouped into one document per top-level " = Title = " article
    assert got["wikitext-2"] == (EOT_TEXT + " = First = \n Body one .\n = = Section = = \n More .\n"
                                 + EOT_TEXT + " = Second = \n Body two .\n")
    assert got["fineweb-edu"] == "".join(EOT_TEXT + f"doc {i}.{j}" for i in range(2) for j in range(3))
