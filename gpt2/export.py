"""Export a checkpoint as a Hugging Face GPT-2: `python -m gpt2.export RUN_DIR --out DIR`.

RUN_DIR may be a run directory (its newest checkpoint that verifies is used), a checkpoints
directory, or one `step_XXXXXXXX/` checkpoint. Any backend's checkpoint works, in a single
process and without a process group:

- ddp:       `model.pt` (the whole model, our layout);
- fsdp:      the DCP shards under `dcp/`, read into one unsharded model whatever the world size;
- deepspeed: the engine's files under `deepspeed/`, consolidated by DeepSpeed's zero_to_fp32
             (ZeRO-1/2/3 partitions merged into fp32 weights).

Nothing is unpickled beyond what the backend's files contain: every pickle is scanned against
an allow-list and read weights_only (gpt2.checkpoint.safe_load); a crafted file is refused with one line.

DIR receives `model.safetensors` (the `transformers.GPT2LMHeadModel` layout: Conv1D weights,
unpadded vocabulary, lm_head tied to wte) and `config.json`, so
`GPT2LMHeadModel.from_pretrained(DIR)` opens it, plus `export.json` naming the source.
A model trained without biases is exported with zero biases, which computes the same function.
Exit codes: 0 written, 2 bad input (one line on stderr).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from gpt2.checkpoint import safe_load
from gpt2.checkpoint.files import state_dict_problem
from gpt2.checkpoint.manager import CheckpointError, read_manifest, resolve
from gpt2.config import Config, ConfigError, ModelSettings, structured, validate
from gpt2.errors import EXIT_OK, ArgumentParser, UserError, report
from gpt2.model import GPT, GPT2Config

_TIED = ("transformer.wte.weight", "lm_head.weight")
MAX_PARAMS = 100e9  # a model bigger than this is not one this toolkit trained: a manifest to refuse


def model_config(manifest: dict[str, Any]) -> GPT2Config:
    """The model shape a checkpoint was trained with (from its manifest's resolved config), checked
    as a run's config is and against the checkpoint's size before any model is built (CheckpointError)."""
    try:
        m = manifest["resolved_config"]["model"]["config"]
    except (KeyError, TypeError):
        raise CheckpointError("the checkpoint's manifest has no resolved_config.model.config; "
                              "it was not written by gpt2.train") from None
    where = "the checkpoint's resolved_config"
    try:
        settings = structured(ModelSettings, m, f"{where}.model.config")
        cfg = Config()  # the model's shape checked as a run's config is (gpt2.config.validate)
        cfg.trainer.name = "ddp"  # the rest is the schema's defaults; only the model is the checkpoint's
        cfg.model.config = settings
        validate(cfg)
    except ConfigError as exc:
        raise CheckpointError(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
    shape = GPT2Config(**dataclasses.asdict(settings))
    _check_size(shape, manifest)
    return shape


def _check_size(cfg: GPT2Config, manifest: dict[str, Any]) -> None:
    """Refuse a shape whose model could not be built here, before building it: more parameters than
    MAX_PARAMS, or more than the checkpoint's files could hold (every backend saves the weights at
    two bytes or more each: a manifest that claims a bigger model than its files is wrong)."""
    E, L = cfg.n_embd, cfg.n_layer
    at_least = L * 12 * E * E + (cfg.padded_vocab_size + cfg.block_size) * E  # no biases or norms: a lower bound
    if not cfg.flash:
        at_least += L * cfg.block_size * cfg.block_size  # the causal mask buffer of each layer
    if at_least > MAX_PARAMS:
        raise CheckpointError(f"the checkpoint's model (n_layer={L}, n_embd={E}, block_size={cfg.block_size}, "
                              f"vocab_size={cfg.vocab_size}) would have {at_least:.3g} parameters, more than "
                              f"{MAX_PARAMS:.0e}: its manifest is wrong")
    files = manifest.get("files")
    stored = sum(int(f.get("size", 0)) for f in files.values()) if isinstance(files, dict) else None
    if stored is not None and 2 * at_least > stored:
        raise CheckpointError(f"the checkpoint's model (n_layer={L}, n_embd={E}) would have {at_least:,} parameters, "
                              f"more than its files ({stored:,} bytes) can hold: its manifest does not fit its weights")


def load_model_state(ckpt: Path, manifest: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The whole model of a committed checkpoint in our layout (`GPT.state_dict()` keys), fp32 on CPU.

    Single process, no process group. Raises CheckpointError for an unknown backend or missing files."""
    ckpt = Path(ckpt)
    manifest = manifest or read_manifest(ckpt)
    backend = manifest.get("backend")
    if backend == "ddp":
        sd = safe_load.load(ckpt / "model.pt")  # scanned, weights_only; unreadable: one line
        where = ckpt / "model.pt"
    elif backend == "fsdp":
        sd = _load_dcp(ckpt / "dcp", model_config(manifest))
        where = ckpt / "dcp"
    elif backend == "deepspeed":
        sd = _load_deepspeed(ckpt)
        where = ckpt / "deepspeed"
    else:
        raise CheckpointError(f"{ckpt} was written by backend {backend!r}, which export does not know "
                              "(ddp, fsdp, deepspeed)")
    why = state_dict_problem(sd)
    if why is not None:
        raise CheckpointError(f"{where} {why}: it is not a model this toolkit saved")
    if _TIED[1] not in sd and _TIED[0] in sd:  # the tie is part of the model, not of the file
        sd[_TIED[1]] = sd[_TIED[0]]
    return {k: v.float() for k, v in sd.items()}


def _load_dcp(dcp_dir: Path, cfg: GPT2Config) -> dict[str, torch.Tensor]:
    """Read the model part (`model.*`) of a DCP checkpoint into plain tensors (any world size)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    if not (dcp_dir / ".metadata").is_file():
        raise CheckpointError(f"{dcp_dir} holds no DCP checkpoint (.metadata missing)")
    safe_load.check_dir(dcp_dir, "fsdp")  # torch unpickles .metadata with plain pickle.load
    meta = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    saved = set(meta.state_dict_metadata)
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in GPT(cfg).state_dict().items()}
    target = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype) in shapes.items() if f"model.{k}" in saved}
    missing = sorted(k for k in shapes if k not in target and k != _TIED[1])
    if missing:
        raise CheckpointError(f"{dcp_dir} lacks model weights {missing[:3]}: it does not fit the manifest's model")
    state = {"model": target}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        with safe_load.weights_only_loading(safe_load.DCP):
            try:
                dcp.load(state, checkpoint_id=str(dcp_dir), no_dist=True)
            except CheckpointException as exc:
                line = safe_load.dcp_read_failure(exc)
                if line is None:
                    raise
                raise CheckpointError(f"{dcp_dir} is unreadable ({line})") from None
    return state["model"]


def _load_deepspeed(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint (tag `deepspeed`), merging ZeRO partitions."""
    from gpt2.backends.deepspeed import TAG

    tag_dir = ckpt / TAG
    if not tag_dir.is_dir():
        raise CheckpointError(f"{ckpt} has no {TAG}/ directory: not a DeepSpeed checkpoint of this toolkit")
    safe_load.check_dir(tag_dir, "deepspeed")
    # DeepSpeed pickles a few of its own objects beside the tensors: imported first, so that the
    # weights_only loads below can allow exactly those (safe_load.DEEPSPEED)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not any(tag_dir.glob("*optim_states.pt")):
        # no ZeRO partitions (stage 0): the module's weights are whole in the model-states file
        path = tag_dir / "mp_rank_00_model_states.pt"
        states = safe_load.load(path, safe_load.DEEPSPEED)
        if not isinstance(states, dict) or not isinstance(states.get("module"), dict):
            raise CheckpointError(f"{path} holds no 'module' state dict: not a DeepSpeed checkpoint of this toolkit")
        return dict(states["module"])
    with safe_load.weights_only_loading(safe_load.DEEPSPEED):  # zero_to_fp32 passes weights_only=False
        try:
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG))
        except torch.OutOfMemoryError:
            raise
        except safe_load.READ_ERRORS as exc:  # a file zero_to_fp32 cannot make sense of (damaged or crafted)
            raise CheckpointError(f"{tag_dir}: DeepSpeed's zero_to_fp32 cannot read it ({type(exc).__name__}: "
                                  f"{safe_load.brief(exc)})") from None


def load_model(path: Path, checksums: bool = True) -> tuple[GPT, dict[str, Any], Path]:
    """(model in eval mode on CPU, manifest, checkpoint dir) for a run dir or a checkpoint dir."""
    ckpt = resolve(Path(path), checksums)
    manifest = read_manifest(ckpt)
    model = GPT(model_config(manifest))
    sd = load_model_state(ckpt, manifest)
    try:
        model.load_state_dict(sd)
    except RuntimeError as exc:
        raise CheckpointError(f"{ckpt}: weights do not fit the manifest's model ({safe_load.brief(exc)})") from None
    return model.eval(), manifest, ckpt


def hf_config(cfg: GPT2Config) -> dict[str, Any]:
    """A `transformers.GPT2Config` as JSON for our model shape."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # the tanh approximation, as our MLP
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


def hf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The weights as `GPT2LMHeadModel` stores them; missing biases (bias=False) become zeros."""
    sd = model.hf_state_dict()
    sd.pop("lm_head.weight", None)  # tied to wte, as Hugging Face saves it
    if not model.config.bias:
        E = model.config.n_embd
        zeros = {"ln_1.bias": E, "ln_2.bias": E, "attn.c_attn.bias": 3 * E, "attn.c_proj.bias": E,
                 "mlp.c_fc.bias": 4 * E, "mlp.c_proj.bias": E}
        for i in range(model.config.n_layer):
            for name, n in zeros.items():
                sd.setdefault(f"transformer.h.{i}.{name}", torch.zeros(n))
        sd.setdefault("transformer.ln_f.bias", torch.zeros(E))
    return {k: v.contiguous() for k, v in sd.items()}


def export(path: Path, out: Path, checksums: bool = True) -> Path:
    """Write model.safetensors, config.json and export.json for the checkpoint at `path` into `out`."""
    from safetensors.torch import save_file

    model, manifest, ckpt = load_model(path, checksums)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = {"checkpoint": str(ckpt.resolve()), "step": manifest.get("step"), "backend": manifest.get("backend"),
              "world_size": manifest.get("world_size"), "config_hash": manifest.get("config_hash"),
              "wandb_id": manifest.get("wandb_id")}
    written = [out / "model.safetensors", out / "config.json", out / "export.json"]
    try:
        save_file(hf_tensors(model), str(written[0]), metadata={"format": "pt"})
        written[1].write_text(json.dumps(hf_config(model.config), indent=2) + "\n")
        written[2].write_text(json.dumps(source, indent=2) + "\n")
    except OSError:  # a full disk: no partial export is left to be mistaken for a whole one
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m gpt2.export", description=__doc__.split("\n")[0])
    p.add_argument("path", type=Path, help="run directory, checkpoints directory or step_XXXXXXXX checkpoint")
    p.add_argument("--out", type=Path, required=True, help="output directory (created)")
    p.add_argument("--no_checksums", action="store_true", help="check file sizes only, not sha256 (huge runs)")
    args = p.parse_args(argv)
    try:
        out = export(args.path, args.out, checksums=not args.no_checksums)
    except (UserError, OSError) as exc:
        return report(exc)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
