"""DeepSpeed ZeRO (stage 1, 2 or 3, from a JSON in deepspeed_configs/) around the same AdamW.

The JSON chooses the ZeRO stage and its buckets; everything the trainer config also knows is
derived from the trainer config, so the two never disagree: micro batch, accumulation steps,
global batch, clipping and bf16. A JSON that sets one of these to another value, or brings its
own optimizer or scheduler, is refused. The optimizer is the trainer's AdamW (same
weight-decay groups as DDP) handed to the engine, and the loop sets its lr every step.

Accumulation: the engine divides each micro-batch loss by gradient_accumulation_steps in
backward and reduces gradients at the boundary, which we set explicitly from `last_micro`, so
`engine.step()` runs once per optimizer step. Checkpoints are the engine's own
(`save_checkpoint` into `<dir>/deepspeed/`, its files kept in memory and written by our writer:
see `stage`), readable only by the same number of ranks.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from gpt2 import strict_json
from gpt2.backends.base import Backend, held_bytes, make_adamw, moment_shapes_problem
from gpt2.checkpoint import safe_load
from gpt2.checkpoint.files import CheckpointError
from gpt2.checkpoint.writer import Staged, TorchFiles
from gpt2.config import TrainerSettings
from gpt2.errors import UserError
from gpt2.model import GPT

REPO_ROOT = Path(__file__).resolve().parents[2]
TAG = "deepspeed"  # the engine's checkpoint tag: its files go to <ckpt_dir>/deepspeed/


class DeepSpeedConfigError(UserError):
    """A DeepSpeed JSON that is missing or contradicts the trainer config."""


# Top-level keys of a DeepSpeed JSON that a misspelt key is checked against (not every key DeepSpeed
# reads: one that resembles none of these is passed on as written).
KNOWN_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "zero_optimization", "bf16", "bfloat16", "fp16", "optimizer", "scheduler", "steps_per_print",
    "wall_clock_breakdown", "memory_breakdown", "activation_checkpointing", "communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "zero_allow_untested_optimizer", "checkpoint",
    "data_types", "comms_logger", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "aio",
    "compile", "torch_autocast", "amp", "sparse_gradients", "dump_state", "elasticity", "pipeline",
    "data_efficiency", "compression_training", "zero_force_ds_cpu_optimizer", "seq_parallel_communication_data_type",
)


def resolve_config_path(path: str) -> Path:
    """The JSON as given (absolute or relative to the working directory), else under the repo root."""
    p = Path(path)
    for candidate in (p, REPO_ROOT / p):
        if candidate.is_file():
            return candidate
    raise DeepSpeedConfigError(
        f"trainer.config.deepspeed_config={path}: no such file (relative paths are tried from the working "
        f"directory and from {REPO_ROOT}); choose one of deepspeed_configs/zero1.json, zero2.json, zero3.json"
    )


def build_ds_config(s: TrainerSettings, world_size: int) -> dict[str, Any]:
    """The JSON named by trainer.config.deepspeed_config, completed from the trainer config.

    Keys the trainer owns may be absent or "auto"; any other value must equal the derived one.
    """
    path = resolve_config_path(s.deepspeed_config)
    try:
        ds = strict_json.loads(path.read_text())
    except UnicodeDecodeError:
        raise DeepSpeedConfigError(f"{path}: not UTF-8 text (a binary file?): start from "
                                   f"deepspeed_configs/zero1.json") from None
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(ds, dict):
        raise DeepSpeedConfigError(f"{path} holds a JSON {type(ds).__name__}, not an object: start from "
                                   f"deepspeed_configs/zero1.json")
    for key in ds:  # DeepSpeed ignores a key it does not know: a misspelt one would quietly mean ZeRO-0
        if key not in KNOWN_KEYS and (near := difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.8)):
            raise DeepSpeedConfigError(f"{path}: unknown key '{key}': did you mean '{near[0]}'?")
    spp = ds.get("steps_per_print", 1)
    if isinstance(spp, bool) or not isinstance(spp, int) or spp < 1:
        raise DeepSpeedConfigError(f"{path}: steps_per_print {spp!r} is not a number of steps >= 1")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise DeepSpeedConfigError(f"{path}: zero_optimization must be an object, like deepspeed_configs/zero1.json's")
    for key in ("offload_optimizer", "offload_param"):
        offload = zero.get(key)
        device = offload.get("device", "cpu") if isinstance(offload, dict) else offload
        if key in zero and device not in (None, "none"):
            raise DeepSpeedConfigError(
                f"{path} sets zero_optimization.{key}: this trainer does not support DeepSpeed offload "
                f"(the optimizer is ours, not DeepSpeedCPUAdam); remove it, or use trainer=fsdp "
                f"trainer.config.cpu_offload=true"
            )
    for key in ("fp16", "bf16", "bfloat16"):
        if not isinstance(ds.get(key, {}), dict):
            raise DeepSpeedConfigError(f"{path}: '{key}' must be an object such as {{\"enabled\": \"auto\"}}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise DeepSpeedConfigError(
                f"{path} sets '{key}': the optimizer and lr schedule come from trainer.config "
                f"(lr, min_lr, warmup_steps, betas, weight_decay); remove '{key}' from the JSON"
            )
    if ds.get("fp16", {}).get("enabled") is True:
        raise DeepSpeedConfigError(
            f"{path} enables fp16: this trainer supports bf16 only (trainer.config.use_mixed_precision=true)"
        )
    if "fp16" in ds:
        ds["fp16"] = {**ds["fp16"], "enabled": False}  # "auto" would read as true
    derived: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": s.batch_size,
        "gradient_accumulation_steps": s.grad_accumulation_steps,
        "train_batch_size": s.batch_size * s.grad_accumulation_steps * world_size,
        "gradient_clipping": float(s.grad_clip),
    }
    sources = {
        "train_micro_batch_size_per_gpu": "trainer.config.batch_size",
        "gradient_accumulation_steps": "trainer.config.grad_accumulation_steps",
        "train_batch_size": "batch_size x grad_accumulation_steps x world size",
        "gradient_clipping": "trainer.config.grad_clip",
    }
    for key, want in derived.items():
        have = ds.get(key, "auto")
        if have != "auto" and have != want:
            raise DeepSpeedConfigError(
                f"{path} sets {key}={have!r} but the trainer config gives {want!r} ({sources[key]}): "
                f"remove the key from the JSON or set it to \"auto\""
            )
        ds[key] = want
    bf16 = {**ds.pop("bfloat16", {}), **ds.get("bf16", {})}  # DeepSpeed reads either name
    if bf16.get("enabled", "auto") not in ("auto", s.use_mixed_precision):
        raise DeepSpeedConfigError(
            f"{path} sets bf16.enabled={bf16['enabled']!r} but trainer.config.use_mixed_precision="
            f"{s.use_mixed_precision}: remove bf16.enabled from the JSON or set it to \"auto\""
        )
    bf16["enabled"] = s.use_mixed_precision
    ds["bf16"] = bf16
    ds.setdefault("steps_per_print", 2**31 - 1)  # our loop logs; the engine stays quiet
    return ds


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    @classmethod
    def preload(cls) -> None:
        """deepspeed.comm's TorchBackend takes `group=GroupMember.WORLD` as a default argument."""
        import deepspeed  # noqa: F401

    def close(self) -> None:
        """The engine's own teardown: its hooks and module registries keep the model, hence the groups.

        ZeRO-3 also hangs the group on every parameter (`ds_process_group`, and all-gather closures
        over it), keeps parameters in its trace caches after `destroy()`, and its optimizer, its
        parameter-offload object and the engine, kept alive by hooks, hold the world group's clone:
        their attributes go too (found with gc.get_referrers; tests/test_resume.py checks that no
        process-group thread is left after a ZeRO-3 run)."""
        engine = getattr(self, "engine", None)
        if engine is not None:
            params = list(engine.module.parameters())
            optimizer = engine.optimizer
            offload = getattr(optimizer, "parameter_offload", None)  # ZeRO-3's fetch hooks' owner
            engine.destroy()
            for param in params:
                param.__dict__.clear()  # DeepSpeed's additions only: a plain Parameter keeps none
            # hooks and closures keep these alive past destroy(), and each holds a group: empty them
            for obj in (offload, optimizer, engine):
                if obj is not None:
                    obj.__dict__.clear()
            self.model = self.engine = None

    @classmethod
    def teardown(cls) -> None:
        """DeepSpeed's own: destroy its process groups and drop its module-level references (after every
        engine is closed: an engine's teardown still asks deepspeed.comm for the rank)."""
        import deepspeed.comm
        import deepspeed.utils.groups as ds_groups

        if deepspeed.comm.is_initialized():
            deepspeed.comm.destroy_process_group()
        # module-level groups (ZeRO-3 clones the world group into _WORLD_GROUP)
        for name, value in list(vars(ds_groups).items()):
            if name.startswith("_") and name.endswith("_GROUP") and value is not None:
                setattr(ds_groups, name, {} if isinstance(value, dict) else None)

    def setup(self, model: GPT) -> None:
        self.ds_config = build_ds_config(self.s, self.dist.world_size)  # a bad JSON fails before the engine is built
        import deepspeed
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)  # its INFO lines repeat per rank and per step
        if self.device.type == "cpu":
            # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce for inference when it joins the
            # group: minutes of g++ on a fresh machine, for an op training never calls. Marking it
            # incompatible (DeepSpeed keeps this dict for edits like this one) skips the build.
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        optimizer = make_adamw(model, self.s, self.device)
        # The process group exists already (gpt2.distributed); the engine joins it, but insists on
        # LOCAL_RANK, which a plain single process (no launcher) does not have.
        os.environ.setdefault("LOCAL_RANK", str(self.dist.local_rank))
        from pydantic import ValidationError

        try:
            engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        except ValidationError as exc:  # DeepSpeed's own check of the JSON (a stage 7, a negative bucket)
            err = exc.errors()[0]
            where = ".".join(str(part) for part in err.get("loc", ())) or "?"
            raise DeepSpeedConfigError(f"{resolve_config_path(self.s.deepspeed_config)}: {where}: {err.get('msg')} "
                                       f"(got {str(err.get('input'))[:40]!r}): see deepspeed_configs/zero2.json") from None
        if self.s.compile:
            engine.compile()
        self.model = self.engine = engine
        self.raw_model = engine.module
        self.optimizer = zero_opt  # the ZeRO wrapper; its param_groups are the AdamW's

    def autocast(self):  # noqa: ANN201 - a context manager
        """No autocast: with bf16 enabled the engine holds bf16 weights and fp32 master copies."""
        return nullcontext()

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_micro: bool) -> torch.Tensor:
        engine = self.engine
        engine.set_gradient_accumulation_boundary(last_micro)  # reduce (and step) only after the last one
        _, loss = engine(x.to(self.device), y.to(self.device))
        engine.backward(loss)  # scales by 1/gradient_accumulation_steps itself
        return loss.detach().float()

    def optimizer_step(self, lr: float) -> float:
        self.stager.fence()  # a save's host copy must have read the state this step changes
        self.set_lr(lr)
        self.engine.step()  # clip (gradient_clipping), AdamW, zero the gradients
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def stage(self, ckpt_dir: Path, copy: bool) -> Staged:
        """Collective: the engine's own `save_checkpoint` (its barriers and tag check run here), with its
        checkpoint engine swapped for one that keeps each `save(state, path)` instead of writing it.

        The files are then the ones the engine would have written (same names under
        `<dir>/deepspeed/`, same torch.save format), written by our writer; the engine still copies
        its recovery scripts (zero_to_fp32.py) itself, which the commit hashes."""
        from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

        own = self.engine.checkpoint_engine
        stager = self.stager if copy else None

        class Keep(CheckpointEngine):  # the engine asks only these of it while saving
            def __init__(self) -> None:
                super().__init__()
                self.kept: dict[str, Any] = {}

            def create(self, info: Any) -> None:
                pass

            def save(self, state_dict: Any, path: str) -> None:
                self.kept[path] = stager.add(state_dict, path) if stager is not None else state_dict

            def load(self, path: str, map_location: Any = None) -> Any:
                raise AssertionError("only saving goes through this engine")

            def commit(self, info: Any) -> bool:
                return True

        keep = Keep()
        self.engine.checkpoint_engine = keep
        try:
            # save_latest: `<dir>/latest` names the tag (rank 0 writes it itself, not through the
            # checkpoint engine), so DeepSpeed's own `zero_to_fp32.py <dir> OUT` works as documented
            self.engine.save_checkpoint(str(ckpt_dir), tag=TAG, save_latest=True)
        finally:
            self.engine.checkpoint_engine = own
        zipfile = bool(getattr(own, "zipfile_serialization", False))
        rels = {str(Path(p).relative_to(ckpt_dir)): obj for p, obj in keep.kept.items()}
        if stager is None:
            return TorchFiles(rels, zipfile=zipfile)
        stager.start()  # copies during the next forward and backward; optimizer_step fences
        return TorchFiles(rels, zipfile=zipfile, ready=stager.ready)

    def load(self, ckpt_dir: Path) -> None:
        """Collective; the checkpoint must come from the same number of ranks (checkpoint.py checks)."""
        # the engine's torch.load passes weights_only=False: scan its files, then force weights_only
        # with DeepSpeed's few classes allowed (gpt2.checkpoint.safe_load)
        safe_load.check_dir(ckpt_dir / TAG, self.name)
        with safe_load.weights_only_loading(safe_load.DEEPSPEED):
            try:
                path, _ = self.engine.load_checkpoint(str(ckpt_dir), tag=TAG, load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
            except RuntimeError as exc:  # the module's load_state_dict: names or shapes the model does not have
                if not str(exc).startswith("Error(s) in loading state_dict"):
                    raise
                raise CheckpointError(f"{ckpt_dir / TAG} does not fit this run's model ({safe_load.brief(exc)}); "
                                      "move its checkpoint aside to resume from the one before") from None
        if path is None:
            raise UserError(f"{ckpt_dir}: no DeepSpeed checkpoint with tag '{TAG}' in it")
        base = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)  # ZeRO wraps the AdamW
        why = moment_shapes_problem(base) if isinstance(base, torch.optim.Optimizer) else None
        if why is not None:  # would fail the first optimizer step with a traceback
            raise CheckpointError(f"{ckpt_dir / TAG} {why}; move its checkpoint aside to resume from the one before")

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: every rank gets the whole model on CPU, from the fp32 master weights.

        Under ZeRO the master copy is partitioned across ranks (and under ZeRO-3 so are the module's
        own weights), so each parameter is gathered; tied weights come back as one tensor.
        """
        from deepspeed.utils import safe_get_full_fp32_param

        out: dict[str, torch.Tensor] = {}
        gathered: dict[int, torch.Tensor] = {}
        for key, value in self.raw_model.state_dict(keep_vars=True).items():  # same order on every rank
            if id(value) not in gathered:
                full = safe_get_full_fp32_param(value) if isinstance(value, torch.nn.Parameter) else None
                gathered[id(value)] = (value if full is None else full).detach().float().cpu()
            out[key] = gathered[id(value)]
        return out

    def state_bytes(self) -> int:
        """Module weights (under ZeRO-3 this rank's partition, plus the small parameters it keeps whole)
        plus the AdamW's fp32 partitions and its state."""
        params = list(self.raw_model.parameters())
        module = [*params, *(p.ds_tensor for p in params if hasattr(p, "ds_tensor"))]
        inner = getattr(self.optimizer, "optimizer", self.optimizer)  # the AdamW inside the ZeRO wrapper
        master = [p for g in inner.param_groups for p in g["params"]]
        state = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t)]
        return held_bytes([*module, *master, *state])
