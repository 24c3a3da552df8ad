"""Checkpoints whose files pass every check on bytes (the sha256 matches, or is not checked) but hold
what torch cannot use, or what does not fit the live model and optimizer; and the quarantine folder
that is no folder. Found by fuzzing; the helpers are tests/test_trust.py's."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_checkpoint / test_trust, also as a script

from test_trust import export_refused, falls_back, rewrite, two_steps  # noqa: E402


# ---- files whose sha256 matches (or is not checked) but whose content is no checkpoint's ----------
def _torch_bytes(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unreadable_archive() -> bytes:
    """A torch archive whose pickle scans clean but whose tensor record is gone (renamed in place,
    same length: zipfile reads it, torch's reader cannot): what a damaged zip looks like to torch."""
    data = _torch_bytes({"w": torch.zeros(4)})
    assert data.count(b"/data/0") == 2  # the record's local header and its central directory entry
    return data.replace(b"/data/0", b"/data/9")


_GOOD_NUMPY = ["MT19937", torch.zeros(624, dtype=torch.int64), 0.0, 0.0, 0.0]
CONTENT = {
    "model.pt damaged zip": ("model.pt", _unreadable_archive, "model.pt: unreadable as a checkpoint file"),
    "model.pt a list": ("model.pt", lambda: _torch_bytes([1, 2]), "model.pt holds a list, not a model state dict"),
    "model.pt an int": ("model.pt", lambda: _torch_bytes(5), "model.pt holds a int"),
    "model.pt empty": ("model.pt", lambda: _torch_bytes({}), "model.pt holds an empty state dict"),
    "optimizer.pt damaged zip": ("optimizer.pt", _unreadable_archive, "optimizer.pt: unreadable"),
    "optimizer.pt empty": ("optimizer.pt", lambda: _torch_bytes({}), "optimizer.pt holds no optimizer state"),
    "optimizer.pt a list": ("optimizer.pt", lambda: _torch_bytes([1]), "optimizer.pt holds a list, not an optimizer"),
    "rng empty": ("rank_00000.pt", lambda: _torch_bytes({}), "rank_00000.pt has no python RNG state"),
    "rng python an int": ("rank_00000.pt", lambda: _torch_bytes({"python": 1, "numpy": 1, "torch": 1}),
                          "rank_00000.pt holds unusable RNG states"),
    "rng torch too short": ("rank_00000.pt", lambda: _torch_bytes(
        {"python": [3, [0] * 624 + [624], None], "numpy": _GOOD_NUMPY, "torch": torch.zeros(3, dtype=torch.uint8)}),
        "rank_00000.pt holds unusable RNG states"),
}


@pytest.mark.parametrize("kind", list(CONTENT))
def test_content_that_torch_cannot_use_invalidates(kind: str, tmp_path: Path, warnings: list[str],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The sha256 is no defence against a crafted file (its writer rewrites the MANIFEST too), nor
    when checksums are off: what torch cannot read, or reads as something else, fails verification."""
    from gpt2.checkpoint import manager as checkpoint

    rel, make, needle = CONTENT[kind]
    root = tmp_path / "ck"
    _, newest = two_steps(root)
    rewrite(newest, rel, make())
    assert needle in (checkpoint.verify(newest, checksums=False) or ""), checkpoint.verify(newest, checksums=False)
    export_refused(newest, tmp_path / "hf", capsys, "step_00000002", needle)
    falls_back(root, warnings, needle)


def test_rng_state_that_does_not_restore_is_one_line(tmp_path: Path) -> None:
    """Restoring checks what it restores (a resume that skipped verification of it, or a race)."""
    from test_checkpoint import manager

    from gpt2.checkpoint.files import CheckpointError

    root = tmp_path / "ck"
    _, newest = two_steps(root)
    resume = manager(root).find_latest()
    assert resume is not None and resume.step == 2
    torch.save({"python": [3, (1, 2), None], "numpy": _GOOD_NUMPY, "torch": torch.get_rng_state()},
               newest / "rank_00000.pt")
    before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt holds unusable RNG states .*move its checkpoint aside"):
        manager(root).restore_rng(resume)
    assert torch.equal(torch.get_rng_state(), before)  # nothing half-restored


def _ddp_backend() -> object:
    """A DDP backend with a tiny model and its AdamW, without a process group (no `setup`)."""
    from gpt2.backends.base import make_adamw
    from gpt2.backends.ddp import DDPBackend
    from gpt2.config import TrainerSettings
    from gpt2.distributed import DistInfo
    from gpt2.model import GPT, GPT2Config

    b = DDPBackend(TrainerSettings(), DistInfo(0, 1, 0, torch.device("cpu")))
    b.raw_model = GPT(GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=64, pad_vocab_to=1))
    b.optimizer = make_adamw(b.raw_model, b.s, b.device)
    return b


def _stepped(b: object) -> dict[str, object]:
    """model.pt and optimizer.pt as DDP saves them, after one optimizer step (AdamW has moments)."""
    loss = b.raw_model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))[1]
    loss.backward()
    b.optimizer.step()
    return {"model.pt": b.raw_model.state_dict(), "optimizer.pt": b.optimizer.state_dict()}


def _moment_of_other_shape(opt: dict) -> dict:
    opt["state"][0]["exp_avg"] = torch.zeros(3)
    return opt


DDP_LOAD = {
    "model missing weights": ("model.pt", lambda sd: {"transformer.wte.weight": sd["transformer.wte.weight"]},
                              r"model\.pt does not fit this run's model \(\d+ weights missing"),
    "model weight of another shape": ("model.pt", lambda sd: {**sd, "transformer.wpe.weight": torch.zeros(3, 16)},
                                      r"model\.pt does not fit this run's model \(transformer\.wpe\.weight has shape"),
    "optimizer empty": ("optimizer.pt", lambda opt: {}, r"optimizer\.pt holds no optimizer state"),
    "optimizer a list": ("optimizer.pt", lambda opt: [1], r"optimizer\.pt holds a list, not an optimizer state"),
    "optimizer other groups": ("optimizer.pt", lambda opt: {"state": {}, "param_groups": [{"params": [0]}]},
                               r"optimizer\.pt does not fit this run's optimizer \(ValueError: .*parameter groups"),
    "optimizer moment of another shape": ("optimizer.pt", _moment_of_other_shape,
                                          r"optimizer\.pt holds exp_avg of shape \(3,\)"),
}


@pytest.mark.parametrize("kind", list(DDP_LOAD))
def test_ddp_load_of_states_that_do_not_fit_is_one_line(kind: str, tmp_path: Path) -> None:
    """What verification cannot know (the run's own model and optimizer): a one-line CheckpointError."""
    from gpt2.checkpoint.files import CheckpointError

    rel, change, pattern = DDP_LOAD[kind]
    b = _ddp_backend()
    files = _stepped(b)
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
    _ddp_backend().load(tmp_path)  # the states as saved fit
    torch.save(change(files[rel]), tmp_path / rel)
    with pytest.raises(CheckpointError, match=pattern) as info:
        b.load(tmp_path)
    assert "\n" not in str(info.value) and "move its checkpoint aside" in str(info.value)


def test_a_file_named_quarantine_is_one_line(tmp_path: Path) -> None:
    from test_checkpoint import manager

    from gpt2.errors import UserError

    root = tmp_path / "ck"
    _, newest = two_steps(root)
    (root / "quarantine").write_text("x")
    (newest / "MANIFEST.json").write_text("{")
    with pytest.raises(UserError, match=r"quarantine is not a directory: .*move quarantine aside") as info:
        manager(root).find_latest()
    assert "\n" not in str(info.value)
    assert newest.is_dir() and (root / "quarantine").read_text() == "x"  # nothing moved, nothing lost


def test_quarantine_never_leaves_the_run_through_a_symlink(tmp_path: Path) -> None:
    from test_checkpoint import manager

    from gpt2.errors import UserError

    root, outside = tmp_path / "ck", tmp_path / "outside"
    outside.mkdir()
    _, newest = two_steps(root)
    (root / "quarantine").symlink_to(outside)
    (newest / "MANIFEST.json").write_text("{")
    with pytest.raises(UserError, match="quarantine is a symlink"):
        manager(root).find_latest()
    assert newest.is_dir() and not any(outside.iterdir())


def test_reason_file_is_never_written_through_a_symlink(tmp_path: Path, warnings: list[str]) -> None:
    from gpt2.checkpoint.quarantine import REASON_FILE, quarantine, slug

    root = tmp_path / "ck"
    _, newest = two_steps(root)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (root / "quarantine").mkdir()
    reason = "step_00000002: model.pt is wrong"
    (root / "quarantine" / f"step_00000002-{slug('model.pt is wrong')}.{REASON_FILE}").symlink_to(victim)
    dest = quarantine(root, newest, reason)
    assert victim.read_text() == "precious\n"
    assert (dest.parent / f"{dest.name}.{REASON_FILE}").read_text() == reason + "\n"


