"""The selective SSM: chunked parallel scan equals the sequential recurrence; layers are causal and trainable."""

import pytest
import torch

from models.common import ssm as ssm_module
from models.common.errors import ModelError
from models.common.ssm import SSMConfig, SSMEncoder, SelectiveSSM, chunked_scan, sequential_scan


def random_inputs(T, B=2, H=3, P=4, N=5, seed=0, strong_decay=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, H, P, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, T, H, generator=g) - 1.0)
    A = -(torch.rand(H, generator=g) * (16.0 if strong_decay else 1.0) + 0.05)
    Bm, C = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    return x, dt, A, Bm, C, torch.randn(B, H, P, N, generator=g)


@pytest.mark.parametrize("T, chunk", [(64, 16), (50, 16), (7, 16), (300, 64), (256, 256)])
@pytest.mark.parametrize("strong_decay", [False, True])
def test_chunked_scan_equals_sequential(T, chunk, strong_decay):
    x, dt, A, Bm, C, s0 = random_inputs(T, strong_decay=strong_decay)
    y_par, s_par = chunked_scan(x, dt, A, Bm, C, chunk, s0)
    y_seq, s_seq = sequential_scan(x, dt, A, Bm, C, s0)
    assert ((y_par - y_seq).norm() / y_seq.norm()).item() <= 1e-4
    assert ((s_par - s_seq).norm() / s_seq.norm()).item() <= 1e-4


def test_long_sequence_with_large_cumulative_decay_stays_accurate():
    # cumulative log-decay reaches thousands: a cumsum-difference formulation loses precision here
    x, dt, A, Bm, C, s0 = random_inputs(1024, B=1, strong_decay=True, seed=3)
    y_par, _ = chunked_scan(x, dt, A, Bm, C, 64, s0)
    y_seq, _ = sequential_scan(x, dt, A, Bm, C, s0)
    assert ((y_par - y_seq).norm() / y_seq.norm()).item() <= 1e-4


def test_scan_gradients_match():
    x, dt, A, Bm, C, _ = random_inputs(40)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    dt1, dt2 = dt.clone().requires_grad_(True), dt.clone().requires_grad_(True)
    chunked_scan(x1, dt1, A, Bm, C, 16)[0].square().sum().backward()
    sequential_scan(x2, dt2, A, Bm, C)[0].square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dt1.grad, dt2.grad, atol=1e-4, rtol=1e-4)


def test_selective_ssm_is_causal_and_trains():
    torch.manual_seed(0)
    layer = SelectiveSSM(SSMConfig(d_model=16, d_state=4, head_dim=8, chunk_size=8))
    u = torch.randn(2, 24, 16)
    changed = u.clone()
    changed[:, 16:] += 1.0
    torch.testing.assert_close(layer(u)[:, :16], layer(changed)[:, :16])
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    target = torch.roll(u, 1, dims=1)
    losses = []
    for _ in range(8):
        loss = (layer(u) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_encoder_runs_under_bf16_autocast():
    enc = SSMEncoder(SSMConfig(d_model=16, d_state=4, head_dim=8, n_layers=2, chunk_size=8))
    x = torch.randn(2, 12, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        summary = enc.summarize(x, torch.ones(2, 12, dtype=torch.bool))
    summary.float().sum().backward()
    assert summary.shape == (2, 16) and torch.isfinite(x.grad).all()


def test_kernel_is_only_used_for_cuda_inputs(monkeypatch):
    # with mamba-ssm installed, a CPU tensor must still take the pure-PyTorch scan (the kernel is CUDA-only)
    def kernel(*args, **kwargs):
        raise AssertionError("the fused kernel was called for a CPU tensor")

    monkeypatch.setattr(ssm_module, "mamba_chunk_scan_combined", kernel)
    layer = SelectiveSSM(SSMConfig(d_model=16, d_state=4, head_dim=8, use_kernels=True))
    assert layer(torch.randn(1, 5, 16)).shape == (1, 5, 16)


@pytest.mark.parametrize("overrides, match", [
    (dict(head_dim=48), "divisible"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_config_is_refused(overrides, match):
    with pytest.raises(ModelError, match=match):
        SSMConfig(d_model=32, **overrides)


def test_encoder_refuses_wrong_width():
    enc = SSMEncoder(SSMConfig(d_model=16, d_state=4, head_dim=8, n_layers=1))
    with pytest.raises(ModelError, match="16"):
        enc(torch.randn(1, 4, 12))
