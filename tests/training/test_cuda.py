"""The trainers on a CUDA device train what they train on the CPU (skipped without CUDA; on a GPU
machine: ``pytest tests/training/test_cuda.py``).

Each case trains the same initial weights on the same float64 batches on both devices and compares
every parameter after the run. Where probes are drawn from the trainer's own device generator (the
single-coder and cross-layer trainers), the Jacobian-matching runs cannot be equal across devices and
are checked for running and lowering the Jacobian error instead; the stack draws its probes on the
CPU, so its Jacobian-matching members are compared exactly too.
"""

from __future__ import annotations

import pytest
import torch

from mechfaith.coders import CoderConfig, SparseCoder
from mechfaith.coders.clt import CrossLayerTranscoder
from mechfaith.coders.clt_config import CLTConfig
from mechfaith.training import TrainConfig, Trainer
from mechfaith.training.clt_trainer import CLTTrainer
from mechfaith.training.stack import CoderStack, StackMember, member_configs
from mechfaith.training.stack_trainer import Resampling, StackTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
D, B = 6, 32


def _mlp(seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.GELU(), torch.nn.Linear(16, D)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return m


def _batches(n: int, mlp: torch.nn.Module, layers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        x = torch.randn((layers, B, D) if layers else (B, D), generator=g, dtype=torch.float64)
        with torch.no_grad():
            out.append((x, mlp(x)))
    return out


def _assert_same(cpu: torch.nn.Module, gpu: torch.nn.Module) -> None:
    for name, p in cpu.named_parameters():
        q = dict(gpu.named_parameters())[name]
        assert q.is_cuda, name
        torch.testing.assert_close(q.detach().cpu(), p.detach(), atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("activation,sparsity", [("relu", "tanh_l1"), ("relu", "l1"), ("topk", "none")])
def test_a_stack_trains_the_same_on_cuda(activation: str, sparsity: str):
    # the ReLU stacks resample dead latents (rows drawn on the CPU); TopK ones do not, since resampled
    # latents drawn from the same row tie exactly and the devices break TopK ties differently
    base = CoderConfig(d_in=D, n_latents=20, kind="transcoder", activation=activation, k=5)
    members = [StackMember(sparsity_coef=1e-2), StackMember(sparsity_coef=1e-1, n_latents=12, k=3),
               StackMember(sparsity_coef=1e-2, jacobian_coef=0.5)]
    mlp = _mlp(1)
    data = _batches(6, mlp)
    runs = []
    for device in ("cpu", "cuda"):
        tcfg = TrainConfig(n_steps=6, lr=1e-2, lr_warmup_steps=2, sparsity=sparsity, sparsity_coef=5e-2,
                           auxk_coef=0.0, log_every=1, device=device)
        stack = CoderStack.initialised(member_configs(base, members), [10, 11, 12]).double()
        tr = StackTrainer(stack, tcfg, members=members, reference=mlp.to(device), progress=False,
                          resampling=Resampling(every=2 if activation == "relu" else 0, dead_rate=0.5))
        assert tr.fit(data).ok and (activation != "relu" or int(tr.n_resampled.sum()) > 0)
        runs.append(stack)
    _assert_same(*runs)


def test_a_coder_trains_the_same_on_cuda_and_jacobian_matching_runs_there():
    mlp = _mlp(2)
    data = _batches(8, mlp)
    runs = []
    for device in ("cpu", "cuda"):
        coder = SparseCoder(CoderConfig(d_in=D, n_latents=24, activation="relu", skip=True),
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        tcfg = TrainConfig(n_steps=8, lr=1e-2, sparsity="tanh_l1", sparsity_coef=1e-2, auxk_coef=0.0, device=device)
        assert Trainer(coder, tcfg, progress=False).fit(data).ok
        runs.append(coder)
    _assert_same(*runs)
    coder = SparseCoder(CoderConfig(d_in=D, n_latents=24, activation="relu"),
                        generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tcfg = TrainConfig(n_steps=60, lr=1e-2, jacobian_coef=1.0, auxk_coef=0.0, log_every=1, device="cuda")
    batches = _batches(60, mlp)
    tr = Trainer(coder, tcfg, reference=mlp.cuda(), progress=False)
    assert tr.fit(batches).ok
    hist = tr.metrics_history
    assert hist[-1]["jacobian_rel"] < hist[0]["jacobian_rel"]


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_a_cross_layer_transcoder_trains_the_same_on_cuda(activation: str):
    mlp = _mlp(4)
    data = _batches(6, mlp, layers=3)
    cfg = CLTConfig(n_layers=3, d_in=D, n_latents=10, activation=activation, k=3, skip=True, init_scale=0.5)
    runs = []
    for device in ("cpu", "cuda"):
        clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        tcfg = TrainConfig(n_steps=6, lr=5e-3, sparsity="none" if activation == "topk" else "tanh_l1",
                           sparsity_coef=1e-2, auxk_coef=0.0, lr_warmup_steps=0, device=device)
        assert CLTTrainer(clt, tcfg, progress=False).fit(data).ok
        runs.append(clt)
    _assert_same(*runs)
    clt = CrossLayerTranscoder(cfg, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tcfg = TrainConfig(n_steps=10, lr=5e-3, sparsity="none", jacobian_coef=0.5, auxk_coef=0.0, log_every=1,
                       device="cuda")
    tr = CLTTrainer(clt, tcfg, references=[mlp.cuda()] * 3, progress=False)
    assert tr.fit(data).ok and all(torch.isfinite(p).all() for p in clt.parameters())
