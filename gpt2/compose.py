"""Composing run configs: configs/ and the command line's overrides into one typed `Config`.

`load_config`, or `Composer` for many jobs (a sweep):
- Hydra composes `configs/config.yaml`, whose defaults list starts with this schema (registered
  in Hydra's ConfigStore as `config_schema`), with the *group choices* (`model=gpt2_124m`,
  `trainer=fsdp`). Hydra applies group choices before keys whatever their order on the command
  line, so the composition depends on the set of group choices only and is cached per set.
- The *key overrides* (`trainer.config.lr=3e-4`, parsed by Hydra's own override grammar) are then
  applied with `OmegaConf.update` on the typed tree, which rejects unknown keys and wrong types.
  When no interpolation can see a key, the value is converted once by OmegaConf and set on a copy
  of the cached, already-resolved object: a 1,000-job sweep costs a few milliseconds a job.
- `finalize()` fills what follows from other keys (the validation data follows the training
  data unless it is set) and `validate()` checks what a schema cannot express.

The schema, validation and the written form are in gpt2/config.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gpt2.config import (
    _ENV_KEYS,
    CONFIG_DIR,
    Config,
    ConfigError,
    _materialize,
    _register_schema,
    _walk,
    error_line,
    finalize,
    structured,
    validate,
)

T = TypeVar("T")


def group_options(group: str) -> list[str]:
    """The options of one config group, e.g. group_options("model") -> ["gpt2_124m", ..., "tiny"]."""
    return list(_group_options(CONFIG_DIR, group))


@functools.cache
def _group_options(config_dir: Path, group: str) -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (config_dir / group).glob("*.yaml")))


@functools.cache
def _groups(config_dir: Path) -> frozenset[str]:
    return frozenset(p.name for p in config_dir.iterdir() if p.is_dir())


def _is_group(config_dir: Path, key: str) -> bool:
    """Whether `key` names a config group: looked up among configs/' folders, so a key the user
    wrote never becomes a path that is opened (an absolute one, or one too long for the OS)."""
    return key in _groups(config_dir)


@dataclass
class _Base:
    """One Hydra composition of a set of group choices, kept both unresolved and resolved."""

    tree: DictConfig  # typed, interpolations unresolved
    obj: Config | None  # resolved (None when resolving needs the job's own overrides)
    watched: frozenset[str]  # keys some interpolation reads: setting one needs a full resolve


class Composer:
    """Composes run configs; cheap to reuse for many jobs (a sweep)."""

    def __init__(self) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self._parser = OverridesParser.create()
        self._parsed: dict[str, Any] = {}
        self._bases: dict[tuple[str, ...], _Base] = {}
        self._scratch = OmegaConf.structured(Config)  # converts one key's value by the schema's type
        self._converted: dict[tuple[str, str, Any], Any] = {}

    def compose(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        groups, keys = self._split(list(overrides))
        base = self._base(tuple(groups))
        if base.obj is not None and not any(self._needs_tree(base, k, v) for k, v in keys):
            cfg = _clone(base.obj)
            env = dict(getattr(base.obj, _ENV_KEYS, {}))
            for key, value in keys:
                _set(cfg, key, self._convert(key, value))
                env.pop(key, None)
            setattr(cfg, _ENV_KEYS, env)
        else:
            tree = copy.deepcopy(base.tree)
            for key, value in keys:
                _update(tree, key, value)
            cfg = _materialize(tree)
        finalize(cfg)
        validate(cfg)
        return cfg

    # -- steps

    def _split(self, overrides: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
        """Group choices (checked against configs/) and (key, value) pairs, in order."""
        groups: dict[str, str] = {}  # the last choice of a group wins (a command line after a file)
        keys: list[tuple[str, Any]] = []
        for text in overrides:
            ov = self._parse(text)
            key = ov.key_or_group
            if ov.is_delete():
                raise ConfigError(f"'{text}': removing keys is not supported: set the key to a value instead")
            if ov.is_sweep_override():
                raise ConfigError(f"'{text}' is a sweep: list the values in an experiment's sweep.grid (jobs/*.yaml)")
            if ov.package is not None:
                raise ConfigError(f"'{text}': group@package overrides are not supported")
            if _is_group(CONFIG_DIR, key):
                choice = ov.value()
                if not isinstance(choice, str) or choice not in _group_options(CONFIG_DIR, key):
                    raise ConfigError(f"unknown {key} '{choice}': choose one of {', '.join(group_options(key))}")
                groups[key] = choice
            else:
                keys.append((key, ov.value()))
        return [f"{g}={c}" for g, c in sorted(groups.items())], keys

    def _parse(self, text: str) -> Any:
        if text not in self._parsed:
            from hydra.errors import HydraException

            try:
                self._parsed[text] = self._parser.parse_overrides([text])[0]
            except HydraException as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else "syntax error"
                raise ConfigError(f"override '{text}' is not key=value ({first}): e.g. trainer.config.lr=3e-4 "
                                  f"or model=gpt2_124m") from None
        return self._parsed[text]

    def _base(self, groups: tuple[str, ...]) -> _Base:
        if groups not in self._bases:
            tree = _hydra_compose(list(groups))
            watched = frozenset(_interpolation_targets(tree))
            try:
                obj: Config | None = _materialize(copy.deepcopy(tree))
            except ConfigError:
                obj = None  # e.g. a MISSING value a job's overrides fill in: resolve per job
            self._bases[groups] = _Base(tree, obj, watched)
        return self._bases[groups]

    def _needs_tree(self, base: _Base, key: str, value: Any) -> bool:
        """Whether setting key=value needs a full resolve instead of a set on the resolved copy."""
        if isinstance(value, (dict, list)) or (isinstance(value, str) and ("${" in value or value == MISSING)):
            return True  # (a MISSING "???" too: resolving the tree says which key has no value)
        if "" in base.watched:  # a relative interpolation or a custom resolver: it may read any key
            return True
        return any(w == key or w.startswith(key + ".") or key.startswith(w + ".") for w in base.watched)

    def _convert(self, key: str, value: Any) -> Any:
        """The value as the schema's type at `key` holds it (0 -> 0.0 for a float, ...)."""
        memo = (key, type(value).__name__, value)
        if memo not in self._converted:
            _update(self._scratch, key, value)
            node = OmegaConf.select(self._scratch, key)
            if isinstance(node, (DictConfig, ListConfig)):  # a whole group node: merge as a tree
                node = OmegaConf.to_object(node)
            self._converted[memo] = node
        return self._converted[memo]


def _hydra_compose(groups: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    _register_schema()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            tree = compose(config_name="config", overrides=groups)
    except OmegaConfBaseException as exc:
        raise error_line(exc, "configs/") from None
    except HydraException as exc:
        raise ConfigError(f"configs/: {str(exc).strip().splitlines()[0]}") from None
    finally:
        GlobalHydra.instance().clear()
    OmegaConf.set_struct(tree, True)
    return tree


def _update(tree: DictConfig, key: str, value: Any) -> None:
    try:
        OmegaConf.update(tree, key, value, merge=True)
    except OmegaConfBaseException as exc:
        raise error_line(exc) from None


_INTERP = re.compile(r"\$\{([^}]*)\}")


def _interpolation_targets(tree: DictConfig) -> set[str]:
    """Keys read by an interpolation (absolute `${a.b}` references; any key when one is relative)."""
    out: set[str] = set()
    for _key, raw in _walk(tree):
        for ref in _INTERP.findall(str(raw)) if isinstance(raw, str) else ():
            if ref.startswith("oc.env:") or ref.startswith("oc.decode:"):
                continue
            if ref.startswith(".") or ":" in ref:
                out.add("")  # relative or a resolver: be safe, every key is watched
            else:
                out.add(ref)
    return out


def _clone(obj: T) -> T:
    """A copy of a tree of dataclasses whose leaves are immutable (what the schema allows): much
    cheaper than copy.deepcopy, and nothing is shared that a later assignment could change."""
    new = copy.copy(obj)
    for name, value in vars(obj).items():
        if dataclasses.is_dataclass(value):
            setattr(new, name, _clone(value))
        elif isinstance(value, (dict, list)):
            setattr(new, name, copy.deepcopy(value))
    return new


def _set(cfg: Any, dotted: str, value: Any) -> None:
    *path, leaf = dotted.split(".")
    obj = cfg
    for i, part in enumerate(path):
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):  # e.g. interval.0=1: interval holds a value, not keys
            raise ConfigError(f"'{dotted}': {'.'.join(path[:i + 1])} is a value, not a group of keys: "
                              f"set {'.'.join(path[:i + 1])}=VALUE")
    if dataclasses.is_dataclass(getattr(obj, leaf)) and isinstance(value, dict):
        value = structured(type(getattr(obj, leaf)), value, dotted)
    setattr(obj, leaf, value)


def load_config(overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose configs/ with overrides, validate against the schema, return a typed Config."""
    return Composer().compose(overrides)


