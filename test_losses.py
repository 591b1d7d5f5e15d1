"""test_losses.py: every loss against a naive loop written from the paper's equation
(values and input gradients), analytic cases, DDP == single process (2-process gloo),
LARS and the lr schedule. CPU only, float64 where the comparison must be tight."""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from simclr import info_nce_loss

# ----------------------------------------------------------------------------- oracles


def naive_info_nce(z1, z2, temperature):
    """SimCLR eq. (1), one anchor at a time, no matrix tricks: for each of the 2N views i,
    l(i) = -log(exp(s(i, p(i))/T) / sum_{k != i} exp(s(i, k)/T)), then the mean."""
    views = [v / v.norm() for v in list(z1) + list(z2)]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        numerator = torch.exp(torch.dot(views[i], views[positive]) / temperature)
        denominator = sum(torch.exp(torch.dot(views[i], views[k]) / temperature) for k in range(2 * n) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n)


def grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*inputs)
    value.backward()
    return value.detach(), [x.grad for x in inputs]


# ----------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("n,d,temperature", [(1, 3, 0.5), (5, 7, 0.1), (8, 16, 0.07)])
def test_info_nce_matches_naive_loop(n, d, temperature):
    g = torch.Generator().manual_seed(n)
    z1, z2 = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    value, (g1, g2) = grads(lambda a, b: info_nce_loss(a, b, temperature), z1, z2)
    ref, (r1, r2) = grads(lambda a, b: naive_info_nce(a, b, temperature), z1, z2)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, r1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-12)


def test_info_nce_fp32_close_to_fp64():
    z1, z2 = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = naive_info_nce(z1, z2, 0.1)
    torch.testing.assert_close(info_nce_loss(z1.float(), z2.float(), 0.1).double(), ref, rtol=1e-5, atol=1e-6)


def test_info_nce_analytic_cases():
    n, t = 6, 0.2
    # All views identical: every logit is 1/T, so l = log(2N - 1) for every anchor.
    same = torch.ones(n, 4, dtype=torch.float64)
    assert math.isclose(info_nce_loss(same, same, t).item(), math.log(2 * n - 1), rel_tol=1e-12)
    # Both views equal, different images orthogonal: positive logit 1/T, 2N - 2 negatives at 0.
    eye = torch.eye(n, dtype=torch.float64)
    expected = -1 / t + math.log(math.exp(1 / t) + 2 * n - 2)
    assert math.isclose(info_nce_loss(eye, eye, t).item(), expected, rel_tol=1e-12)
    # Perfectly aligned views give a lower loss than swapped positives.
    assert info_nce_loss(eye, eye, t) < info_nce_loss(eye, eye.roll(1, 0), t)


def test_info_nce_invariances():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(2, 10, 8, generator=g, dtype=torch.float64)
    base = info_nce_loss(z1, z2, 0.1)
    perm = torch.randperm(10, generator=g)
    torch.testing.assert_close(info_nce_loss(z1[perm], z2[perm], 0.1), base)  # order of images
    torch.testing.assert_close(info_nce_loss(z2, z1, 0.1), base)  # order of views
    scale = torch.rand(10, 1, generator=g, dtype=torch.float64) + 0.1
    torch.testing.assert_close(info_nce_loss(z1 * scale, z2 * 3, 0.1), base)  # normalisation
    # ...and it is not invariant to breaking the pairing.
    assert not torch.allclose(info_nce_loss(z1, z2[perm], 0.1), base)


def test_info_nce_accepts_chunk_size():
    # Only that the argument is accepted: the chunked path (a later issue) is not written yet.
    z1, z2 = torch.randn(2, 9, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(info_nce_loss(z1, z2, 0.1, chunk_size=4), info_nce_loss(z1, z2, 0.1))


# ----------------------------------------------------------------------------- DDP == one process


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(r, w, port, z1, z2, temperature, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=w)
    try:
        b = z1.shape[0] // w
        value, (g1, g2) = grads(lambda a, c: info_nce_loss(a, c, temperature),
                                z1[r * b:(r + 1) * b], z2[r * b:(r + 1) * b])
        torch.save(dict(loss=value, g1=g1, g2=g2), os.path.join(out, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2])
def test_info_nce_ddp_equals_single_process(tmp_path, world_size):
    """With W ranks each holding B of the W*B images, the mean of the rank losses is the
    single-process loss of the global batch, and rank r's input gradient / W is the
    single-process gradient of its slice. Fails if gather_with_grad drops the gradient
    that flows through other ranks' negatives."""
    torch.manual_seed(0)
    b, t = 4, 0.1
    z1, z2 = (torch.randn(world_size * b, 16, dtype=torch.float64) for _ in range(2))  # separate storages: old torch cannot pass one storage twice to mp.spawn
    mp.spawn(_ddp_worker, args=(world_size, free_port(), z1, z2, t, str(tmp_path)), nprocs=world_size)
    ref, (r1, r2) = grads(lambda a, c: info_nce_loss(a, c, t), z1, z2)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    torch.testing.assert_close(sum(p["loss"] for p in parts) / world_size, ref, rtol=1e-12, atol=1e-12)
    for r, p in enumerate(parts):
        torch.testing.assert_close(p["g1"] / world_size, r1[r * b:(r + 1) * b], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p["g2"] / world_size, r2[r * b:(r + 1) * b], rtol=1e-10, atol=1e-12)


def test_gather_with_grad_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert common.gather_with_grad(x) is x


# ----------------------------------------------------------------------------- LARS and schedule


def test_lars_1d_parameters_get_plain_sgd_momentum():
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    bias_ref = torch.nn.Parameter(bias.detach().clone())
    lars = common.LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9)
    sgd = torch.optim.SGD([bias_ref], lr=0.5, momentum=0.9)
    w0 = weight.detach().clone()
    for step in range(4):
        g = torch.randn(4)
        bias.grad, bias_ref.grad = g.clone(), g.clone()
        weight.grad = torch.randn(4, 3)
        if step == 0:
            g_w = weight.grad.clone()
        lars.step()
        sgd.step()
        if step == 0:
            # First step of a >1-D weight, from the LARS paper: the momentum buffer is the
            # decayed gradient scaled by the trust ratio eta ||w|| / ||g + wd w||.
            d = g_w + 0.1 * w0
            expected = w0 - 0.5 * 0.001 * w0.norm() / d.norm() * d
            torch.testing.assert_close(weight.detach(), expected)
        assert torch.equal(bias.detach(), bias_ref.detach())  # bit-identical to SGD


def test_lr_schedule():
    base, total, warmup = 2.0, 1000, 100
    lrs = [common.lr_at(s, total, warmup, base) for s in range(total)]
    assert lrs[0] == base / warmup
    assert lrs[warmup - 1] == base and lrs[warmup] == base  # end of warmup: the peak
    assert 0 < lrs[-1] < base * (math.pi / (total - warmup)) ** 2  # last step: nearly zero
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert common.lr_at(0, 10, 0, base) == base  # no warmup: start at the peak


def test_sqrt_and_linear_lr_scaling():
    class A:
        lr, batch = None, 256
    A.lr_scaling = "sqrt"
    assert math.isclose(common.scale_lr(A), 0.075 * 16)
    A.lr_scaling = "linear"
    assert math.isclose(common.scale_lr(A), 0.3)
