"""GPT-2, from scratch, in one file.

Module names follow OpenAI's GPT-2 (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2,
mlp.c_fc, mlp.c_proj, ln_f, lm_head) so Hugging Face's published weights map 1:1; the only
difference is that HF stores its linear layers as Conv1D (in, out), which we transpose.
No parallelism lives here: DDP, FSDP and DeepSpeed wrap this module from outside.
This file imports nothing else of the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPT2Config:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    pad_vocab_to: int = 64  # embedding rows rounded up to a multiple of this (1: none)
    dropout: float = 0.0
    bias: bool = True
    flash: bool = True  # F.scaled_dot_product_attention; False: explicit masked softmax

    @property
    def padded_vocab_size(self) -> int:
        m = max(1, self.pad_vocab_to)
        return (self.vocab_size + m - 1) // m * m


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.n_head, self.n_embd, self.flash = cfg.n_head, cfg.n_embd, cfg.flash
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale = True  # GPT-2 init: scaled by 1/sqrt(2 * n_layer)
        self.dropout = cfg.dropout
        self.attn_dropout = nn.Dropout(cfg.dropout)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        if not cfg.flash:
            mask = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
            self.register_buffer("mask", mask.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.flash:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
            att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's gelu
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj.residual_scale = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class LMHead(nn.Linear):
    """The output projection (tied to wte). Padded vocabulary columns never score and are never
    sampled, and the logits are never sliced or copied for the loss:
    - where the padded width is what makes the largest matmul fast (a GPU; a CPU multiplying in bf16,
      whose AMX/AVX-512 kernels want the width in whole tiles), all columns are computed with a
      constant bias of 0 for real tokens and -inf for padded ones, added inside the matmul;
    - on a CPU multiplying in fp32 the width does not matter and adding a bias costs a pass over the
      logits, so only the real rows of the weight (a contiguous slice, no copy) are multiplied.
    Either way the loss over these logits equals the loss over the real vocabulary."""

    def __init__(self, n_embd: int, vocab_size: int, padded_vocab_size: int):
        super().__init__(n_embd, padded_vocab_size, bias=False)
        self.vocab_size = vocab_size
        mask = torch.zeros(padded_vocab_size)
        mask[vocab_size:] = float("-inf")
        self.register_buffer("vocab_mask", mask if padded_vocab_size > vocab_size else None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vocab_mask is None:
            return F.linear(x, self.weight)  # (..., V)
        cpu_fp32 = x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        return self.real_columns(x) if cpu_fp32 else self.masked_columns(x)

    def real_columns(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight[: self.vocab_size])  # (..., V)

    def masked_columns(self, x: torch.Tensor) -> torch.Tensor:
        assert self.vocab_mask is not None
        return F.linear(x, self.weight, self.vocab_mask.to(x.dtype))  # (..., V_padded), padded = -inf


# HF GPT-2 stores these as Conv1D with weight (in, out): transpose on the way in and out.
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.config = cfg
        V = cfg.padded_vocab_size
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(V, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = LMHead(cfg.n_embd, cfg.vocab_size, V)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "residual_scale", False):
                std /= math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, vocab_size), and the mean cross-entropy if targets.

        The logits are never copied: the loss is taken over what the head returns (padded columns, if
        any, are -inf: see LMHead), and the logits returned are a view of the real columns."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)  # (B, T, V), or (B, T, V_padded) with padded columns -inf
        loss = None
        if targets is not None:  # in fp32 (.float() copies only when the logits are bf16)
            loss = F.cross_entropy(logits.view(B * T, -1).float(), targets.reshape(-1))
        return logits[..., : self.config.vocab_size], loss  # a view: (B, T, vocab_size)

    # ---- sizes --------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters as GPT-2 counts them: tied weights once, vocab padding excluded.
        non_embedding=True also leaves out the position embeddings (nanoGPT's N for FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6N + 12*L*H*Q*T (PaLM appendix B, as nanoGPT counts)."""
        c = self.config
        T = seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * T

    # ---- sampling -----------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend idx (B, T) by max_new_tokens sampled tokens; temperature 0 means greedy.
        Raises FloatingPointError when a step's logits (divided by the temperature) are not finite."""
        for i in range(max_new_tokens):
            idx_cond = idx[:, -self.config.block_size :]
            logits, _ = self(idx_cond)
            logits = logits[:, -1, :].double()  # (B, vocab_size); float64: large logits / temperature stay finite
            if temperature > 0:
                logits = logits / temperature
            if not bool(torch.isfinite(logits).all()):  # NaN or inf would sample garbage or fail in multinomial
                raise FloatingPointError(f"the logits for new token {i + 1} are not finite")
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                if top_k is not None and top_k > 0:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = float("-inf")
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
        return idx

    # ---- Hugging Face layout ------------------------------------------------------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """A `transformers.GPT2LMHeadModel` state dict (Conv1D layout, unpadded vocab)."""
        V = self.config.vocab_size
        out: dict[str, torch.Tensor] = {}
        for k, v in self.state_dict().items():
            v = v.detach()
            if k.endswith(_CONV1D):
                v = v.t()
            if k in ("transformer.wte.weight", "lm_head.weight"):
                v = v[:V]
            out[k] = v.contiguous().clone()
        return out

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load a `transformers.GPT2LMHeadModel` state dict (e.g. published GPT-2 weights)."""
        own = self.state_dict()
        sd = {k: v for k, v in sd.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
        if "lm_head.weight" not in sd:
            sd["lm_head.weight"] = sd["transformer.wte.weight"]
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        if missing or unexpected:
            raise ValueError(f"state dict does not match GPT-2 layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for k, v in sd.items():
            if k.endswith(_CONV1D):
                v = v.t()
            target = own[k]
            if k in ("transformer.wte.weight", "lm_head.weight"):
                target = target[: v.shape[0]]
            if target.shape != v.shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(target.shape)}")
            target.copy_(v)
