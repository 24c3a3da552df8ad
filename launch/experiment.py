"""Experiments (`jobs/*.yaml`) and cluster profiles (`slurm_templates/<cluster>.yaml`) as data.

An experiment file holds base overrides, sweep axes (a grid and/or an explicit list), the
resources of one job and the name of a cluster profile. `load_experiment` reads it strictly
(unknown keys are errors naming the key), applies command-line overrides, and expands it into
`JobSpec`s: one per configuration, each with a stable name built from its axis values
(`lr=0.0003,n_layer=2`; `main` when there is no axis). Files, resources and profiles are
dataclasses validated by OmegaConf through `gpt2.config.structured`, the same layer as the run
config; `gpt2.compose.Composer` turns a job's overrides into a validated `Config`. Every problem
raises `UserError` with one line.

    # jobs/example.yaml
    description: what this is for
    cluster: local              # slurm_templates/local.yaml
    executor: slurm             # used when --executor is not given
    overrides: {model: tiny, trainer.config.max_steps: 200}   # or a list of "key=value"
    sweep:
      grid: {trainer.config.lr: [3e-4, 1e-3]}                  # every combination
      list: [{model.config.n_layer: 2}, {model.config.n_layer: 4}]   # explicit points
    resources: {nodes: 1, gpus_per_node: 0, tasks_per_node: 2, time: 30}
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2.checkpoint.interval import DEFAULT_MTBI_HOURS
from gpt2.compose import Composer
from gpt2.config import MAX_YAML_VALUES, config_hash, structured, yaml_expansion
from gpt2.errors import UserError
from launch.asha import SearchSpec
from launch.chain import ChainStep, check_steps
from launch.record import EXECUTORS

__all__ = ["Composer", "config_hash"]  # the run config's composer and hash, re-exported for the launcher

ROOT = Path(__file__).resolve().parent.parent
JOBS_DIR = ROOT / "jobs"
PROFILES_DIR = ROOT / "slurm_templates"
RUNS_ENV = "RUNS_DIR"
RESERVED_JOB_NAMES = {"logs", "code"}  # sweep-level folders


def runs_root() -> Path:
    """Where sweeps live: $RUNS_DIR (a shared-filesystem path on a cluster), else ./runs."""
    return Path(os.environ.get(RUNS_ENV) or "runs")


# ---- cluster profiles ------------------------------------------------------------------------


@dataclass
class Partition:
    name: str = ""  # the key under `partitions:`
    default: bool = False
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    mem_gb: float | None = None
    max_time_min: int | None = None  # None: no limit
    gpu_mem_gb: float | None = None  # for the plan's memory warning


@dataclass
class ClusterProfile:
    """A cluster's partitions and the lines every job script needs there."""

    name: str = ""  # the file's name
    description: str = ""
    partitions: dict[str, Partition] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)  # shell lines run before srun (module loads, ...)
    env: dict[str, str] = field(default_factory=dict)  # exported in the job script, values quoted
    max_array_size: int = 1001  # SLURM's MaxArraySize: array indices stay below it
    min_signal_lead_s: int = 60  # the time-limit warning comes at least this early
    checkpoint_write_mb_s: float = 200.0  # for sizing the warning lead to cover a save
    # mean time between interruptions (preemptions, node failures) of a job here: the Young/Daly
    # checkpoint interval (`interval: auto`, gpt2/checkpoint/interval.py) until the sweep has measured its own
    mtbi_hours: float = DEFAULT_MTBI_HOURS

    def partition(self, name: str | None) -> Partition | None:
        """The named partition, or the default one; None when the profile lists none."""
        if not self.partitions:
            return None
        if name is None:
            return next((p for p in self.partitions.values() if p.default), next(iter(self.partitions.values())))
        if name not in self.partitions:
            raise UserError(
                f"partition '{name}' is not in cluster profile '{self.name}': choose one of "
                f"{', '.join(self.partitions)}"
            )
        return self.partitions[name]


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name: str) -> ClusterProfile:
    from launch.paths import child
    from launch.slurm import check_profile, show

    path = child(PROFILES_DIR, name, "cluster", suffix=".yaml")
    if not path.is_file():
        raise UserError(f"unknown cluster profile '{name}': choose one of {', '.join(profile_names())} "
                        f"(files in {PROFILES_DIR.relative_to(ROOT)}/)")
    raw = _read_yaml(path)
    where = f"{path.relative_to(ROOT)}"
    if raw.get("name", name) != name:
        raise UserError(f"{where}: name {show(raw['name'])} differs from the file's name '{name}': "
                        f"a profile is named by its file")
    prof = structured(ClusterProfile, {**raw, "name": name}, where)
    for pname, part in prof.partitions.items():
        part.name = pname
    if not prof.mtbi_hours > 0:
        raise UserError(f"{where}: mtbi_hours must be > 0 (got {prof.mtbi_hours}): the mean hours between "
                        f"interruptions of a job on this cluster")
    for k in prof.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise UserError(f"{where}: env name '{k}' is not a valid shell variable name")
    check_profile(prof, where)  # nothing in it may break a job script line
    return prof


# ---- resources -------------------------------------------------------------------------------


@dataclass
class Resources:
    """What one job asks for. One task per GPU; CPU-only jobs run `tasks_per_node` processes."""

    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1  # only used when gpus_per_node is 0
    cpus_per_task: int = 1
    mem: str | None = None  # per node, SLURM syntax: 64G, 500M
    time: int = 60  # minutes (also "HH:MM:SS" or "D-HH:MM:SS" in the file)
    partition: str | None = None  # default: the profile's default partition
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    array_parallelism: int = 64  # at most this many jobs of the sweep run at once
    max_timeouts: int = 3  # time-outs a job may requeue after; preemptions are not counted
    max_failures: int = 3  # infrastructure failures (hang, lost peer, NODE_FAIL, ...) a job may requeue after
    requeue: bool = True
    signal_lead_s: int | None = None  # default: sized to cover a checkpoint save (see plan.py)

    @property
    def ntasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


MAX_MINUTES = 2**32 - 2  # 2**32 - 1 is SLURM's INFINITE


def parse_time(value: Any) -> int:
    """Minutes from 90, "90", "01:30:00", "1-00:00:00" or "30:00" (MM:SS)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    s = str(value).strip()
    days = 0
    if "-" in s:
        d, s = s.split("-", 1)
        days = int(d)
    parts = [int(x) for x in s.split(":")]
    if len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, m, sec = 0, parts[0], parts[1]
    elif len(parts) == 3:
        h, m, sec = parts
    else:
        raise ValueError(value)
    return days * 1440 + h * 60 + m + (1 if sec else 0)


def parse_resources(raw: dict[str, Any], where: str) -> Resources:
    if not isinstance(raw, dict | None):
        raise UserError(f"{where}: resources must be a mapping (key: value)")
    raw = dict(raw or {})
    if "time" in raw:
        try:
            raw["time"] = parse_time(raw["time"])
        except (ValueError, TypeError):
            raise UserError(f"{where}: resources.time '{raw['time']}' is not minutes or [D-]HH:MM:SS") from None
    if raw.get("mem") is not None:
        raw["mem"] = str(raw["mem"])
        if not re.fullmatch(r"\d+[KMGT]?", raw["mem"]):
            raise UserError(f"{where}: resources.mem '{raw['mem']}' must look like 64G or 500M")
    res = structured(Resources, raw, f"{where}: resources")
    for key in ("nodes", "tasks_per_node", "cpus_per_task", "time", "array_parallelism"):
        if getattr(res, key) < 1:
            raise UserError(f"{where}: resources.{key} must be >= 1 (got {getattr(res, key)})")
    if res.time > MAX_MINUTES:  # SLURM keeps a time limit in 32 bits of minutes; sbatch would refuse it
        raise UserError(f"{where}: resources.time {res.time} minutes is more than SLURM can hold ({MAX_MINUTES})")
    if res.gpus_per_node < 0 or res.max_timeouts < 0 or res.max_failures < 0:
        raise UserError(f"{where}: resources.gpus_per_node, max_timeouts and max_failures must be >= 0")
    return res


def check_resources(res: Resources, profile: ClusterProfile, executor: str, local_gpus: int = 0) -> None:
    """Refuse what the cluster (or this machine, for local/debug) cannot give, before submitting."""
    if executor in ("local", "debug"):
        if res.nodes != 1:
            raise UserError(f"the {executor} executor runs on this machine only: set resources.nodes=1 "
                            f"(asked {res.nodes}), or use --executor slurm")
        if res.gpus_per_node > local_gpus:
            raise UserError(
                f"this job asks {res.gpus_per_node} GPUs per node but this machine has {local_gpus}: "
                f"use --executor slurm, or resources.gpus_per_node=0 resources.tasks_per_node=2 for a CPU run"
            )
        return
    part = profile.partition(res.partition)
    if part is None:
        return
    where = f"partition '{part.name}' of cluster '{profile.name}'"
    if res.gpus_per_node > part.gpus_per_node:
        raise UserError(f"resources.gpus_per_node={res.gpus_per_node} but {where} has {part.gpus_per_node} "
                        f"GPUs per node: lower it or pick another partition")
    if res.nodes > part.nodes:
        raise UserError(f"resources.nodes={res.nodes} but {where} has {part.nodes} nodes")
    if part.cpus_per_node is not None and res.cpus_per_task * res.ntasks_per_node > part.cpus_per_node:
        raise UserError(f"{res.ntasks_per_node} tasks x {res.cpus_per_task} cpus_per_task exceed the "
                        f"{part.cpus_per_node} CPUs per node of {where}")
    if part.max_time_min is not None and res.time > part.max_time_min:
        raise UserError(f"resources.time={res.time} min exceeds the {part.max_time_min} min limit of {where}")
    if part.mem_gb is not None and res.mem is not None and _mem_gb(res.mem) > part.mem_gb:
        raise UserError(f"resources.mem={res.mem} exceeds the {part.mem_gb:g} GB per node of {where}")


def _mem_gb(mem: str) -> float:
    scale = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    unit = mem[-1] if mem[-1] in scale else "M"  # SLURM's default unit is MB
    return float(mem.rstrip("KMGT")) * scale[unit]


# ---- experiments -----------------------------------------------------------------------------


@dataclass
class JobSpec:
    """One configuration of a sweep: its name, its axis values and its full override list."""

    name: str
    axes: dict[str, Any]
    overrides: list[str]


@dataclass
class Experiment:
    name: str
    path: Path
    description: str
    cluster: str
    executor: str | None
    resources: Resources
    jobs: list[JobSpec]
    cli_overrides: list[str] = field(default_factory=list)
    search: SearchSpec | None = None
    after: list[ChainStep] = field(default_factory=list)


@dataclass
class SweepSpec:
    grid: dict[str, Any] = field(default_factory=dict)  # key -> values: every combination
    list: list[Any] = field(default_factory=list)  # explicit points (mappings key -> value)
    search: SearchSpec | None = None  # early stopping of the trials (launch/asha.py); None: train all fully


@dataclass
class ExperimentFile:
    """The keys of a `jobs/*.yaml` file (checked by OmegaConf; values of overrides/sweep kept as written)."""

    name: str | None = None  # default: the file's name
    description: str = ""
    cluster: str = "local"  # slurm_templates/<cluster>.yaml
    executor: str | None = None  # slurm | local | debug; --executor wins
    overrides: Any = None  # a mapping key: value, or a list of "key=value"
    sweep: SweepSpec = field(default_factory=SweepSpec)
    resources: Any = None  # a Resources mapping; time may be "HH:MM:SS"
    after: list[ChainStep] = field(default_factory=list)  # steps run after the sweep (launch/chain.py)




def experiment_names() -> list[str]:
    return sorted(p.stem for p in JOBS_DIR.glob("*.yaml"))


def find_experiment(ref: str) -> Path:
    """`jobs/x.yaml`, a path to any yaml file, or a bare name `x` from jobs/."""
    p = Path(ref)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    by_name = JOBS_DIR / f"{p.stem if p.suffix in ('.yaml', '.yml') else ref}.yaml"
    if by_name.is_file():
        return by_name
    raise UserError(f"unknown experiment '{ref}': choose one of {', '.join(experiment_names())} (files in jobs/)")


def load_experiment(ref: str, cli_overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read and expand an experiment; command-line overrides win over the file.

    `resources.KEY=VALUE` and `cluster=NAME` change the launch; any other `key=value` is a config
    override applied to every job (an override of a sweep axis pins that axis to one value).
    """
    path = find_experiment(ref)
    where = str(path)
    raw = _read_yaml(path)
    sweep = raw.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise UserError(f"{where}: sweep must be a mapping with 'grid' and/or 'list'")
    grid = sweep.get("grid") or {}
    points = sweep.get("list") or []
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise UserError(f"{where}: sweep.grid must map each key to a non-empty list of values")
    if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
        raise UserError(f"{where}: sweep.list must be a list of mappings (key: value)")
    for part, keys in (("sweep.grid", list(grid)), ("sweep.list", [k for p in points for k in p])):
        for k in keys:
            if not isinstance(k, str) or not k:  # YAML makes `1:`, `null:`, `true:` keys ints, None, bools
                from launch.slurm import show

                kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number"}.get(
                    type(k), f"a {type(k).__name__}")
                what = show(k) if isinstance(k, str) else f"{show(k)[1:-1]} (YAML read it as {kind})"
                raise UserError(f"{where}: {part} key {what} is not a config key: keys must be dotted config "
                                f"keys (strings, e.g. trainer.config.lr)")
    # types and unknown keys; the values of overrides and sweep are used as written (not resolved)
    spec = structured(ExperimentFile, {**raw, "sweep": {**sweep, "grid": {}, "list": []}}, where)
    name = spec.name or path.stem
    if not re.fullmatch(r"[A-Za-z0-9_.=,+-]+", name):
        raise UserError(f"{where}: name '{name}' may only use letters, digits and _.=,+-")
    executor = spec.executor
    if executor is not None and executor not in EXECUTORS:
        raise UserError(f"{where}: executor '{executor}' is unknown: choose one of {', '.join(EXECUTORS)}")
    if spec.resources is not None and not isinstance(raw.get("resources"), dict):
        raise UserError(f"{where}: resources must be a mapping (key: value)")
    res_raw = dict(raw.get("resources") or {})
    cluster = spec.cluster
    config_cli: list[str] = []
    for ov in cli_overrides:
        if "=" not in ov or ov.startswith("="):
            raise UserError(f"override '{ov}' is not key=value (e.g. trainer.config.lr=3e-4 or resources.nodes=2)")
        key, value = ov.split("=", 1)
        if key.startswith("resources."):
            res_raw[key.split(".", 1)[1]] = yaml_value(value, key) if value else None
        elif key == "cluster":
            cluster = value
        else:
            config_cli.append(ov)
    resources = parse_resources(res_raw, where)
    base = _override_list(raw.get("overrides"), f"{where}: overrides")
    pinned = {ov.split("=", 1)[0]: ov.split("=", 1)[1] for ov in config_cli}
    grid = {k: ([pinned[k]] if k in pinned else v) for k, v in grid.items()}
    points = [{k: (pinned[k] if k in pinned else v) for k, v in p.items()} for p in points]
    search = spec.sweep.search
    if search is not None and (problem := search.problem()):
        raise UserError(f"{where}: sweep.search: {problem}")
    if search is not None:
        from launch.slurm import check_line

        check_line(f"{where}: sweep.search.metric", search.metric, "a key of the eval rows (e.g. val_loss)")
    jobs = [
        JobSpec(name=n, axes=axes, overrides=base + [f"{k}={override_value(v)}" for k, v in axes.items()]
                + config_cli + (search_overrides(search) if search else []))
        for n, axes in expand(grid, points)
    ]
    if search is not None:
        check_search(search, jobs[0].overrides, where)
    check_steps(spec.after, where)
    return Experiment(name=name, path=path, description=spec.description, cluster=cluster,
                      executor=executor, resources=resources, jobs=jobs, cli_overrides=list(cli_overrides),
                      search=search, after=spec.after)


def search_overrides(search: SearchSpec, rung: int | None = None) -> list[str]:
    """What a trial of an early-stopping sweep trains with: to `rung` (default: the first), on the
    LR schedule of the full length, so a promoted trial continues exactly where it stopped."""
    return [f"trainer.config.max_steps={rung or search.min_steps}",
            f"trainer.config.lr_decay_steps={search.max_steps}"]


def check_search(search: SearchSpec, overrides: list[str], where: str) -> None:
    """A trial must evaluate (its rung metric) and save a checkpoint where it stops (to continue)."""
    t = Composer().compose(overrides).trainer.config
    if search.metric == "val_loss" and t.eval_interval <= 0:
        raise UserError(f"{where}: sweep.search reads val_loss at every rung but trainer.config.eval_interval is "
                        f"{t.eval_interval}: set it > 0 (a run evaluates at its last step too)")
    if not t.checkpoint_strategy.config.save_on_finish:
        raise UserError(f"{where}: sweep.search continues promoted trials from the checkpoint of their rung: "
                        f"set trainer.config.checkpoint_strategy.config.save_on_finish=true")


def expand(grid: dict[str, list[Any]], points: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Every explicit point crossed with every grid combination, named by its axis values."""
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    axes_list = [{**p, **c} for p in (points or [{}]) for c in combos]
    keys = [k for k in dict.fromkeys(k for axes in axes_list for k in axes)]
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    clash = {s for s in short.values() if list(short.values()).count(s) > 1}
    short = {k: (k if s in clash else s) for k, s in short.items()}
    out: list[tuple[str, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for axes in axes_list:
        name = ",".join(f"{short[k]}={_name_value(v)}" for k, v in axes.items()) or "main"
        name = re.sub(r"[^A-Za-z0-9_.=,+-]", "-", name)
        if name in RESERVED_JOB_NAMES:
            name = f"job-{name}"
        if name in seen:  # the same point listed twice: keep both, distinguishable
            seen[name] += 1
            name = f"{name}.{seen[name]}"
        else:
            seen[name] = 0
        out.append((name, axes))
    return out


def _name_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def override_value(v: Any) -> str:
    """A YAML value as Hydra override text: 3e-4 -> 0.0003, True -> true, None -> null."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ",".join(override_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{override_value(x)}" for k, x in v.items()) + "}"
    s = str(v)
    if re.fullmatch(r"[\w./+-]*", s) and s:
        return s
    if '"' not in s and "\\" not in s:
        return f'"{s}"'
    # Hydra's quoted strings: escape quotes, and double only the backslashes that precede one
    body = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, s).replace("'", "\\'")
    return f"'{body}'"


def _override_list(raw: Any, where: str) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, dict):
        return [f"{k}={override_value(v)}" for k, v in raw.items()]
    if isinstance(raw, list) and all(isinstance(x, str) and "=" in x for x in raw):
        return list(raw)
    raise UserError(f"{where} must be a mapping (key: value) or a list of 'key=value' strings")


# ---- configs ---------------------------------------------------------------------------------


def set_launch_fields(cfg: Any, sweep_dir: Path, sweep: str, job: str, res: Resources, base: Path = ROOT) -> Any:
    """Fill in what the launcher owns: run.dir/sweep/job, absolute data paths, W&B grouping, device.

    Paths become absolute (relative ones are read from `base`) because jobs run from a snapshot
    of the code, not from the directory they were submitted from.
    """
    cfg.run.dir = str((sweep_dir / job).absolute())
    cfg.run.sweep, cfg.run.job = sweep, job
    for split in (cfg.dataset.train_dataset, cfg.dataset.val_dataset):
        if not Path(split.data_root).is_absolute():
            split.data_root = str((base / split.data_root).resolve())
    t = cfg.trainer.config
    if cfg.trainer.name == "deepspeed" and t.deepspeed_config and not Path(t.deepspeed_config).is_absolute():
        t.deepspeed_config = str((base / t.deepspeed_config).resolve())
    ck = t.checkpoint_strategy.config
    if ck.checkpoint_dir and not Path(ck.checkpoint_dir).is_absolute():
        ck.checkpoint_dir = str((base / ck.checkpoint_dir).resolve())
    if cfg.wandb.group is None:
        cfg.wandb.group = sweep
    if cfg.wandb.name is None:
        cfg.wandb.name = job
    if res.gpus_per_node == 0 and cfg.run.device == "auto":
        cfg.run.device = "cpu"
    return cfg


# ---- small helpers ---------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML without 1.1's base-60 numbers (`time: 24:00:00` stays a string, not 86400), and with
    1.2's floats (`3e-4` is a number)."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


class _TooBig(Exception):
    pass


def _load(text: str) -> Any:
    """yaml.load with our loader, refusing (_TooBig) what its aliases expand past MAX_YAML_VALUES."""
    if yaml_expansion(text, _Loader) > MAX_YAML_VALUES:
        raise _TooBig
    return yaml.load(text, Loader=_Loader)


def yaml_value(text: str, key: str = "a value") -> Any:
    try:
        return _load(text)
    except yaml.YAMLError:
        raise UserError(f"{text!r} is not a YAML value: quote it") from None
    except _TooBig:
        raise UserError(f"{key} expands through its YAML aliases to more than {MAX_YAML_VALUES:,} values "
                        "(anchors repeating anchors): give a plain value") from None


MAX_DEPTH = 32  # nesting of an experiment or profile file; far past any real one, far below Python's stack


class _TooDeep(Exception):
    pass


def _height(node: Any, path: set[int], memo: dict[int, int]) -> int:
    """Levels of mappings and lists in `node`; _TooDeep past MAX_DEPTH or when a node holds itself
    (a YAML alias inside its own anchor). A node shared by aliases is walked once."""
    if not isinstance(node, dict | list):
        return 0
    key = id(node)
    if key in memo:
        return memo[key]
    if key in path or len(path) >= MAX_DEPTH:
        raise _TooDeep
    path.add(key)
    memo[key] = 1 + max((_height(c, path, memo) for c in (node.values() if isinstance(node, dict) else node)),
                        default=0)
    path.discard(key)
    return memo[key]


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = _load(path.read_text())
        _height(data, set(), {})
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (a binary or damaged file?): an experiment or profile is "
                        f"a YAML text file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{at}: fix the file") from None
    except _TooBig:
        raise UserError(f"{path}: expands through its YAML aliases to more than {MAX_YAML_VALUES:,} values "
                        "(anchors repeating anchors): fix the file") from None
    except (_TooDeep, RecursionError):
        raise UserError(f"{path}: nested too deeply (more than {MAX_DEPTH} levels) or refers to itself "
                        f"(an alias inside its own anchor): fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data
