"""Typed configuration: one schema, one way to validate it, one way to write and read it.

Every configuration in the project is a dataclass validated by OmegaConf itself: the run
config below (`Config`), and the launcher's experiments, resources and cluster profiles
(`launch/experiment.py`), all through `structured()`. There is no hand-written type checking.

Composing a run config from configs/ and overrides: gpt2/compose.py (`load_config`, `Composer`).
`finalize()` fills what follows from other keys (the validation data follows the training data
unless it is set) and `validate()` checks what a schema cannot express.

Any problem raises `ConfigError` with one line naming the key and what is allowed; entry points
print it and exit with code 2.

Secrets: a value that comes from the environment (`${oc.env:...}`) is used resolved, but
`to_dict`/`to_yaml` (and so config.yaml, checkpoint MANIFESTs and W&B) keep the interpolation
text, never the value.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from gpt2.errors import UserError
from gpt2.safe_write import write_atomic

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(UserError):
    """A user error in the configuration: the message is one line, ready to print."""


# ---- the schema ------------------------------------------------------------------------------


@dataclass
class ModelSettings:
    """GPT-2's shape. The same fields as `gpt2.model.GPT2Config`, which is built from these."""

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
    # save every N steps (0: only on stop/finish), or "auto": the Young/Daly interval (gpt2/checkpoint/interval.py)
    interval: Any = 100
    max_interval: int = 1000  # the most steps "auto" may put between two saves
    keep_last: int = 2  # N >= 2 most recent checkpoints kept
    keep_every: int = 0  # also keep every M-th step permanently (0: none)
    verify_checksums: bool = True  # sha256 of every file on resume (sizes are always checked)
    save_on_finish: bool = True
    async_save: bool = True  # write, fsync, hash and commit in the background; training waits only for the host copy


@dataclass
class CheckpointStrategy:
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
    # failures (gpt2/watchdog.py): a rank hung or lost ends the job within seconds, exit 76
    hang_timeout_s: str = "auto"  # slowest rank without progress: auto | seconds | 0/off
    heartbeat_timeout_s: float = 10.0  # a peer whose heartbeat is older is lost (0: off)
    preflight: bool = False  # one all-reduce and one matmul per rank before training
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
class TrainSplit:
    data_root: str = MISSING
    split: str = "train"


@dataclass
class ValSplit:
    data_root: str | None = None  # default: the training data's root
    split: str = "val"


@dataclass
class DatasetConfig:
    name: str = MISSING
    train_dataset: TrainSplit = field(default_factory=TrainSplit)
    val_dataset: ValSplit = field(default_factory=ValSplit)
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
class LoggingConfig:
    tensorboard: bool = False  # event files in <run.dir>/tensorboard/, one value per step across restarts


@dataclass
class RunConfig:
    dir: str = "runs/default"
    seed: int = 1337
    sweep: str | None = None  # set by the launcher
    job: str | None = None  # set by the launcher
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    run: RunConfig = field(default_factory=RunConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


BACKENDS = ("ddp", "fsdp", "deepspeed")
_WANDB_MODES = ("auto", "online", "offline", "disabled")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_HANG_TIMEOUT = re.compile(r"auto|off|\d+(\.\d*)?|\.\d+")
_ENV_KEYS = "_env_interpolations"  # attribute of a Config: {dotted key: "${oc.env:...}"}


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="config_schema", node=Config)


# ---- validating any dataclass ----------------------------------------------------------------

T = TypeVar("T")


def error_line(exc: OmegaConfBaseException, where: str = "") -> ConfigError:
    """One line for an OmegaConf error: which key, what is wrong, what is allowed."""
    key = getattr(exc, "full_key", "") or ""
    prefix = f"{where}: " if where else ""
    if isinstance(exc, (ConfigKeyError, ConfigAttributeError)) and key:
        owner = getattr(exc, "object_type", None)
        allowed = f": allowed keys are {', '.join(f.name for f in dataclasses.fields(owner))}" \
            if owner is not None and dataclasses.is_dataclass(owner) else ""
        return ConfigError(f"{prefix}unknown key '{key}'{allowed}")
    if isinstance(exc, MissingMandatoryValue) and key:
        return ConfigError(f"{prefix}'{key}' has no value ('???'): set one, e.g. {key}=VALUE")
    msg = (getattr(exc, "msg", None) or str(exc)).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    return ConfigError(f"{prefix}'{key}': {text}" if key else f"{prefix}{text}")


def structured(cls: type[T], raw: Any, where: str = "") -> T:
    """`raw` (a mapping, e.g. read from YAML) validated against dataclass `cls` by OmegaConf: unknown
    keys, wrong types and unresolvable interpolations raise ConfigError naming `where` and the key."""
    if raw is not None and not isinstance(raw, (dict, DictConfig)):
        raise ConfigError(f"{where}: expected a mapping (key: value), got {type(raw).__name__}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), raw or {}))  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise error_line(exc, where) from None
    except RecursionError:  # a YAML alias inside its own anchor (`a: &a [*a]`), or hundreds of levels
        raise ConfigError(f"{where + ': ' if where else ''}nested too deeply or refers to itself") from None


# ---- resolving a typed tree, remembering what came from the environment --------------------


def _walk(node: Any, prefix: str = "") -> Any:
    """(dotted key, raw value) for every leaf of a DictConfig, interpolations left as text."""
    for k in node:
        child = node._get_node(k)
        key = f"{prefix}{k}"
        if isinstance(child, DictConfig) and not child._is_interpolation():
            yield from _walk(child, key + ".")
        else:
            yield key, child._value()


def _materialize(tree: DictConfig) -> Config:
    """Resolve a typed tree into a Config, remembering which values came from the environment."""
    env = {k: v for k, v in _walk(tree) if isinstance(v, str) and "${" in v and "oc.env" in v}
    try:
        cfg: Config = OmegaConf.to_object(tree)  # type: ignore[assignment]
    except OmegaConfBaseException as exc:
        raise error_line(exc) from None
    setattr(cfg, _ENV_KEYS, env)
    return cfg


# ---- what follows from other keys, and what a schema cannot express ---------------------------


def finalize(cfg: Config) -> Config:
    """Fill the defaults that follow other keys (the validation data follows the training data)."""
    if cfg.dataset.val_dataset.data_root is None:
        cfg.dataset.val_dataset.data_root = cfg.dataset.train_dataset.data_root
    return cfg


def _interval(value: Any) -> int | str:
    """checkpoint_strategy.config.interval as the loop reads it: steps (int >= 0) or "auto"."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if not isinstance(value, bool) and re.fullmatch(r"\d+", text):
        return int(text)
    raise ConfigError(f"trainer.config.checkpoint_strategy.config.interval '{value}' is unknown: "
                      "use a number of steps >= 0 or auto")


def fixed_interval(ck: CheckpointSettings) -> int | None:
    """The interval in steps, or None under "auto" (the loop picks it as it goes)."""
    return None if ck.interval == "auto" else int(ck.interval)


def _nonfinite(obj: Any, prefix: str = "") -> str | None:
    """The dotted key of the first float that is NaN or infinite, or None."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            if (found := _nonfinite(value, key + ".")) is not None:
                return found
        elif isinstance(value, float) and not math.isfinite(value):
            return key
    return None


def validate(cfg: Config) -> None:
    """Cross-field checks the schema cannot express; raises ConfigError with one line."""
    if (key := _nonfinite(cfg)) is not None:  # nan passes every `< 0` check below
        raise ConfigError(f"{key} is {OmegaConf.select(OmegaConf.structured(cfg), key)}: give a finite number")
    t = cfg.trainer.config
    if cfg.trainer.name not in BACKENDS:
        raise ConfigError(f"trainer.name '{cfg.trainer.name}' is unknown: choose one of {', '.join(BACKENDS)}")
    if cfg.wandb.mode not in _WANDB_MODES:
        raise ConfigError(f"wandb.mode '{cfg.wandb.mode}' is unknown: choose one of {', '.join(_WANDB_MODES)}")
    if not _DEVICE.fullmatch(cfg.run.device):
        raise ConfigError(f"run.device '{cfg.run.device}' is unknown: choose auto, cpu, cuda or cuda:N")
    for key in ("max_steps", "batch_size", "grad_accumulation_steps", "log_interval", "eval_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.config.{key} must be >= 1 (got {getattr(t, key)})")
    if t.checkpoint_strategy.config.keep_last < 2:
        raise ConfigError("trainer.config.checkpoint_strategy.config.keep_last must be >= 2")
    ck = t.checkpoint_strategy.config
    ck.interval = _interval(ck.interval)
    for key in ("keep_every",):
        if getattr(ck, key) < 0:
            raise ConfigError(f"trainer.config.checkpoint_strategy.config.{key} must be >= 0")
    if ck.max_interval < 1:
        raise ConfigError(f"trainer.config.checkpoint_strategy.config.max_interval must be >= 1 (got {ck.max_interval})")
    for key in ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_interval", "time_budget_s",
                "heartbeat_timeout_s"):
        if getattr(t, key) < 0:
            raise ConfigError(f"trainer.config.{key} must be >= 0 (got {getattr(t, key)})")
    if not _HANG_TIMEOUT.fullmatch(str(t.hang_timeout_s).strip().lower()):
        raise ConfigError(f"trainer.config.hang_timeout_s '{t.hang_timeout_s}' is unknown: "
                          "use auto, off, or a number of seconds >= 0")
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


# ---- writing and reading resolved configs ----------------------------------------------------


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain data; values from the environment stay `${oc.env:...}` text."""
    out = dataclasses.asdict(cfg)
    for dotted, raw in getattr(cfg, _ENV_KEYS, {}).items():
        *path, leaf = dotted.split(".")
        node = out
        for part in path:
            node = node[part]
        node[leaf] = raw
    return out


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


MAX_YAML_VALUES = 100_000  # values a YAML file may expand to through its aliases; real ones hold hundreds


def yaml_expansion(text: str, loader: type = yaml.SafeLoader) -> int:
    """How many values the YAML document in `text` holds once its aliases are expanded, counted on
    the parsed node graph without expanding it (each node is walked once), up to just past
    MAX_YAML_VALUES: a few lines whose anchors repeat anchors (a "billion laughs") otherwise take
    minutes and gigabytes to load. An alias inside its own anchor counts once, and a document that
    does not parse counts 0: the real load reports those."""
    try:
        root = yaml.compose(text, Loader=loader)
    except yaml.YAMLError:
        return 0
    memo: dict[int, int] = {}

    def count(node: yaml.Node, path: set[int]) -> int:
        key = id(node)
        if key in memo:
            return memo[key]
        if key in path:  # the node holds itself: left to the loaders, which refuse it in words of their own
            return 1
        path.add(key)
        if isinstance(node, yaml.MappingNode):
            children = [c for pair in node.value for c in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        total = 1
        for child in children:
            total = min(total + count(child, path), MAX_YAML_VALUES + 1)
        path.discard(key)
        memo[key] = total
        return total

    return 0 if root is None else count(root, set())


def from_yaml(path: str | Path) -> Config:
    """Read a config written by `save_resolved` (strict: same schema; `${oc.env:...}` resolved here).

    Raises ConfigError naming the file and the key when it does not fit the schema, or saying
    why it is no YAML mapping at all (a parse error, bytes that are not UTF-8, a python tag, a
    scalar or list at the top, nesting that exhausts the parser)."""
    try:
        if yaml_expansion(Path(path).read_text()) > MAX_YAML_VALUES:
            raise ConfigError(f"{path}: expands through its YAML aliases to more than {MAX_YAML_VALUES:,} values "
                              "(anchors repeating anchors): not a config this project wrote")
        tree = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(path))
    except OmegaConfBaseException as exc:
        raise error_line(exc, str(path)) from None
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        reason = "nested too deeply or refers to itself" if isinstance(exc, RecursionError) else \
            " ".join(str(exc).split())[:200]
        raise ConfigError(f"{path}: not a readable YAML config ({reason})") from None
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error (missing, unreadable): the door reports it
            raise
        raise ConfigError(f"{path}: not a YAML config ({exc})") from None  # OmegaConf: a scalar at the top
    try:
        return finalize(_materialize(tree))  # type: ignore[arg-type]
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


# Keys that may change between a checkpoint and its resume without making it incompatible.
RESUME_FREE_KEYS = {
    "run", "wandb", "logging", "dataset.train_dataset.data_root", "dataset.val_dataset.data_root",
    "trainer.config.max_steps", "trainer.config.eval_interval", "trainer.config.eval_steps",
    "trainer.config.log_interval", "trainer.config.time_budget_s", "trainer.config.checkpoint_strategy",
    "trainer.config.compile", "trainer.config.lr_decay_steps", "trainer.config.hang_timeout_s",
    "trainer.config.heartbeat_timeout_s", "trainer.config.preflight",
}


def _flat_fields(obj: Any, prefix: str = "") -> dict[str, Any]:
    """flatten(dataclasses.asdict(obj)) without building the nested copy first."""
    out: dict[str, Any] = {}
    for name, value in vars(obj).items():
        if name.startswith("_"):
            continue
        if dataclasses.is_dataclass(value):
            out.update(_flat_fields(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = copy.deepcopy(value) if isinstance(value, (dict, list)) else value
    return out


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
    flat = {**_flat_fields(cfg), **getattr(cfg, _ENV_KEYS, {})}
    return {k: v for k, v in flat.items() if not _resume_free(k)}


@functools.lru_cache(maxsize=4096)
def _resume_free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in RESUME_FREE_KEYS)


def config_hash(cfg: Config) -> str:
    """Hash of the resume-relevant config (what a checkpoint must agree with)."""
    blob = json.dumps(compat_view(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_resolved(cfg: Config, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, to_yaml(cfg))  # never through a symlink; no temporary file outlives a failure
