"""The GPT-2 tokenizer (tiktoken's r50k_base merges), offline first.

`make setup` runs `python -m gpt2.tokenizer install`, which takes the r50k_base ranks file
out of the openai-whisper sdist on PyPI (the only registry reachable on our machines) and
places it inside the virtual environment, verified by sha256. `get_encoding()` uses that
file when present and falls back to `tiktoken.get_encoding("gpt2")` (which downloads) otherwise.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import tiktoken
import tiktoken.load  # a submodule: `import tiktoken` alone does not load it

from gpt2.errors import UserError
from gpt2.safe_write import write_atomic

EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
_WHISPER_SDIST = "openai-whisper==20250625"
_WHISPER_MEMBER = "openai_whisper-20250625/whisper/assets/gpt2.tiktoken"
# r50k_base's pre-tokenisation pattern (GPT-2's own regex).
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def ranks_path() -> Path:
    """Where the ranks file lives: $GPT2_TIKTOKEN_FILE, else inside the running environment."""
    env = os.environ.get("GPT2_TIKTOKEN_FILE")
    if env:
        return Path(env)
    return Path(sys.prefix) / "share" / "gpt2-tokenizer" / "gpt2.tiktoken"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class TokenizerError(UserError, ValueError):
    """The GPT-2 ranks are neither installed nor downloadable (or the installed file is wrong)."""


@lru_cache(maxsize=1)
def get_encoding() -> tiktoken.Encoding:
    """GPT-2's encoding: from the installed ranks file if present, else tiktoken's download.

    Raises TokenizerError (one line, with the command to run) when the file is corrupt, or missing
    on a machine where tiktoken cannot download it.
    """
    path = ranks_path()
    if not path.exists():
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:  # requests' and tiktoken's errors alike: the cause is no network
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise TokenizerError(f"the GPT-2 tokenizer is not installed at {path} and tiktoken could not download "
                                 f"it ({reason}); run `make setup` (or `python -m gpt2.tokenizer install`)") from None
    if _sha256(path) != RANKS_SHA256:
        raise TokenizerError(f"{path} does not have the r50k_base sha256; run `python -m gpt2.tokenizer install`")
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    return tiktoken.Encoding(
        name="gpt2", pat_str=_PAT, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT}
    )


def encode(text: str) -> list[int]:
    return get_encoding().encode_ordinary(text)


def decode(tokens: list[int]) -> str:
    return get_encoding().decode(tokens)


def install(dest: Path | None = None) -> Path:
    """Put the verified ranks file in place (idempotent; needs PyPI once)."""
    dest = dest or ranks_path()
    if dest.exists() and _sha256(dest) == RANKS_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               _WHISPER_SDIST, "-d", tmp]
        subprocess.run(cmd, check=True)
        sdist = next(Path(tmp).glob("openai_whisper-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            member = tar.extractfile(_WHISPER_MEMBER)
            assert member is not None
            data = member.read()
    if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
        raise RuntimeError(f"{_WHISPER_SDIST}: {_WHISPER_MEMBER} has an unexpected sha256")
    write_atomic(dest, data)
    return dest


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        print("usage: python -m gpt2.tokenizer install", file=sys.stderr)
        sys.exit(2)
    print(f"GPT-2 tokenizer ranks at {install()}")
