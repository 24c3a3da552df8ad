"""The CUDA paths a CPU run cannot reach (issue 12): bf16 autocast, fused AdamW, torch.compile,
the flash kernel, FSDP2 mixed precision with DCP, DeepSpeed ZeRO-2 in bf16, export of a
GPU-trained checkpoint on a CPU, and parity with Hugging Face's GPT-2 on the device.

Every test is marked `gpu` and skips without CUDA, so CPU CI is unchanged. `make gpu-check`
(bench/gpu_check.py) runs them on a borrowed GPU machine: `pytest -m gpu tests/test_gpu.py`.
The backends train inside one process group of world size 1 (nccl), made as gpt2.distributed
makes it for a single process, so they run exactly as `python main.py` runs them. The model is
the `tiny` preset with 2 layers and GPT-2's real vocabulary (padded, so the GPU's masked head runs).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2 import distributed
from gpt2.backends import make_backend
from gpt2.backends.base import Backend, make_adamw, param_groups
from gpt2.checkpoint.manager import CheckpointManager
from gpt2.compose import load_config
from gpt2.config import CheckpointSettings, Config, TrainerSettings, compat_view, to_dict
from gpt2.distributed import DistInfo
from gpt2.model import GPT, GPT2Config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL = ["model=tiny", "model.config.n_layer=2"]  # 4 heads of 32, block 256, vocab 50257 (padded to 50304)
B, T, LR = 4, 256, 1e-3
CUDA = torch.device("cuda", 0)


def tiny_config() -> Config:
    return load_config([*MODEL, "run.device=cuda", "wandb.mode=disabled"])


def tiny(seed: int = 0, **changes: object) -> GPT:
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(GPT2Config(**dataclasses.asdict(tiny_config().model.config)), **changes))


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 50257, (B, T + 1), generator=g)
    return toks[:, :-1].to(CUDA), toks[:, 1:].to(CUDA)


def train(backend: Backend, n: int, seed: int = 1) -> list[float]:
    """`n` optimizer steps on one fixed batch (it should be learnt: the loss falls)."""
    x, y = batch(seed)
    losses = []
    for _ in range(n):
        losses.append(backend.forward_backward(x, y, last_micro=True).item())
        backend.optimizer_step(LR)
    return losses


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def dist() -> Iterator[DistInfo]:
    """One rank, nccl: what `python main.py` on one GPU makes (no launcher variables)."""
    saved = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
             if k in os.environ}
    info = distributed.init("cuda")
    assert torch.distributed.get_backend() == "nccl"
    yield info
    distributed.destroy()
    os.environ.update(saved)


def settings(**kw: object) -> TrainerSettings:
    return TrainerSettings(batch_size=B, lr=LR, warmup_steps=1, use_mixed_precision=True, **kw)


# ---- numerics --------------------------------------------------------------------------------------
def test_bf16_autocast_computes_in_bf16_and_takes_the_loss_in_fp32() -> None:
    model = tiny().to(CUDA)
    x, y = batch()
    with torch.no_grad():
        _, ref = model(x, y)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits, loss = model(x, y)
    assert logits.dtype == torch.bfloat16 and loss is not None and loss.dtype == torch.float32
    assert ref is not None and 0 < rel(loss.item(), ref.item()) < 2e-2  # bf16 was used, and is close
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fused_adamw_is_fused_and_steps_as_the_plain_one_does() -> None:
    s = settings()
    model = tiny().to(CUDA)
    twin = copy.deepcopy(model)
    fused = make_adamw(model, s, CUDA)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW(param_groups(twin, s.weight_decay), lr=s.lr, betas=(s.beta1, s.beta2), eps=1e-8,
                              fused=False, foreach=False)
    x, y = batch()
    for _ in range(3):
        for m, opt in ((model, fused), (twin, plain)):
            _, loss = m(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), tiny().to(CUDA).parameters()))
    assert moved > 1e-3  # the steps did something
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def _sdpa_ops(fn: Callable[[], None]) -> set[str]:
    """The scaled-dot-product-attention kernels (aten ops) that `fn()` dispatched to."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if "scaled_dot_product" in e.name and e.name.startswith("aten::_")}


def test_flash_kernel_runs_agrees_with_the_math_kernel_and_is_the_one_chosen() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(2, 12, 1024, 64, device=CUDA, dtype=torch.bfloat16, generator=g) for _ in range(3))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # raises if flash cannot run these inputs
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_kernel([SDPBackend.MATH]):
        math = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
    torch.testing.assert_close(flash.float(), math, rtol=2e-2, atol=2e-2)

    # the model under bf16 autocast, SDPA left to choose: flash is what it picks, and it agrees with
    # the explicit masked softmax (flash=false) computed in fp32
    model = tiny().to(CUDA).eval()
    explicit = tiny(flash=False).to(CUDA).eval()
    x, _ = batch()
    out: dict[str, torch.Tensor] = {}

    def forward() -> None:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            out["logits"] = model(x)[0]

    ops = _sdpa_ops(forward)
    with torch.no_grad():
        ref = explicit(x)[0]
    assert ops == {"aten::_scaled_dot_product_flash_attention"}, f"SDPA chose {sorted(ops)}"
    torch.testing.assert_close(out["logits"].float(), ref, rtol=5e-2, atol=5e-2)


# ---- the backends, for real on the GPU ---------------------------------------------------------------
def test_compile_trains_as_eager_does(dist: DistInfo) -> None:
    eager = make_backend("ddp", settings(compile=False), dist)
    eager.setup(tiny())
    compiled = make_backend("ddp", settings(compile=True), dist)
    compiled.setup(tiny())
    assert isinstance(compiled.model.module, torch._dynamo.eval_frame.OptimizedModule)  # type: ignore[union-attr]
    want, got = train(eager, 5), train(compiled, 5)
    assert got[-1] < got[0] - 0.5, got  # it learns the batch
    assert max(rel(a, b) for a, b in zip(got, want)) < 2e-2, (got, want)  # bf16 + fusion: close, not equal


def test_fsdp2_mixed_precision_trains_and_its_dcp_checkpoint_continues(dist: DistInfo, tmp_path: Path) -> None:
    from torch.distributed.tensor import DTensor

    backend = make_backend("fsdp", settings(), dist)
    backend.setup(tiny())
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    attn = backend.raw_model.transformer.h[0].attn.c_attn  # type: ignore[union-attr]
    attn.register_forward_pre_hook(lambda m, args: seen.append((m.weight.dtype, args[0].dtype)))
    first = train(backend, 3)
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}  # unsharded params and compute in bf16
    params = list(backend.raw_model.parameters())  # type: ignore[union-attr]
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 and p.device.type == "cuda" for p in params)
    backend.save(tmp_path)
    assert (tmp_path / "dcp" / ".metadata").is_file()
    after = train(backend, 3)
    assert after[-1] < first[0] - 0.5, (first, after)

    fresh = make_backend("fsdp", settings(), dist)
    fresh.setup(tiny(seed=7))  # other weights: only the checkpoint can make it continue alike
    fresh.load(tmp_path)
    again = train(fresh, 3)
    assert max(rel(a, b) for a, b in zip(again, after)) < 1e-3, (again, after)


def test_deepspeed_zero2_bf16_trains_and_its_checkpoint_continues(dist: DistInfo, tmp_path: Path) -> None:
    s = settings(deepspeed_config="deepspeed_configs/zero2.json")
    backend = make_backend("deepspeed", s, dist)
    backend.setup(tiny())
    engine = backend.engine  # type: ignore[attr-defined]
    assert engine.zero_optimization_stage() == 2 and engine.bfloat16_enabled()
    assert next(backend.raw_model.parameters()).dtype == torch.bfloat16  # type: ignore[union-attr]
    first = train(backend, 3)
    backend.save(tmp_path)
    after = train(backend, 3)
    assert after[-1] < first[0] - 0.5, (first, after)
    full = backend.full_state_dict()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in full.values())  # the fp32 masters

    fresh = make_backend("deepspeed", s, dist)
    fresh.setup(tiny(seed=7))
    fresh.load(tmp_path)
    again = train(fresh, 3)
    assert max(rel(a, b) for a, b in zip(again, after)) < 1e-3, (again, after)


def test_an_asynchronous_save_stages_into_pinned_memory_and_commits_what_it_staged(dist: DistInfo,
                                                                                  tmp_path: Path) -> None:
    """The CUDA path of gpt2/checkpoint/writer.HostStager: the state is copied on a side stream into
    pinned host buffers while the next steps train; the committed files hold the state of the
    saved step, not of the steps that ran during the write."""
    from gpt2.checkpoint.files import verify

    backend = make_backend("ddp", settings(), dist)
    backend.setup(tiny())
    train(backend, 2)
    want = {k: v.detach().to("cpu", copy=True) for k, v in backend.raw_model.state_dict().items()}
    mgr = CheckpointManager(tmp_path / "ck", CheckpointSettings(), dist)
    final = mgr.save(2, backend, meta={"config": {}}, trainer_state={"step": 2, "tokens": 0, "data": {}},
                     background=True)
    buffers = list(backend.stager._buffers.values())
    assert buffers and all(b.is_pinned() and b.device.type == "cpu" for b in buffers)
    train(backend, 2)  # its optimizer steps wait for the copies (fence), then change the weights
    mgr.wait()
    assert verify(final) is None
    saved = torch.load(final / "model.pt", map_location="cpu", weights_only=True)
    assert saved.keys() == want.keys() and all(torch.equal(saved[k], want[k]) for k in want)
    now = backend.raw_model.state_dict()
    assert any(not torch.equal(now[k].cpu(), want[k]) for k in want)  # training did go on
    mgr.close()


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_a_gpu_trained_checkpoint_exports_and_loads_on_a_cpu(name: str, dist: DistInfo, tmp_path: Path) -> None:
    """Trained in bf16 on the GPU, committed as training commits it; `python -m gpt2.export` in a process
    that sees no GPU writes a Hugging Face model whose CPU logits are the GPU model's fp32 logits."""
    from transformers import GPT2LMHeadModel

    cfg = tiny_config()
    backend = make_backend(name, settings(), dist)
    backend.setup(tiny())
    train(backend, 3)
    run = tmp_path / "run"
    mgr = CheckpointManager(run / "checkpoints", CheckpointSettings(), dist)
    mgr.save(3, backend, meta={"config": compat_view(cfg), "resolved_config": to_dict(cfg), "wandb_id": None},
             trainer_state={"step": 3, "tokens": 0, "data": {}})
    full = backend.full_state_dict()  # collective under FSDP: before the export, on every rank

    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "gpt2.export", str(run), "--out", str(tmp_path / "hf")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

    model = tiny()  # the trained weights, fp32, on the GPU
    model.load_state_dict({k: v.float() for k, v in full.items()})
    model = model.to(CUDA).eval()
    x, _ = batch(seed=3)
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    assert next(hf.parameters()).device.type == "cpu" and next(hf.parameters()).dtype == torch.float32
    with torch.no_grad():
        ours = model(x)[0].cpu()
        theirs = hf(x.cpu()).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


def test_logits_match_transformers_gpt2_124m_on_the_device() -> None:
    """GPT-2 124M's shape (random weights, nothing downloads): ours and transformers' on the GPU, fp32."""
    import transformers

    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_head=12, n_embd=768, n_positions=1024,
                                                              vocab_size=50257)).to(CUDA).eval()
    ours = GPT(GPT2Config())
    ours.load_hf_state_dict(hf.state_dict())
    ours = ours.to(CUDA).eval()
    x = torch.randint(0, 50257, (2, 1024), generator=torch.Generator().manual_seed(0)).to(CUDA)
    with torch.no_grad():
        expected = hf(x, labels=x)
        logits, loss = ours(x[:, :-1], x[:, 1:])
        torch.testing.assert_close(ours(x)[0], expected.logits, rtol=1e-3, atol=1e-3)
    assert loss is not None and abs(loss.item() - expected.loss.item()) < 1e-4
    assert logits.shape == (2, 1023, 50257)
