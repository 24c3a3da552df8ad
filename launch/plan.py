"""A job's plan before it runs: parameters, tokens per step, per-rank memory, checkpoint size.

Estimates, not measurements (a dry run imports no torch). Memory per rank is the model states
for the backend (weights, gradients, AdamW moments; sharded as the backend shards them) plus
activations for one micro-batch (~34 bytes x seq x batch x width per layer in 16-bit with
flash attention, Korthikanti et al. 2022, plus fp32 logits and their gradient).

The time-limit warning lead (`--signal=USR2@<lead>`) is sized from the checkpoint size so the
save fits: one more step (<= 60 s) and three times the save at the profile's write speed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GiB = 1024**3


@dataclass
class Plan:
    backend: str
    world_size: int
    params: int  # as GPT-2 counts them: tied embedding once, no vocab padding
    tokens_per_step: int
    states_gib: float
    activations_gib: float
    checkpoint_gib: float
    zero_stage: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def memory_per_rank_gib(self) -> float:
        return 1.1 * (self.states_gib + self.activations_gib)  # +10%: buffers, fragmentation


def param_count(m: Any) -> int:
    """GPT-2 parameters from the model settings (matches gpt2.model.GPT.num_params)."""
    c, L = m.n_embd, m.n_layer
    ln = 2 * c if m.bias else c
    per_layer = 12 * c * c + 2 * ln + (9 * c if m.bias else 0)  # c_attn, c_proj, c_fc, c_proj biases
    return m.vocab_size * c + m.block_size * c + L * per_layer + ln


def _padded_vocab(m: Any) -> int:
    k = max(1, m.pad_vocab_to)
    return (m.vocab_size + k - 1) // k * k


def zero_stage(path: str | None) -> int:
    """The ZeRO stage of a DeepSpeed config file (from its name when the file is not readable)."""
    if path:
        try:
            return int(json.loads(Path(path).read_text()).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError, AttributeError):
            m = re.search(r"zero(\d)", Path(path).name)
            if m:
                return int(m.group(1))
    return 0


def make_plan(cfg: Any, world_size: int) -> Plan:
    m, t = cfg.model.config, cfg.trainer.config
    w = max(1, world_size)
    seq = cfg.dataset.seq_len or m.block_size
    n = param_count(m)
    p = n + (_padded_vocab(m) - m.vocab_size) * m.n_embd  # what is stored
    mixed = t.use_mixed_precision
    backend = cfg.trainer.name
    stage: int | None = None
    notes: list[str] = []
    if backend == "fsdp":
        layer = 12 * m.n_embd**2 * (2 if mixed else 4)
        states = 16 * p / w + 2 * 2 * layer  # sharded states + two unsharded blocks (params, grads)
        if t.cpu_offload:
            states = 2 * 2 * layer
            notes.append("cpu_offload: optimizer states in host memory")
    elif backend == "deepspeed":
        stage = zero_stage(t.deepspeed_config)
        if mixed:  # bf16 weights and grads, fp32 master copy and moments
            states = {0: 16 * p, 1: 4 * p + 12 * p / w, 2: 2 * p + 14 * p / w}.get(stage, 16 * p / w)
        else:
            states = {0: 16 * p, 1: 8 * p + 8 * p / w, 2: 4 * p + 12 * p / w}.get(stage, 16 * p / w)
    else:
        states = 16 * p  # fp32 weights, grads, AdamW m and v on every rank
    act_bytes = 2 if mixed else 4
    acts = m.n_layer * 34 * seq * t.batch_size * m.n_embd * act_bytes / 2
    acts += 2 * 4 * seq * t.batch_size * _padded_vocab(m)  # fp32 logits and their gradient
    ckpt = 12 * p + (2 * p if backend == "deepspeed" and mixed else 0)
    return Plan(backend=backend, world_size=w, params=n,
                tokens_per_step=t.batch_size * seq * t.grad_accumulation_steps * w,
                states_gib=states / GiB, activations_gib=acts / GiB, checkpoint_gib=ckpt / GiB,
                zero_stage=stage, notes=notes)


def signal_lead_s(plan: Plan, time_min: int, min_lead_s: int, write_mb_s: float,
                  override: int | None = None) -> int:
    """Seconds before the time limit that USR2 arrives: room for a step and the save, capped at
    half the time limit."""
    save_s = plan.checkpoint_gib * 1024 / max(1.0, write_mb_s)
    lead = override if override is not None else max(min_lead_s, int(60 + 3 * save_s))
    return max(1, min(lead, time_min * 60 // 2))


def format_plan(plan: Plan, gpu_mem_gib: float | None = None, lead_s: int | None = None) -> str:
    stage = f" ZeRO-{plan.zero_stage}" if plan.zero_stage is not None else ""
    lines = [
        f"  parameters        {plan.params / 1e6:,.1f} M",
        f"  tokens per step   {plan.tokens_per_step:,} ({plan.world_size} ranks)",
        f"  memory per rank   ~{plan.memory_per_rank_gib:.2f} GiB ({plan.backend}{stage}: states "
        f"{plan.states_gib:.2f} GiB, activations {plan.activations_gib:.2f} GiB)",
        f"  checkpoint        ~{plan.checkpoint_gib:.2f} GiB (fp32 weights + AdamW moments)",
    ]
    if lead_s is not None:
        lines.append(f"  time-limit signal USR2 {lead_s} s before the limit")
    if gpu_mem_gib is not None and plan.memory_per_rank_gib > gpu_mem_gib:
        lines.append(f"  WARNING: ~{plan.memory_per_rank_gib:.1f} GiB per rank exceeds the {gpu_mem_gib:g} GiB "
                     f"of one GPU: lower trainer.config.batch_size or shard more (fsdp, deepspeed)")
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
