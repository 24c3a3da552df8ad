"""Export to the Hugging Face layout and sampling (gpt2/export.py, gpt2/generate.py).

The DDP-layout tests build a checkpoint in this process (fast). One slow test exports a 2-rank
DeepSpeed ZeRO-3 checkpoint, the most sharded layout; FSDP and ZeRO-2 exports are checked
against the backend's own gathered weights in test_resume.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import billion_laughs

from gpt2 import export, generate
from gpt2.checkpoint.manager import CheckpointManager
from gpt2.compose import load_config
from gpt2.config import CheckpointSettings, to_dict
from gpt2.distributed import DistInfo
from gpt2.model import GPT, GPT2Config

SHAPE = ["model.config.n_layer=2", "model.config.n_head=2", "model.config.n_embd=64", "model.config.block_size=64"]


class ModelOnly:
    """Saves like the DDP backend: the plain model's state dict as model.pt."""

    name = "ddp"

    def __init__(self, model: GPT):
        self.model = model

    def save(self, ckpt_dir: Path) -> None:
        torch.save(self.model.state_dict(), ckpt_dir / "model.pt")
        torch.save({"state": {}, "param_groups": []}, ckpt_dir / "optimizer.pt")


def make_run(run_dir: Path, *overrides: str, steps: tuple[int, ...] = (1,), seed: int = 0) -> GPT:
    """A run directory with DDP-layout checkpoints at `steps`; returns the model of the last one."""
    cfg = load_config([*SHAPE, *overrides, f"run.dir={run_dir}"])
    m = cfg.model.config
    mgr = CheckpointManager(run_dir / "checkpoints", CheckpointSettings(keep_last=5),
                            DistInfo(0, 1, 0, torch.device("cpu")))
    for step in steps:
        torch.manual_seed(seed + step)
        model = GPT(GPT2Config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                               vocab_size=m.vocab_size, bias=m.bias))
        if not m.bias:  # LayerNorm gains start at one: perturb them so the test sees them
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.data.add_(torch.randn_like(p) * 0.1, alpha=1.0)
                    assert "bias" not in name
        mgr.save(step, ModelOnly(model), meta={"resolved_config": to_dict(cfg), "config": {}, "wandb_id": "w1"},
                 trainer_state={"step": step, "tokens": 0, "data": {}})
    return model.eval()


def hf_logits(out: Path, x: torch.Tensor) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        return hf(x).logits


@pytest.mark.parametrize("bias", [True, False])
def test_export_opens_in_transformers_with_the_same_logits(bias: bool, tmp_path: Path) -> None:
    model = make_run(tmp_path / "run", f"model.config.bias={str(bias).lower()}")
    out = export.export(tmp_path / "run", tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["n_positions"], cfg["vocab_size"]) == (2, 2, 64, 64, 50257)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x)[0]
    torch.testing.assert_close(hf_logits(out, x), ours, rtol=1e-4, atol=1e-4)


def test_export_takes_the_newest_checkpoint_that_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_run(tmp_path / "run", steps=(1, 2))
    (tmp_path / "run" / "checkpoints" / "step_00000002" / "model.pt").write_bytes(b"torn")
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["step"] == 1
    assert "model.safetensors" in capsys.readouterr().out


def test_export_of_a_checkpoint_directory_itself(tmp_path: Path) -> None:
    make_run(tmp_path / "run", steps=(1, 2))
    export.export(tmp_path / "run" / "checkpoints" / "step_00000001", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "export.json").read_text())["step"] == 1


def test_export_without_checkpoint_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert export.main([str(tmp_path / "empty"), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no checkpoint under") and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_generate_samples_from_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpt2.tokenizer import ranks_path

    if not ranks_path().exists():
        pytest.skip("the GPT-2 ranks file is not installed (`make setup`); tests never download it")
    model = make_run(tmp_path / "run")
    args = [str(tmp_path / "run"), "--prompt", "Hello world", "--max_new_tokens", "5", "--temperature", "0"]
    assert generate.main(args) == 0
    text = capsys.readouterr().out.strip()
    from gpt2.tokenizer import get_encoding

    enc = get_encoding()
    greedy = model.generate(torch.tensor([[15496, 995]]), 5, temperature=0)  # "Hello world", greedy
    assert text == enc.decode(greedy[0].tolist())
    assert generate.main([*args, "--max_new_tokens", "0"]) == 2


def _edit_manifest(ckpt: Path, change: object) -> None:
    path = ckpt / "MANIFEST.json"
    m = json.loads(path.read_text())
    change(m)  # type: ignore[operator]
    path.write_text(json.dumps(m))


def _refused(main: object, args: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    assert main(args) == 2  # type: ignore[operator]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    for needle in needles:
        assert needle in captured.err, (needle, captured.err)
    return captured.err


def _shape(**change: object):  # noqa: ANN202 - a manifest edit
    return lambda m: m["resolved_config"]["model"]["config"].update(change)


SHAPES = {
    "n_head not dividing n_embd": (_shape(n_head=3), "model.config.n_embd (64) must be divisible by model.config.n_head (3)"),
    "vocab_size negative": (_shape(vocab_size=-1), "model.config.vocab_size must be >= 1 (got -1)"),
    "dropout nan": (_shape(dropout=float("nan")), "model.config.dropout is nan"),
    "n_embd huge": (_shape(n_embd=10**12), "more than 1e+11: its manifest is wrong"),
    "layers beyond the files": (_shape(n_layer=10**5), "more than its files"),
}


@pytest.mark.parametrize("kind", list(SHAPES))
def test_a_model_shape_that_cannot_be_built_is_one_line(kind: str, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The manifest's model shape is checked as a run's config is, and against the size of the
    checkpoint's files, before any model is built (no AssertionError, no huge allocation)."""
    change, needle = SHAPES[kind]
    make_run(tmp_path / "run")
    _edit_manifest(tmp_path / "run" / "checkpoints" / "step_00000001", change)
    _refused(export.main, [str(tmp_path / "run"), "--out", str(tmp_path / "hf")], capsys, needle)
    _refused(generate.main, [str(tmp_path / "run"), "--max_new_tokens", "1"], capsys, needle)
    assert not (tmp_path / "hf").exists()


def _set_weight(ckpt: Path, value: float, *names: str) -> None:
    """Write `value` into the first element of each named weight of a checkpoint, its manifest kept consistent."""
    import hashlib

    sd = torch.load(ckpt / "model.pt", weights_only=True)
    for name in names:
        sd[name].view(-1)[0] = value
    torch.save(sd, ckpt / "model.pt")
    data = (ckpt / "model.pt").read_bytes()
    _edit_manifest(ckpt, lambda m: m["files"].__setitem__("model.pt", {"size": len(data),
                                                                       "sha256": hashlib.sha256(data).hexdigest()}))


def test_generate_from_diverged_weights_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """NaN weights (a diverged run, its checkpoint whole): one line, not torch.multinomial's error."""
    make_run(tmp_path / "run")
    _set_weight(tmp_path / "run" / "checkpoints" / "step_00000001", float("nan"), "transformer.h.1.mlp.c_fc.weight")
    _refused(generate.main, [str(tmp_path / "run"), "--max_new_tokens", "2"], capsys,
             "the weights hold NaN or inf (transformer.h.1.mlp.c_fc.weight)", "step_00000001")


def test_generate_with_overflowing_logits_or_a_bad_temperature_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Finite weights whose logits overflow to inf, and a temperature so small that the scaled logits
    do: one line naming the checkpoint (was torch.multinomial's RuntimeError, or sampling garbage);
    a NaN temperature is refused before anything loads."""
    make_run(tmp_path / "run")
    run = str(tmp_path / "run")
    _refused(generate.main, [run, "--temperature", "nan"], capsys, "--temperature and --top_k must be finite")
    _refused(generate.main, [run, "--temperature", "1e-320", "--max_new_tokens", "1"], capsys,
             "the logits for new token 1 are not finite (temperature 1e-320)", "step_00000001")
    assert generate.main([run, "--temperature", "1e-30", "--max_new_tokens", "2"]) == 0  # large but finite
    assert capsys.readouterr().out.count("\n") == 1
    # two residual additions of 3e38 (each finite) overflow the float32 stream: inf, then NaN after ln_f
    _set_weight(tmp_path / "run" / "checkpoints" / "step_00000001", 3e38,
                "transformer.h.0.mlp.c_proj.bias", "transformer.h.1.mlp.c_proj.bias")
    _refused(generate.main, [run, "--max_new_tokens", "1"], capsys, "the logits for new token 1 are not finite",
             "raise --temperature, use 0 for greedy, or sample from an earlier checkpoint")


CONFIGS = {
    "a YAML parse error": (b"trainer: [\n  !!python/object/apply:os.system [x]", "not a readable YAML config"),
    "not UTF-8": (b"\xff\xfe\x00{{{: :", "not a readable YAML config ('utf-8' codec"),
    "a python tag": (b"!!python/object/apply:os.system [x]", "could not determine a constructor"),
    "a scalar": (b"5", "not a YAML config"),
    "an alias inside itself": (b"a: &a [*a]", "nested too deeply or refers to itself"),
    "a billion laughs": (billion_laughs().encode(), "expands through its YAML aliases to more than 100,000 values"),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_damaged_run_config_is_one_line(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """export/generate read the run directory's config.yaml to find its checkpoints: a damaged one is
    one line saying where else to point (the checkpoints themselves still export)."""
    data, needle = CONFIGS[kind]
    make_run(tmp_path / "run")
    (tmp_path / "run" / "config.yaml").write_bytes(data)
    _refused(export.main, [str(tmp_path / "run"), "--out", str(tmp_path / "hf")], capsys,
             "config.yaml: ", needle, "give the checkpoints directory")
    _refused(generate.main, [str(tmp_path / "run")], capsys, "config.yaml: ", needle)
    assert export.main([str(tmp_path / "run" / "checkpoints"), "--out", str(tmp_path / "hf")]) == 0


def test_export_without_checksums_of_a_damaged_archive_is_one_line(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """--no_checksums: a damaged zip (torch's reader refuses it) is named in one line, not a traceback."""
    make_run(tmp_path / "run")
    model = tmp_path / "run" / "checkpoints" / "step_00000001" / "model.pt"
    data = model.read_bytes()
    model.write_bytes(data.replace(b"/data/0", b"/data/X"))  # the first tensor's record, renamed in place
    _refused(export.main, [str(model.parent), "--out", str(tmp_path / "hf"), "--no_checksums"], capsys,
             "step_00000001: model.pt: unreadable as a checkpoint file")


class DCPOnly(ModelOnly):
    """Saves like the FSDP backend: the model's state dict as a DCP checkpoint under dcp/."""

    name = "fsdp"

    def save(self, ckpt_dir: Path) -> None:
        import warnings

        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": self.model.state_dict()}, checkpoint_id=str(ckpt_dir / "dcp"), no_dist=True)


def test_export_of_a_dcp_checkpoint_torch_cannot_read_is_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A DCP .metadata that scans clean but points past the end of its shard (sha256 rewritten to
    match): DCP's CheckpointException becomes one line naming the directory."""
    import hashlib
    import pickle

    cfg = load_config([*SHAPE, f"run.dir={tmp_path / 'run'}"])
    m = cfg.model.config
    model = GPT(GPT2Config(n_layer=m.n_layer, n_head=m.n_head, n_embd=m.n_embd, block_size=m.block_size,
                           vocab_size=m.vocab_size))
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints", CheckpointSettings(), DistInfo(0, 1, 0, torch.device("cpu")))
    ckpt = mgr.save(1, DCPOnly(model), meta={"resolved_config": to_dict(cfg), "config": {}},
                    trainer_state={"step": 1, "tokens": 0, "data": {}})
    assert export.main([str(ckpt), "--out", str(tmp_path / "hf")]) == 0  # as written, it exports
    meta = pickle.loads((ckpt / "dcp" / ".metadata").read_bytes())
    for index, info in meta.storage_data.items():
        meta.storage_data[index] = type(info)(info.relative_path, info.offset + (1 << 30), info.length)
    data = pickle.dumps(meta)
    (ckpt / "dcp" / ".metadata").write_bytes(data)
    _edit_manifest(ckpt, lambda man: man["files"].__setitem__("dcp/.metadata", {
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    capsys.readouterr()
    _refused(export.main, [str(ckpt), "--out", str(tmp_path / "hf2")], capsys, "dcp is unreadable (rank 0: ")


@pytest.mark.slow
def test_export_of_two_rank_zero3_checkpoint(pydoc_shards: Path, tmp_path: Path) -> None:
    from test_resume import launch

    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    run = tmp_path / "run"
    args = [*SHAPE, "dataset.seq_len=32", "trainer.config.batch_size=2", "trainer.config.eval_interval=0",
            "trainer.config.max_steps=1", "run.device=cpu", "wandb.mode=disabled", "trainer=deepspeed",
            f"trainer.config.deepspeed_config={ds}", f"dataset.train_dataset.data_root={pydoc_shards}",
            f"dataset.val_dataset.data_root={pydoc_shards}", f"run.dir={run}"]
    launch(2, args, tmp_path / "out", 0, GPT2_TEST_DUMP_FULL_STATE="1")
    out = export.export(run, tmp_path / "hf")
    full = torch.load(run / "full_state_1.pt", weights_only=True)  # the engine's own gather of the weights
    model = GPT(GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=64))
    model.load_state_dict({k: v.float() for k, v in full.items()})
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.eval()(x)[0]
    torch.testing.assert_close(hf_logits(out, x), ours, rtol=1e-4, atol=1e-4)
