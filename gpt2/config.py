"""Typed configuration: the schema, and composition of configs/ through Hydra's compose API.

`load_config(overrides)` composes `configs/config.yaml` with the command-line overrides
(`trainer=fsdp`, `model.config.n_layer=4`, ...), then merges the result onto the typed schema
below, which rejects unknown keys and wrong types. Any problem raises `ConfigError` with one
line naming the key and what is allowed; `main.py` prints it and exits with code 2.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2.errors import UserError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A user error in the configuration: the message is one line, ready to print."""


@dataclass
class ModelSettings:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    pad_vocab_to: int = 64  # pad the embedding to a multiple of this for speed (1 = no padding)
    dropout: float = 0.0
    bias: bool = True
    flash: bool = True  # F.scaled_dot_product_attention instead of explicit masked attention


@dataclass
class ModelConfig:
    name: str = MISSING
    config: ModelSettings = field(default_factory=ModelSettings)


@dataclass
class CheckpointSettings:
    checkpoint_dir: str | None = None  # default: <run.dir>/checkpoints
    interval: int = 100  # save every N steps (0: only on stop/finish)
    keep_last: int = 2  # N >= 2 most recent checkpoints kept
    keep_every: int = 0  # also keep every M-th step permanently (0: none)
    verify_checksums: bool = True  # sha256 of every file on resume (sizes are always checked)
    save_on_finish: bool = True


@dataclass
class CheckpointStrategy:
    name: str = "atomic"
    config: CheckpointSettings = field(default_factory=CheckpointSettings)


@dataclass
class TrainerSettings:
    # schedule and batch
    max_steps: int = 1000
    batch_size: int = 8  # micro-batch per rank
    grad_accumulation_steps: int = 1
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    lr_decay_steps: int | None = None  # default: max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    # numerics and speed
    use_mixed_precision: bool = False  # bf16 (autocast for DDP, param dtype for FSDP, bf16 for DeepSpeed)
    compile: bool = False
    # eval and logging
    eval_interval: int = 100
    eval_steps: int = 10
    log_interval: int = 1
    # stopping
    time_budget_s: float = 0.0  # save and requeue after this many seconds of wall clock (0: none)
    # FSDP knobs (ignored, with a warning, by other backends)
    reshard_after_forward: bool = True
    forward_prefetch: int = 1  # number of blocks prefetched ahead in forward (0: off)
    backward_prefetch: int = 1
    cpu_offload: bool = False
    # DeepSpeed (ignored, with a warning, by other backends)
    deepspeed_config: str = "deepspeed_configs/zero1.json"
    checkpoint_strategy: CheckpointStrategy = field(default_factory=CheckpointStrategy)


@dataclass
class TrainerConfig:
    name: str = MISSING  # ddp | fsdp | deepspeed
    config: TrainerSettings = field(default_factory=TrainerSettings)


@dataclass
class SplitConfig:
    data_root: str = MISSING
    split: str = "train"


@dataclass
class DatasetConfig:
    name: str = MISSING
    train_dataset: SplitConfig = field(default_factory=SplitConfig)
    val_dataset: SplitConfig = field(default_factory=lambda: SplitConfig(split="val"))
    seq_len: int | None = None  # default: model block_size
    pool_shards: int = 8  # train order mixes the windows of this many shards at once (gpt2/data.py)


@dataclass
class WandbConfig:
    mode: str = "auto"  # auto (online with an API key, else offline) | online | offline | disabled
    project: str | None = None  # default: the sweep's name, else "gpt2"
    group: str | None = None
    name: str | None = None
    entity: str | None = None


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 1337
    sweep: str | None = None  # set by the launcher
    job: str | None = None  # set by the launcher
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


BACKENDS = ("ddp", "fsdp", "deepspeed")
_WANDB_MODES = ("auto", "online", "offline", "disabled")


def group_options(group: str) -> list[str]:
    """The options of one config group, e.g. group_options("model") -> ["gpt2_124m", ..., "tiny"]."""
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _one_line(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def _in_schema(key: str) -> bool:
    """Whether a dotted key names a field of the schema (e.g. "model.config.pad_vocab_to")."""
    node: Any = Config()
    for part in key.split("."):
        if not is_dataclass(node) or part not in {f.name for f in fields(node)}:
            return False
        node = getattr(node, part)
    return True


def _compose(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import ConfigKeyError

    hydra_overrides = []
    for ov in overrides:
        group = ov.split("=", 1)[0].lstrip("+~")
        if "=" in ov and "." not in group and (CONFIG_DIR / group).is_dir():
            choice = ov.split("=", 1)[1]
            if choice not in group_options(group):
                raise ConfigError(
                    f"unknown {group} '{choice}': choose one of {', '.join(group_options(group))}"
                )
        elif "=" in ov and not ov.startswith(("+", "~")) and _in_schema(group):
            # A schema key that the YAML files leave at its default (dataset.seq_len,
            # model.config.pad_vocab_to, ...) is absent from the composed tree, so Hydra's
            # plain override would call it unknown: "++" sets it whether or not it is there.
            ov = "++" + ov
        hydra_overrides.append(ov)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return compose(config_name="config", overrides=hydra_overrides)
    except (HydraException, ConfigKeyError, OmegaConfBaseException) as exc:
        text = str(exc)
        m = re.search(r"Key '([^']+)' is not in struct", text) or re.search(
            r"Could not override '([^']+)'", text
        )
        if m:
            key = next((o.split("=", 1)[0] for o in overrides if o.split("=", 1)[0].endswith(m.group(1))),
                       m.group(1))
            raise ConfigError(f"unknown config key '{key.lstrip('+')}': see configs/ for the keys that exist") from None
        raise ConfigError(_one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def validate(cfg: Config) -> None:
    """Cross-field checks the schema cannot express; raises ConfigError with one line."""
    t = cfg.trainer.config
    if cfg.trainer.name not in BACKENDS:
        raise ConfigError(f"trainer.name '{cfg.trainer.name}' is unknown: choose one of {', '.join(BACKENDS)}")
    if cfg.wandb.mode not in _WANDB_MODES:
        raise ConfigError(f"wandb.mode '{cfg.wandb.mode}' is unknown: choose one of {', '.join(_WANDB_MODES)}")
    for key in ("max_steps", "batch_size", "grad_accumulation_steps", "log_interval", "eval_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.config.{key} must be >= 1 (got {getattr(t, key)})")
    if t.checkpoint_strategy.config.keep_last < 2:
        raise ConfigError("trainer.config.checkpoint_strategy.config.keep_last must be >= 2")
    for key in ("interval", "keep_every"):
        if getattr(t.checkpoint_strategy.config, key) < 0:
            raise ConfigError(f"trainer.config.checkpoint_strategy.config.{key} must be >= 0")
    for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_interval", "time_budget_s"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.config.{key} must be >= 0 (got {getattr(t, key)})")
    m = cfg.model.config
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_to"):
        if getattr(m, key) < 1:
            raise ConfigError(f"model.config.{key} must be >= 1 (got {getattr(m, key)})")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.config.dropout must be in [0, 1) (got {m.dropout})")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.config.n_embd ({m.n_embd}) must be divisible by model.config.n_head ({m.n_head})")
    if cfg.dataset.seq_len is not None and cfg.dataset.seq_len < 1:
        raise ConfigError(f"dataset.seq_len must be >= 1 or null (got {cfg.dataset.seq_len})")
    if cfg.dataset.pool_shards < 1:
        raise ConfigError(f"dataset.pool_shards must be >= 1 (got {cfg.dataset.pool_shards})")
    seq = cfg.dataset.seq_len or m.block_size
    if seq > m.block_size:
        raise ConfigError(f"dataset.seq_len ({seq}) exceeds model.config.block_size ({m.block_size})")


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose configs/ with overrides, validate against the schema, return a typed Config."""
    overrides = list(overrides)
    raw = _compose(overrides)
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, raw)
        OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise _key_error(exc) from None
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    validate(cfg)
    return cfg


def _key_error(exc: OmegaConfBaseException) -> ConfigError:
    """One line naming the offending key of a schema merge error."""
    from omegaconf.errors import ConfigKeyError

    key = getattr(exc, "full_key", None) or ""
    if isinstance(exc, ConfigKeyError) and key:
        return ConfigError(f"unknown config key '{key}': see configs/ for the keys that exist")
    return ConfigError(f"config key '{key}': {_one_line(exc)}" if key else _one_line(exc))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(path: str | Path) -> Config:
    """Read a resolved config written by `save_resolved` (strict: same schema).

    Raises ConfigError naming the file and the key when it does not fit the schema."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path}: {_key_error(exc)}") from None


# Keys that may change between a checkpoint and its resume without making it incompatible.
RESUME_FREE_KEYS = {
    "run", "wandb", "dataset.train_dataset.data_root", "dataset.val_dataset.data_root",
    "trainer.config.max_steps", "trainer.config.eval_interval", "trainer.config.eval_steps",
    "trainer.config.log_interval", "trainer.config.time_budget_s", "trainer.config.checkpoint_strategy",
    "trainer.config.compile", "trainer.config.lr_decay_steps",
}


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def compat_view(cfg: Config) -> dict[str, Any]:
    """The flattened keys that must match for a checkpoint to resume under this config."""
    flat = flatten(to_dict(cfg))
    return {k: v for k, v in flat.items() if not any(k == f or k.startswith(f + ".") for f in RESUME_FREE_KEYS)}


def config_hash(cfg: Config) -> str:
    """Hash of the resume-relevant config (what a checkpoint must agree with)."""
    blob = json.dumps(compat_view(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_resolved(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)
