"""The typed config: composition of configs/, overrides, strict errors, YAML round trip, hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from gpt2.compose import Composer, group_options, load_config
from gpt2.config import Config, ConfigError, config_hash, from_yaml, save_resolved, to_yaml
from gpt2.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _error(overrides: list[str]) -> str:
    """The one-line ConfigError message that `overrides` must raise."""
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    msg = str(info.value)
    assert "\n" not in msg.strip(), f"error message is not one line: {msg!r}"
    assert msg.strip(), "empty error message"
    return msg


# ---- composition ------------------------------------------------------------------------


def test_default_composition() -> None:
    cfg = load_config([])
    assert isinstance(cfg, Config)
    assert (cfg.model.name, cfg.trainer.name, cfg.dataset.name) == ("tiny", "ddp", "pydoc")
    assert cfg.model.config.n_layer == 4 and cfg.model.config.n_embd == 128
    assert cfg.run.dir == "runs/default"
    assert cfg.run.seed == 1337


def test_group_overrides() -> None:
    cfg = load_config(["model=gpt2_124m", "trainer=fsdp", "dataset=wikitext"])
    assert cfg.model.name == "gpt2_124m" and cfg.trainer.name == "fsdp" and cfg.dataset.name == "wikitext"
    m = cfg.model.config
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (12, 12, 768, 1024, 50257)
    assert cfg.dataset.train_dataset.data_root == "data/wikitext"


@pytest.mark.parametrize("group", ["model", "trainer", "dataset"])
def test_every_group_option_composes(group: str) -> None:
    options = group_options(group)
    assert options == sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")) and options
    for option in options:
        cfg = load_config([f"{group}={option}"])
        assert getattr(cfg, group).name == option


def test_key_overrides() -> None:
    cfg = load_config([
        "model.config.n_layer=2",
        "trainer.config.max_steps=7",
        "trainer.config.lr=1e-3",
        "trainer.config.use_mixed_precision=true",
        "run.dir=runs/x",
    ])
    assert cfg.model.config.n_layer == 2
    assert cfg.trainer.config.max_steps == 7
    assert cfg.trainer.config.lr == pytest.approx(1e-3)
    assert cfg.trainer.config.use_mixed_precision is True
    assert cfg.run.dir == "runs/x"


def test_schema_keys_absent_from_yaml_can_be_overridden() -> None:
    # These keys exist only in the schema (the YAML files leave them at their defaults).
    cfg = load_config([
        "model.config.pad_vocab_to=128",
        "dataset.seq_len=128",
        "dataset.pool_shards=2",
        "trainer.config.lr_decay_steps=500",
        "trainer.config.deepspeed_config=deepspeed_configs/zero2.json",
        "wandb.project=p",
    ])
    assert cfg.model.config.pad_vocab_to == 128
    assert cfg.dataset.seq_len == 128 and cfg.dataset.pool_shards == 2
    assert cfg.trainer.config.lr_decay_steps == 500
    assert cfg.trainer.config.deepspeed_config == "deepspeed_configs/zero2.json"
    assert cfg.wandb.project == "p"


def test_original_key_paths_exist() -> None:
    cfg = load_config(["trainer=deepspeed"])
    c = OmegaConf.structured(cfg)
    for key in (
        "model.config.n_layer",
        "trainer.config.max_steps",
        "trainer.config.grad_accumulation_steps",
        "trainer.config.use_mixed_precision",
        "trainer.config.checkpoint_strategy.config.checkpoint_dir",
        "trainer.config.deepspeed_config",
        "dataset.train_dataset.data_root",
        "run.dir",
    ):
        assert OmegaConf.select(c, key, throw_on_missing=True, default="<absent>") != "<absent>", key
    # ...and each can be set from the command line.
    cfg = load_config([
        "model.config.n_layer=3",
        "trainer.config.grad_accumulation_steps=4",
        "trainer.config.checkpoint_strategy.config.checkpoint_dir=/tmp/ckpt",
        "dataset.train_dataset.data_root=/data/x",
    ])
    assert cfg.model.config.n_layer == 3
    assert cfg.trainer.config.grad_accumulation_steps == 4
    assert cfg.trainer.config.checkpoint_strategy.config.checkpoint_dir == "/tmp/ckpt"
    assert cfg.dataset.train_dataset.data_root == "/data/x"


# ---- errors: one line, naming the key ---------------------------------------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.config.foo=1", "trainer.config.foo"),
        ("+trainer.config.foo=1", "trainer.config.foo"),
        ("model.config.n_layers=2", "model.config.n_layers"),
        ("+model.config.n_layers=2", "model.config.n_layers"),
        ("foo=1", "foo"),
    ],
)
def test_unknown_key(override: str, key: str) -> None:
    msg = _error([override])
    assert f"'{key}'" in msg and "unknown" in msg


def test_unknown_group_option_lists_choices() -> None:
    msg = _error(["model=foo"])
    assert "'foo'" in msg and "model" in msg
    for option in ("tiny", "gpt2_124m", "gpt2_350m", "gpt2_774m", "gpt2_1558m"):
        assert option in msg
    msg = _error(["trainer=fdsp"])
    assert "'fdsp'" in msg and all(o in msg for o in ("ddp", "fsdp", "deepspeed"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.config.max_steps=abc", "trainer.config.max_steps"),
        ("trainer.config.lr=fast", "trainer.config.lr"),
        ("model.config.n_layer=2.5", "model.config.n_layer"),
        ("trainer.config.use_mixed_precision=maybe", "trainer.config.use_mixed_precision"),
        ("trainer.config.max_steps=null", "trainer.config.max_steps"),
    ],
)
def test_wrong_type(override: str, key: str) -> None:
    assert key in _error([override])


@pytest.mark.parametrize(
    "override, key",
    [
        ("trainer.config.max_steps=0", "trainer.config.max_steps"),
        ("trainer.config.grad_accumulation_steps=0", "trainer.config.grad_accumulation_steps"),
        ("trainer.config.lr=-1", "trainer.config.lr"),
        ("trainer.config.checkpoint_strategy.config.keep_last=1", "keep_last"),
        ("model.config.n_head=5", "model.config.n_head"),  # 128 is not divisible by 5
        ("model.config.n_layer=0", "model.config.n_layer"),
        ("model.config.dropout=1.5", "model.config.dropout"),
        ("model.config.pad_vocab_to=0", "model.config.pad_vocab_to"),
        ("dataset.seq_len=4096", "dataset.seq_len"),
        ("dataset.pool_shards=0", "dataset.pool_shards"),
        ("trainer.name=horovod", "trainer.name"),
        ("wandb.mode=sometimes", "wandb.mode"),
        ("trainer.config.lr=nan", "trainer.config.lr is nan"),  # passed every `< 0` check
        ("trainer.config.beta2=-inf", "trainer.config.beta2 is -inf"),
        ("trainer.config.time_budget_s=inf", "trainer.config.time_budget_s is inf"),
    ],
)
def test_invalid_value(override: str, key: str) -> None:
    assert key in _error([override])


@pytest.mark.parametrize(
    "override, says",
    [
        ("model.config.n_layer=???", "'model.config.n_layer' has no value"),  # was a TypeError in validate
        ("model.config.dropout=???", "'model.config.dropout' has no value"),
        ("run.dir=???", "'run.dir' has no value"),  # was accepted: run.dir None reached training
        ("trainer.config.checkpoint_strategy.config.interval.0=1",
         "trainer.config.checkpoint_strategy.config.interval is a value, not a group of keys"),  # an AttributeError
        ("x" * 5000 + "=1", "unknown key 'xxx"),  # was an OSError: the key was stat-ed as a group folder
        ("/etc=x", "is not key=value"),
    ],
)
def test_overrides_found_by_fuzzing_are_one_line_errors(override: str, says: str) -> None:
    assert says in _error([override])


# What the fuzz draws from: every key of the schema, and values that are odd for any type.
ODD_VALUES = ["", "null", "???", "-1", "0", "1e400", "nan", "-inf", "99999999999999999999999", "true", "[", "]",
              "{", "[1,2", "{a:1}", "[]", "{}", "${", "${nope}", "${oc.env:GPT2_FUZZ_UNSET}", "${oc.decode:'[1'}",
              "${model.config.n_embd}", "${.}", "\\", "\x00", "a\nb", "\u202e", "\U0001f642", "x" * 3000,
              "../../etc", "/", "=", "a=b", "0x10", "1.5", "1,2", "'${oc.env:HOME}'", "{a: ${x}}"]


def _leaf_keys(node: object, prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in OmegaConf.to_container(OmegaConf.structured(node)).items():  # type: ignore[union-attr]
        key = f"{prefix}{k}"
        out += _leaf_keys(getattr(node, k), key + ".") if isinstance(v, dict) else [key]
    return out


def test_a_seeded_fuzz_of_overrides_gets_a_config_or_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """800 random command lines (1-3 overrides: a schema key, a group or a stray word, set to an odd
    value, sometimes with +, ++ or ~, or one level too deep): each composes or raises a ConfigError
    of one line, never another exception. Found: ???, a key under a plain value, a long key. One
    Composer for all of them, as a sweep uses it: its caches must not carry one line into the next."""
    import random

    monkeypatch.delenv("GPT2_FUZZ_UNSET", raising=False)
    keys = _leaf_keys(load_config([]))
    groups = ["model", "trainer", "dataset"]
    rng = random.Random(20261130)

    def override() -> str:
        pick = rng.random()
        if pick < 0.1:
            return f"{rng.choice(groups)}={rng.choice(ODD_VALUES + ['tiny', 'gpt2_124m', 'ddp', 'fsdp'])}"
        if pick < 0.2:
            return f"{rng.choice(ODD_VALUES)}={rng.choice(ODD_VALUES)}"
        key = rng.choice(keys)
        if rng.random() < 0.1:
            key += "." + rng.choice(["x", "0", "config"])
        if rng.random() < 0.1:
            key = rng.choice(["+", "++", "~"]) + key
        return f"{key}={rng.choice(ODD_VALUES)}"

    composer = Composer()
    outcomes = {"config": 0, "error": 0}
    for _ in range(800):
        overrides = [override() for _ in range(rng.randint(1, 3))]
        try:
            assert isinstance(composer.compose(overrides), Config)
            outcomes["config"] += 1
        except ConfigError as exc:
            assert str(exc).strip(), overrides  # a door prints it with one_line(): one line whatever it holds
            outcomes["error"] += 1
    assert outcomes["config"] > 20 and outcomes["error"] > 500, outcomes  # the draw reaches both outcomes


def test_config_error_is_a_user_error() -> None:
    assert issubclass(ConfigError, UserError) and ConfigError.exit_code == 2


# ---- saved configs ----------------------------------------------------------------------


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(["model=gpt2_350m", "trainer=fsdp", "dataset.seq_len=512", "run.dir=runs/rt"])
    path = tmp_path / "sub" / "config.yaml"
    save_resolved(cfg, path)
    assert path.read_text() == to_yaml(cfg)
    back = from_yaml(path)
    assert back == cfg
    assert to_yaml(back) == to_yaml(cfg)


def test_from_yaml_rejects_unknown_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(load_config([])).replace("max_steps:", "max_stepz:"))
    with pytest.raises(ConfigError, match="max_stepz"):
        from_yaml(path)


def test_config_hash() -> None:
    base = config_hash(load_config([]))
    assert base == config_hash(load_config([]))  # stable
    # Keys that may change across a resume do not change the hash...
    assert base == config_hash(load_config(["run.dir=runs/elsewhere", "trainer.config.max_steps=99"]))
    # ...the model's shape does.
    assert base != config_hash(load_config(["model.config.n_layer=2"]))
    assert base != config_hash(load_config(["model.config.n_embd=256"]))
    assert base != config_hash(load_config(["model=gpt2_124m"]))


def test_model_settings_are_the_model_config_fields() -> None:
    """GPT2Config is built from ModelSettings by field name: the two lists must be the same."""
    import dataclasses

    from gpt2.config import ModelSettings
    from gpt2.model import GPT2Config

    assert [f.name for f in dataclasses.fields(ModelSettings)] == [f.name for f in dataclasses.fields(GPT2Config)]
    assert dataclasses.asdict(ModelSettings()) == dataclasses.asdict(GPT2Config())


def test_interpolations_in_configs_follow_the_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A config file that interpolates another key sees the job's override of that key, on the fast
    path too (the composer then resolves the whole tree instead of setting one value)."""
    import shutil

    from gpt2 import compose as gc

    configs = tmp_path / "configs"
    shutil.copytree(gc.CONFIG_DIR, configs)
    ddp = configs / "trainer" / "ddp.yaml"
    ddp.write_text(ddp.read_text().replace("  warmup_steps: 100", "  warmup_steps: ${trainer.config.eval_interval}"))
    monkeypatch.setattr(gc, "CONFIG_DIR", configs)
    composer = gc.Composer()
    assert composer.compose([]).trainer.config.warmup_steps == 100
    cfg = composer.compose(["trainer.config.eval_interval=7"])
    assert cfg.trainer.config.warmup_steps == 7 and cfg.trainer.config.eval_interval == 7
    assert composer.compose(["trainer.config.lr=1e-3"]).trainer.config.warmup_steps == 100


def test_validation_data_follows_the_training_data_unless_set() -> None:
    """The original commands set only dataset.train_dataset.data_root: validation must not silently
    use another corpus."""
    assert load_config(["dataset.train_dataset.data_root=/corpus/a"]).dataset.val_dataset.data_root == "/corpus/a"
    both = load_config(["dataset.train_dataset.data_root=/corpus/a", "dataset.val_dataset.data_root=/corpus/b"])
    assert (both.dataset.train_dataset.data_root, both.dataset.val_dataset.data_root) == ("/corpus/a", "/corpus/b")
    assert load_config(["dataset=wikitext"]).dataset.val_dataset.data_root == "data/wikitext"
