"""One rank of a backend test: trains every backend in turn inside one process group, writes JSON.

Launched by tests/test_backends.py as WORLD_SIZE processes with RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT in the environment (as torchrun would set them), or as one process without them.
Batches come from a fixed synthetic corpus, not the loader, so the backends alone are under test:
each optimizer step consumes one *global batch* of GLOBAL_BATCH windows, split the way
gpt2/data.py splits it (micro-batch m of rank r takes rows [(m*W + r)*B, (m*W + r + 1)*B)).

    python tests/dist_worker.py train  --out DIR   # every variant; saves each at step SAVE_AT
    python tests/dist_worker.py resume --out DIR   # fresh group: load DIR/ckpt/<variant>, continue

Rank 0 writes DIR/<mode>_w<world>.json: per variant the per-step losses, grad norms, and per
rank the parameter+optimizer bytes held and peak RSS; `train` also holds the single-process
reference (a plain model and AdamW on the whole global batch, no process group involved).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from gpt2 import distributed
from gpt2.backends import backend_class, make_backend
from gpt2.backends.base import Backend, make_adamw
from gpt2.config import TrainerSettings
from gpt2.logs import peak_memory_mb
from gpt2.model import GPT, GPT2Config
from gpt2.train import lr_at

MODEL = GPT2Config(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512, pad_vocab_to=64)
SEQ, GLOBAL_BATCH, STEPS, SAVE_AT, SEED = 32, 4, 20, 10, 1337
BASE = TrainerSettings(max_steps=STEPS, batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=4,
                       grad_clip=1.0, weight_decay=0.1, eval_interval=0)
ZERO = {f"zero{k}": f"deepspeed_configs/zero{k}.json" for k in (1, 2, 3)}

# name -> (backend, settings overrides, steps). Batch size follows from the world size and accumulation.
VARIANTS: dict[str, tuple[str, dict[str, Any], int]] = {
    "ddp": ("ddp", {}, STEPS),
    "fsdp": ("fsdp", {}, STEPS),
    **{z: ("deepspeed", {"deepspeed_config": path}, STEPS) for z, path in ZERO.items()},
    # k micro-batches of B against one batch of k*B: the global batch stays GLOBAL_BATCH
    **{f"{n}_accum": (b, {**o, "grad_accumulation_steps": 2}, 6)
       for n, (b, o) in {"ddp": ("ddp", {}), "fsdp": ("fsdp", {}),
                         **{z: ("deepspeed", {"deepspeed_config": p}) for z, p in ZERO.items()}}.items()},
    # bf16: close to fp32, not equal; FSDP also with the prefetch and reshard knobs turned
    "ddp_bf16": ("ddp", {"use_mixed_precision": True}, 6),
    "fsdp_bf16": ("fsdp", {"use_mixed_precision": True, "reshard_after_forward": False,
                           "forward_prefetch": 2, "backward_prefetch": 0}, 6),
    "zero1_bf16": ("deepspeed", {"use_mixed_precision": True, "deepspeed_config": ZERO["zero1"]}, 6),
    "zero3_bf16": ("deepspeed", {"use_mixed_precision": True, "deepspeed_config": ZERO["zero3"]}, 6),
}
CHECKPOINTED = ("ddp", "fsdp", "zero1", "zero2", "zero3")  # saved at SAVE_AT by `train`


def corpus(n_tokens: int = 20_000) -> torch.Tensor:
    """A random first-order Markov chain with 4 successors per token: learnable, so losses move."""
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, MODEL.vocab_size, (MODEL.vocab_size, 4), generator=g)
    picks = torch.randint(0, 4, (n_tokens,), generator=g)
    toks = torch.empty(n_tokens, dtype=torch.long)
    toks[0] = 0
    for i in range(1, n_tokens):
        toks[i] = successors[toks[i - 1], picks[i]]
    return toks


def global_batch(toks: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GLOBAL_BATCH windows of one optimizer step: x, y of shape (GLOBAL_BATCH, SEQ)."""
    starts = (step * GLOBAL_BATCH + torch.arange(GLOBAL_BATCH)) * SEQ % (len(toks) - SEQ - 1)
    rows = torch.stack([toks[s: s + SEQ + 1] for s in starts.tolist()])  # (GB, SEQ + 1)
    return rows[:, :-1], rows[:, 1:]


def new_model() -> GPT:
    torch.manual_seed(SEED)  # identical initial weights on every rank and in the reference
    return GPT(replace(MODEL))


def settings_for(overrides: dict[str, Any], world: int) -> TrainerSettings:
    s = replace(BASE, **overrides)
    micro = GLOBAL_BATCH // (world * s.grad_accumulation_steps)
    assert micro * world * s.grad_accumulation_steps == GLOBAL_BATCH
    return replace(s, batch_size=micro)


def reference(toks: torch.Tensor, steps: int) -> dict[str, list[float]]:
    """Single-process training on the whole global batch: the definition the backends must meet."""
    model, s = new_model(), BASE
    opt = make_adamw(model, s, torch.device("cpu"))
    losses, norms = [], []
    for step in range(steps):
        x, y = global_batch(toks, step)
        _, loss = model(x, y)
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)))
        for group in opt.param_groups:
            group["lr"] = lr_at(step, s)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"loss": losses, "grad_norm": norms}


def train_steps(backend: Backend, s: TrainerSettings, toks: torch.Tensor, first: int, last: int,
                dist: distributed.DistInfo, save_dir: Path | None = None) -> dict[str, list[float]]:
    """Optimizer steps first..last-1, as gpt2/train.py runs them; saves after step SAVE_AT if asked."""
    W, G, B = dist.world_size, s.grad_accumulation_steps, s.batch_size
    losses, norms = [], []
    for step in range(first, last):
        x, y = global_batch(toks, step)
        local = 0.0
        for m in range(G):
            rows = slice((m * W + dist.rank) * B, (m * W + dist.rank + 1) * B)
            local += backend.forward_backward(x[rows], y[rows], last_micro=m == G - 1).item()
        norms.append(backend.optimizer_step(lr_at(step, s)))
        losses.append(distributed.all_reduce([local / G])[0] / W)
        if save_dir is not None and step + 1 == SAVE_AT:
            if dist.is_main:
                save_dir.mkdir(parents=True, exist_ok=True)
            distributed.barrier()
            backend.save(save_dir)
            distributed.barrier()
    return {"loss": losses, "grad_norm": norms}


def per_rank(value: float) -> list[float]:
    """Every rank's value, in rank order."""
    if torch.distributed.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=("train", "resume"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", nargs="*", help="variants to run (default: all for train, CHECKPOINTED for resume)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # two ranks share two cores
    for kind in {kind for kind, _, _ in VARIANTS.values()}:
        backend_class(kind).preload()
    dist = distributed.init("cpu")
    toks = corpus()
    result: dict[str, Any] = {"world_size": dist.world_size, "variants": {}}
    if args.mode == "train" and dist.is_main:
        ref = reference(toks, STEPS)
        result["reference"], result["reference_grad_norm"] = ref["loss"], ref["grad_norm"]
    names = args.only or (list(VARIANTS) if args.mode == "train" else list(CHECKPOINTED))
    for name in names:
        kind, overrides, steps = VARIANTS[name]
        t0 = time.perf_counter()
        s = settings_for(overrides, dist.world_size)
        backend = make_backend(kind, s, dist)
        backend.setup(new_model())
        ckpt = args.out / "ckpt" / name
        if args.mode == "train":
            row = train_steps(backend, s, toks, 0, steps, dist, ckpt if name in CHECKPOINTED else None)
        else:
            backend.load(ckpt)
            row = train_steps(backend, s, toks, SAVE_AT, steps, dist)
        row["state_bytes"] = per_rank(backend.state_bytes())
        row["rss_mb"] = per_rank(peak_memory_mb(dist.device))
        if name in ("ddp", "fsdp", "zero1", "zero3", "fsdp_bf16", "zero1_bf16"):  # the export path
            full = backend.full_state_dict()
            row["full_state_dict"] = {
                "keys": sorted(full),
                "norm": float(sum(v.double().square().sum() for v in full.values()) ** 0.5),
                "tied": full["lm_head.weight"].data_ptr() == full["transformer.wte.weight"].data_ptr(),
                # True if every value is a bf16 number: an export of the bf16 compute copy, not fp32 masters
                "bf16_only": all(torch.equal(v, v.bfloat16().float()) for v in full.values()),
            }
        row["seconds"] = time.perf_counter() - t0
        result["variants"][name] = row
        distributed.barrier()
        backend.close()
    if dist.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.mode}_w{dist.world_size}.json").write_text(json.dumps(result, indent=1))
    distributed.barrier()
    del backend
    for kind in {kind for kind, _, _ in VARIANTS.values()}:
        backend_class(kind).teardown()
    if left := distributed.destroy(synchronize=False):
        sys.exit(f"process-group threads still running at exit: {left}")


if __name__ == "__main__":
    main()
