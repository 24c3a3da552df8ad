"""GPT-2 model: causality, attention paths, sizes, vocab padding, HF parity, sampling, training."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from gpt2.model import GPT, GPT2Config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))

# Hugging Face's GPT2LMHeadModel counts (tied head counted once), vocab 50257.
HF_PARAM_COUNTS = {
    "gpt2_124m": 124_439_808,
    "gpt2_350m": 354_823_168,
    "gpt2_774m": 774_030_080,
    "gpt2_1558m": 1_557_611_200,
}


def tiny(**kw: object) -> GPT2Config:
    """A 2-layer model small enough for tests; vocab 97 pads to 128 (pad_vocab_to=64)."""
    base: dict[str, object] = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97)
    base.update(kw)
    return GPT2Config(**base)  # type: ignore[arg-type]


def build(cfg: GPT2Config, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def preset(name: str) -> GPT2Config:
    return GPT2Config(**yaml.safe_load((CONFIGS / "model" / f"{name}.yaml").read_text())["config"])


def gpt2_count(c: GPT2Config) -> int:
    """GPT-2's parameter count from its shape: embeddings, 12C^2+13C per block, final LayerNorm."""
    C = c.n_embd
    return c.vocab_size * C + c.block_size * C + c.n_layer * (12 * C * C + 13 * C) + 2 * C


# ---- attention --------------------------------------------------------------------------


@pytest.mark.parametrize("flash", [True, False])
def test_causal(flash: bool) -> None:
    model = build(tiny(flash=flash))
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 97, (2, 12), generator=g)
    t = 5
    changed = idx.clone()
    changed[:, t + 1] = (idx[:, t + 1] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=0)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the change is visible later


def test_flash_equals_explicit_attention() -> None:
    flash = build(tiny(flash=True, n_head=4))
    explicit = GPT(tiny(flash=False, n_head=4)).eval()
    explicit.load_state_dict(flash.state_dict())
    idx = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(2))
    a, la = flash(idx, idx)
    b, lb = explicit(idx, idx)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert la is not None and lb is not None
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)


def test_sequence_longer_than_block_is_rejected() -> None:
    model = build(tiny())
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ---- sizes ------------------------------------------------------------------------------


def test_every_preset_is_counted() -> None:
    assert set(HF_PARAM_COUNTS) | {"tiny"} == set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parameter_count(name: str) -> None:
    cfg = preset(name)
    with torch.device("meta"):  # shapes only: 1.5B parameters cost no memory here
        model = GPT(cfg)
    n = model.num_params()
    assert n == gpt2_count(cfg)
    if name in HF_PARAM_COUNTS:
        assert n == HF_PARAM_COUNTS[name]
    assert model.num_params(non_embedding=True) == n - cfg.block_size * cfg.n_embd
    # The padded embedding is really there, but not counted.
    assert model.transformer.wte.weight.shape[0] == cfg.padded_vocab_size
    assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size >= cfg.vocab_size


@pytest.mark.parametrize("name", ["gpt2_124m", "gpt2_1558m"])
def test_preset_count_matches_transformers(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    c = preset(name)
    hf_cfg = transformers.GPT2Config(
        n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, n_positions=c.block_size, vocab_size=c.vocab_size
    )
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_cfg)
        ours = GPT(c)
    assert ours.num_params() == sum(p.numel() for p in hf.parameters()) == HF_PARAM_COUNTS[name]


def test_flops_per_token() -> None:
    cfg = preset("gpt2_124m")
    with torch.device("meta"):
        model = GPT(cfg)
    n = 124_439_808 - 1024 * 768  # non-embedding N, nanoGPT's way: wte stays in (it is the head)
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024 == 855_166_464
    assert model.flops_per_token() == model.flops_per_token(1024)  # default: block_size
    assert model.flops_per_token(256) == 6 * n + 12 * 12 * 768 * 256


# ---- vocab padding ----------------------------------------------------------------------


def test_padding_changes_neither_count_nor_logits() -> None:
    plain = build(tiny(pad_vocab_to=1), seed=3)
    padded = GPT(tiny(pad_vocab_to=64)).eval()
    assert plain.transformer.wte.weight.shape[0] == 97
    assert padded.transformer.wte.weight.shape[0] == 128
    assert plain.num_params() == padded.num_params() == gpt2_count(tiny())
    padded.load_hf_state_dict(plain.hf_state_dict())
    idx = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(4))
    a, la = plain(idx, idx)
    b, lb = padded(idx, idx)
    assert a.shape == b.shape == (2, 16, 97)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert la is not None and lb is not None
    torch.testing.assert_close(la, lb)


def test_both_heads_score_only_real_columns() -> None:
    """The GPU head (all padded columns, -inf bias) and the CPU head (real rows only) give the same
    loss and gradients, even when the padded rows would outscore every real token."""
    model = build(tiny())
    head = model.lm_head
    with torch.no_grad():
        head.weight[97:] = 50.0  # padded rows that would dominate any softmax they took part in
    x = torch.randn(3, 5, model.config.n_embd, generator=torch.Generator().manual_seed(6))
    y = torch.randint(0, 97, (15,), generator=torch.Generator().manual_seed(7))
    masked, real = head.masked_columns(x), head.real_columns(x)
    assert masked.shape[-1] == 128 and real.shape[-1] == 97
    assert torch.isneginf(masked[..., 97:]).all()
    torch.testing.assert_close(masked[..., :97], real)
    losses, grads = [], []
    for logits in (head.masked_columns(x), head.real_columns(x)):
        loss = F.cross_entropy(logits.reshape(15, -1), y)
        (g,) = torch.autograd.grad(loss, head.weight)
        losses.append(loss)
        grads.append(g)
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1])
    assert not grads[0][97:].any()  # padded rows never learn from the head


def test_the_cpu_head_multiplies_the_real_rows_in_fp32_and_the_padded_width_in_bf16() -> None:
    """On a CPU an fp32 matmul is as fast at any width (the head skips the padded rows), but a bf16
    one (autocast, or bf16 weights) runs in whole AMX/AVX-512 tiles: the padded width is faster there
    (one profile of bench_model's bf16 step: its matmuls 0.29 s -> 0.19 s), as on a GPU."""
    model = build(tiny())
    x = torch.randn(2, 3, model.config.n_embd)
    assert model.lm_head(x).shape[-1] == 97
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.lm_head(x).shape[-1] == 128
    assert model.lm_head.to(torch.bfloat16)(x.bfloat16()).shape[-1] == 128


def test_padded_rows_are_never_sampled() -> None:
    model = build(tiny())
    with torch.no_grad():
        # Make every padded row outscore every real token by far: the final hidden state is
        # the constant ln_f.bias, and only padded rows of the (tied) head align with it.
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.wte.weight[:97] = 0.0
        model.transformer.wte.weight[97:] = 10.0
    logits, _ = model(torch.zeros(1, 4, dtype=torch.long))
    assert logits.shape[-1] == 97
    g = torch.Generator().manual_seed(5)
    out = model.generate(torch.zeros(64, 1, dtype=torch.long), max_new_tokens=8, temperature=2.0, generator=g)
    assert int(out.max()) < 97
    greedy = model.generate(torch.zeros(2, 1, dtype=torch.long), max_new_tokens=3, temperature=0)
    assert int(greedy.max()) < 97


# ---- Hugging Face parity ----------------------------------------------------------------


def _hf_model(cfg: GPT2Config, seed: int):  # -> transformers.GPT2LMHeadModel
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(hf_cfg).eval()


def _hf_cfg() -> GPT2Config:
    # GPT-2's real vocab (50257 pads to 50304), so the padding path is exercised.
    return GPT2Config(n_layer=2, n_head=4, n_embd=32, block_size=32, vocab_size=50257, pad_vocab_to=64)


def test_logits_parity_hf_to_ours() -> None:
    cfg = _hf_cfg()
    hf = _hf_model(cfg, seed=10)
    ours = build(cfg, seed=11)
    ours.load_hf_state_dict(hf.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = hf(idx).logits
        got, loss = ours(idx[:, :-1], idx[:, 1:])
        full, _ = ours(idx)
        hf_loss = hf(idx, labels=idx).loss  # HF shifts the labels itself
    assert full.shape == expected.shape == (2, 32, 50257)
    assert (full - expected).abs().max().item() <= 1e-4
    assert loss is not None and abs(loss.item() - hf_loss.item()) <= 1e-4


def test_logits_parity_ours_to_hf() -> None:
    cfg = _hf_cfg()
    ours = build(cfg, seed=12)
    hf = _hf_model(cfg, seed=13)
    sd = ours.hf_state_dict()
    assert sd["transformer.wte.weight"].shape == (50257, 32)
    hf.load_state_dict(sd, strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        got, _ = ours(idx)
        expected = hf(idx).logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_load_hf_state_dict_rejects_wrong_layout() -> None:
    ours = build(tiny())
    sd = ours.hf_state_dict()
    del sd["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="ln_f.bias"):
        ours.load_hf_state_dict(sd)
    wide = build(tiny(n_embd=64)).hf_state_dict()
    with pytest.raises(ValueError, match="shape"):
        ours.load_hf_state_dict(wide)


# ---- sampling ---------------------------------------------------------------------------


def test_generate_length_and_crop() -> None:
    model = build(tiny())
    idx = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(8))
    out = model.generate(idx, max_new_tokens=12, temperature=0.8, top_k=5, generator=torch.Generator())
    assert out.shape == (3, 22)  # longer than block_size 16: the context is cropped, not refused
    assert torch.equal(out[:, :10], idx)


def test_top_k_1_is_greedy() -> None:
    model = build(tiny())
    idx = torch.randint(0, 97, (4, 3), generator=torch.Generator().manual_seed(9))
    greedy = model.generate(idx, max_new_tokens=6, temperature=0)
    g = torch.Generator().manual_seed(0)
    top1 = model.generate(idx, max_new_tokens=6, temperature=1.5, top_k=1, generator=g)
    assert torch.equal(greedy, top1)
    # greedy really takes the argmax
    logits, _ = model(idx)
    assert torch.equal(greedy[:, 3], logits[:, -1].argmax(-1))


def test_top_k_samples_only_the_top_k_and_seeds_repeat() -> None:
    model = build(tiny())
    prompt = torch.full((256, 2), 7, dtype=torch.long)
    logits, _ = model(prompt[:1])
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    out = model.generate(prompt, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(1))
    drawn = set(out[:, -1].tolist())
    assert drawn <= allowed and len(drawn) > 1  # hot temperature: more than the argmax, never outside
    again = model.generate(prompt, 1, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


# ---- init and training ------------------------------------------------------------------


def test_gpt2_init_and_tied_head() -> None:
    cfg = GPT2Config(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000)
    model = build(cfg, seed=14)
    assert model.lm_head.weight is model.transformer.wte.weight
    resid = 0.02 / math.sqrt(2 * cfg.n_layer)
    for block in model.transformer.h:
        assert block.attn.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert block.mlp.c_proj.weight.std().item() == pytest.approx(resid, rel=0.05)
        assert block.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.attn.c_attn.bias.abs().max().item() == 0.0
        assert torch.equal(block.ln_1.weight, torch.ones(256))
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wpe.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # A fresh model predicts nearly uniformly: loss close to ln(vocab) on unrelated targets.
    g = torch.Generator().manual_seed(16)
    idx, targets = torch.randint(0, 1000, (2, 2, 64), generator=g)
    _, loss = model(idx, targets)
    assert loss is not None and abs(loss.item() - math.log(1000)) < 0.1


def test_tied_weights_share_gradient() -> None:
    model = build(tiny())
    idx = torch.randint(0, 97, (2, 8))
    _, loss = model(idx, idx)
    assert loss is not None
    loss.backward()
    assert model.lm_head.weight.grad is model.transformer.wte.weight.grad
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls run faster on one thread, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_overfits_one_batch(one_thread: None) -> None:
    torch.manual_seed(0)
    model = GPT(GPT2Config(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=97)).train()
    x = torch.randint(0, 97, (4, 33), generator=torch.Generator().manual_seed(15))
    idx, targets = x[:, :-1], x[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(40):
        _, loss = model(idx, targets)
        assert loss is not None
        first = loss.item() if first is None else first
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first is not None and abs(first - math.log(97)) < 0.3
    with torch.no_grad():
        logits, final = model.eval()(idx, targets)
    assert final is not None and final.item() < 0.5
    torch.testing.assert_close(final, F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1)))
