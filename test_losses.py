"""test_losses.py: every loss against a naive loop written from the paper's equation
(values and input gradients), analytic cases, DDP == single process (2-process gloo),
SogCLR's u, LARS and the lr schedule, and the batched augmentation against torchvision
(the same pixels for the same parameters; the same parameter distributions). CPU only,
float64 where comparisons must be tight."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common
from dcl import dcl_loss
from flatnce import flatnce_loss
from polyview import OBJECTIVES, polyview_loss
import simclr  # LARS and the schedule: simclr.py's copies are the same in every method file
from simclr import info_nce_loss
from sogclr import SogCLRLoss

HERE = os.path.dirname(os.path.abspath(__file__))

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
        denominator = sum(torch.exp(torch.dot(views[i], views[k]) / temperature)
                          for k in range(2 * n) if k != i)
        total = total - torch.log(numerator / denominator)
    return total / (2 * n)


def naive_dcl(z1, z2, temperature, sigma=None):
    """DCL (Yeh et al. eq. 6): for each of the 2N views i of image m, other view o,
    l(i) = -w_m s(i, o)/T + log sum over both views k of every other image of exp(s(i, k)/T);
    w = 1, or DCLW's detached w_m = 2 - exp(s(m1, m2)/sigma) / mean_j exp(s(j1, j2)/sigma)."""
    views = [v / v.norm() for v in list(z1) + list(z2)]
    n = len(z1)
    w = [1.0] * n
    if sigma is not None:
        e = [torch.exp(torch.dot(views[m], views[m + n]).detach() / sigma) for m in range(n)]
        w = [2 - e[m] / (sum(e) / n) for m in range(n)]
    total = 0.0
    for i in range(2 * n):
        m, other = i % n, (i + n) % (2 * n)
        negatives = sum(torch.exp(torch.dot(views[i], views[k]) / temperature)
                        for k in range(2 * n) if k % n != m)
        total = (total - w[m] * torch.dot(views[i], views[other]) / temperature
                 + torch.log(negatives))
    return total / (2 * n)


def naive_sogclr(z1, z2, index, u, temperature, gamma):
    """SogCLR (Yuan et al. Algorithm 1) one anchor at a time. Returns the surrogate whose
    gradient is the paper's formula, the logged value, and the updated u (a copy)."""
    views = [v / v.norm() for v in list(z1) + list(z2)]
    n = len(z1)
    u = u.clone()
    surrogate, value, new = 0.0, 0.0, {}
    for i in range(2 * n):
        m, other = i % n, (i + n) % (2 * n)
        terms = [torch.exp(torch.dot(views[i], views[k]) / temperature)
                 for k in range(2 * n) if k % n != m]
        g = sum(terms) / len(terms)  # mean over N_i
        u_i = u[index[m]].item()
        rate = 1.0 if u_i == 0 else gamma
        u_new = (1 - rate) * u_i + rate * g.item()
        positive = torch.dot(views[i], views[other]) / temperature
        surrogate = surrogate - positive + g / u_new
        value = value - positive.item() + math.log(u_new)
        new.setdefault(int(index[m]), []).append(u_new)
    for k, v in new.items():
        u[k] = sum(v) / 2
    return surrogate / (2 * n), value / (2 * n), u


def grads(fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    value = fn(*inputs)
    value.backward()
    return value.detach(), [x.grad for x in inputs]


# ----------------------------------------------------------------------------- InfoNCE


@pytest.mark.parametrize("n,d,temperature", [(1, 3, 0.5), (5, 7, 0.1), (8, 16, 0.07)])
def test_info_nce_matches_naive_loop(n, d, temperature):
    g = torch.Generator().manual_seed(n)
    z1, z2 = (torch.randn(n, d, generator=g, dtype=torch.float64),
              torch.randn(n, d, generator=g, dtype=torch.float64))
    value, (g1, g2) = grads(lambda a, b: info_nce_loss(a, b, temperature), z1, z2)
    ref, (r1, r2) = grads(lambda a, b: naive_info_nce(a, b, temperature), z1, z2)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, r1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-12)


def test_info_nce_at_train_steps_scale_is_google_research_simclr():
    """2 x info_nce_loss, what simclr.train_step differentiates, equals google-research/simclr's
    objective in value and gradient: for each direction (view 1 anchors against view 2 + the
    other view-1 images, and back) the batch mean of the cross-entropy, the two summed."""
    g = torch.Generator().manual_seed(2)
    z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64),
              torch.randn(6, 5, generator=g, dtype=torch.float64))

    def reference(a, b, t=0.2):
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        n, masked = len(a), -1e9 * torch.eye(len(a), dtype=a.dtype)
        labels = torch.arange(n)
        ce = torch.nn.functional.cross_entropy
        # logits_ab, logits_aa
        loss_a = ce(torch.cat([a @ b.T / t, a @ a.T / t + masked], 1), labels)
        loss_b = ce(torch.cat([b @ a.T / t, b @ b.T / t + masked], 1), labels)
        return loss_a + loss_b

    value, (g1, g2) = grads(lambda a, b: 2 * info_nce_loss(a, b, 0.2), z1, z2)
    ref, (r1, r2) = grads(reference, z1, z2)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, r1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-12)


def test_info_nce_fp32_close_to_fp64():
    z1, z2 = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = naive_info_nce(z1, z2, 0.1)
    torch.testing.assert_close(info_nce_loss(z1.float(), z2.float(), 0.1).double(), ref,
                               rtol=1e-5, atol=1e-6)


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


# ----------------------------------------------------------------------------- DCL, DCLW, FlatNCE


@pytest.mark.parametrize("sigma", [None, 0.5])
@pytest.mark.parametrize("n,temperature", [(2, 0.5), (6, 0.1)])
def test_dcl_matches_naive_loop(n, temperature, sigma):
    z1, z2 = (torch.randn(n, 5, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              for k in (n, n + 1))
    value, (g1, g2) = grads(lambda a, b: dcl_loss(a, b, temperature, sigma), z1, z2)
    ref, (r1, r2) = grads(lambda a, b: naive_dcl(a, b, temperature, sigma), z1, z2)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g1, r1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-12)


def test_dcl_analytic_and_weights():
    n, t = 5, 0.2
    eye = torch.eye(n, dtype=torch.float64)
    # Views equal, images orthogonal: -1/T + log(2N - 2), the positive is not in the denominator.
    assert math.isclose(dcl_loss(eye, eye, t).item(), -1 / t + math.log(2 * n - 2), rel_tol=1e-12)
    # Equal positive similarities give DCLW weights of exactly 1, so DCLW == DCL.
    assert math.isclose(dcl_loss(eye, eye, t, sigma=0.5).item(), dcl_loss(eye, eye, t).item(),
                        rel_tol=1e-12)


def test_flatnce_is_one_with_dcls_gradient_and_logs_info_nce():
    """FlatNCE's objective is 1 in value (the paper's Algorithm 1) with DCL's gradient; the
    second output is InfoNCE per anchor, detached, for the log."""
    z1, z2 = (torch.randn(7, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              for k in (3, 4))
    value, (g1, g2) = grads(lambda a, b: flatnce_loss(a, b, 0.1)[0], z1, z2)
    _, (r1, r2) = grads(lambda a, b: naive_dcl(a, b, 0.1), z1, z2)
    assert value.item() == 1.0
    torch.testing.assert_close(g1, r1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-12)
    # ... and not InfoNCE's gradient, which carries the extra factor from the positive.
    _, (i1, _) = grads(lambda a, b: naive_info_nce(a, b, 0.1), z1, z2)
    assert not torch.allclose(g1, i1)
    _, info_nce = flatnce_loss(z1, z2, 0.1)
    assert info_nce.shape == (14,) and not info_nce.requires_grad
    torch.testing.assert_close(info_nce.mean(), naive_info_nce(z1, z2, 0.1), rtol=1e-10, atol=1e-12)


def test_flatnce_logs_positive_probability():
    z1, z2 = (torch.randn(4, 6, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              for k in (5, 6))
    p_pos = torch.exp(-flatnce_loss(z1, z2, 0.1)[1]).mean()  # as flatnce.train_step logs it
    views = [v / v.norm() for v in list(z1) + list(z2)]
    probs = []
    for i in range(8):
        e = [torch.exp(torch.dot(views[i], views[k]) / 0.1) for k in range(8) if k != i]
        probs.append(torch.exp(torch.dot(views[i], views[(i + 4) % 8]) / 0.1) / sum(e))
    torch.testing.assert_close(p_pos, sum(probs) / 8)


# ----------------------------------------------------------------------------- SogCLR


def sogclr_step(loss_fn, z1, z2, index):
    """One SogCLRLoss call: (surrogate, logged loss, input gradients of the surrogate)."""
    a, b = z1.detach().clone().requires_grad_(True), z2.detach().clone().requires_grad_(True)
    surrogate, loss = loss_fn(a, b, index)
    surrogate.backward()
    return surrogate.detach(), loss, (a.grad, b.grad)


def test_sogclr_matches_naive_loop_over_three_steps():
    """Surrogate values, its input gradients (the paper's formula), the logged loss and u after
    each of three steps whose indices overlap, starting from u = 0 (first visit: gamma 1)."""
    g = torch.Generator().manual_seed(7)
    loss_fn = SogCLRLoss(10, temperature=0.2, gamma=0.9).double()
    for step, index in enumerate(([0, 1, 2, 3], [2, 3, 4, 5], [5, 0, 9, 3])):
        index = torch.tensor(index)
        z1, z2 = (torch.randn(4, 6, generator=g, dtype=torch.float64),
                  torch.randn(4, 6, generator=g, dtype=torch.float64))
        u_before = loss_fn.u.clone()
        surrogate, value, (g1, g2) = sogclr_step(loss_fn, z1, z2, index)
        _, ref_value, ref_u = naive_sogclr(z1, z2, index, u_before, 0.2, 0.9)
        ref_surrogate, (r1, r2) = grads(
            lambda a, b: naive_sogclr(a, b, index, u_before, 0.2, 0.9)[0], z1, z2)
        assert (math.isclose(value.item(), ref_value, rel_tol=1e-10)
                and not value.requires_grad), step
        torch.testing.assert_close(surrogate, ref_surrogate, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g1, r1, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(loss_fn.u, ref_u, rtol=1e-12, atol=0)
    assert (loss_fn.u[[6, 7, 8]] == 0).all() and (loss_fn.u[[0, 1, 2, 3, 4, 5, 9]] > 0).all()


def test_sogclr_at_train_steps_scale_is_the_official_code():
    """2T x the surrogate, what sogclr.train_step differentiates, has the gradient of the official
    surrogate (Optimization-AI/SogCLR, sogclr/builder.py, dynamic_contrastive_loss), written here
    from its equations: raw cosine logits (no 1/T) against [other view, same view without
    itself], detached weights exp(logit/T)/u_i per negative, the two views' terms summed, the
    batch mean. With u already filled (not a first visit) both update u the same way."""
    g = torch.Generator().manual_seed(8)
    n, t, gamma = 5, 0.2, 0.9
    z1, z2 = (torch.randn(n, 6, generator=g, dtype=torch.float64),
              torch.randn(n, 6, generator=g, dtype=torch.float64))
    u0 = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    index = torch.arange(n)

    def official(a, b):
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        eye = torch.eye(n, dtype=torch.bool)
        total = 0.0
        for x, y in ((a, b), (b, a)):
            logits = torch.cat([x @ y.T, x @ x.T], 1)  # (n, 2n): [other view, same view]
            # the positive (column i) and itself (column n + i) out
            neg = torch.cat([~eye, ~eye], 1).to(a.dtype)
            e = torch.exp(logits / t) * neg
            u = (1 - gamma) * u0[:, None] + gamma * e.sum(1, keepdim=True) / (2 * (n - 1))
            weights = (e / u).detach()
            total = total - (logits.diagonal() - (weights * logits).sum(1) / (2 * (n - 1)))
        return total.mean()

    loss_fn = SogCLRLoss(n, temperature=t, gamma=gamma).double()
    loss_fn.u.copy_(u0)
    _, (g1, g2) = grads(lambda a, b: 2 * t * loss_fn(a, b, index)[0], z1, z2)
    _, (r1, r2) = grads(official, z1, z2)
    torch.testing.assert_close(g1, r1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g2, r2, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- DDP == one process

TWO_VIEW_LOSSES = {
    "info_nce": lambda a, b: info_nce_loss(a, b, 0.1),
    "dcl": lambda a, b: dcl_loss(a, b, 0.1),
    "dclw": lambda a, b: dcl_loss(a, b, 0.1, sigma=0.5),
    "flatnce": lambda a, b: flatnce_loss(a, b, 0.1)[0],
    # the tiled path under DDP (tiles of 3 divide neither the 2B = 8 anchors nor the 16 candidates)
    "info_nce/chunked": lambda a, b: info_nce_loss(a, b, 0.1, chunk_size=3),
    "dclw/chunked": lambda a, b: dcl_loss(a, b, 0.1, sigma=0.5, chunk_size=3),
    "flatnce/chunked": lambda a, b: flatnce_loss(a, b, 0.1, chunk_size=3)[0],
}
SOGCLR_STEPS = ([0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9, 10, 11], [11, 0, 9, 2, 7, 4, 5, 14])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(r, w, port, name, zs, out):
    """Rank r of w: its slice of every step's global batch, through the named loss."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=w)
    try:
        results = []
        chunk = 3 if name.endswith("chunked") else None
        sog = (SogCLRLoss(16, temperature=0.1, gamma=0.9, chunk_size=chunk).double()
               if name.startswith("sogclr") else None)
        for step, (z1, z2) in enumerate(zs):
            b = z1.shape[0] // w
            part = slice(r * b, (r + 1) * b)
            if sog is None:
                fn = TWO_VIEW_LOSSES[name]
            else:
                fn = lambda a, c: sog(a, c, torch.tensor(SOGCLR_STEPS[step])[part])[0]  # noqa: E731
            value, (g1, g2) = grads(fn, z1[part], z2[part])
            results.append(dict(loss=value, g1=g1, g2=g2,
                                u=sog.u.clone() if sog is not None else None))
        torch.save(results, os.path.join(out, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(TWO_VIEW_LOSSES) + ["sogclr", "sogclr/chunked"])
def test_ddp_equals_single_process(tmp_path, name):
    """With W ranks each holding B of the W*B images, the mean of the rank losses is the
    single-process loss of the global batch, and rank r's input gradient / W is the
    single-process gradient of its slice. Fails if gather_with_grad drops the gradient
    that flows through other ranks' negatives, or a statistic (DCLW's mean) is local.
    SogCLR runs three steps with overlapping indices: u must equal the single-process u
    on both ranks after every step."""
    w, b = 2, 4
    g = torch.Generator().manual_seed(0)
    steps = 3 if name.startswith("sogclr") else 1
    # separate storages per tensor: older torch cannot pass one storage twice to mp.spawn
    zs = [tuple(torch.randn(w * b, 16, generator=g, dtype=torch.float64) for _ in range(2))
          for _ in range(steps)]
    mp.spawn(_ddp_worker, args=(w, free_port(), name, zs, str(tmp_path)), nprocs=w)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(w)]
    sog = SogCLRLoss(16, temperature=0.1, gamma=0.9).double()
    for step, (z1, z2) in enumerate(zs):
        fn = TWO_VIEW_LOSSES.get(name.replace("/chunked", "")) or (
            lambda a, c: sog(a, c, torch.tensor(SOGCLR_STEPS[step]))[0])
        ref, (r1, r2) = grads(fn, z1, z2)
        torch.testing.assert_close(sum(p[step]["loss"] for p in parts) / w, ref,
                                   rtol=1e-12, atol=1e-12)
        for r, p in enumerate(parts):
            torch.testing.assert_close(p[step]["g1"] / w, r1[r * b:(r + 1) * b],
                                       rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(p[step]["g2"] / w, r2[r * b:(r + 1) * b],
                                       rtol=1e-10, atol=1e-12)
            if name.startswith("sogclr"):
                assert torch.equal(p[step]["u"], parts[0][step]["u"])  # identical on every rank
                torch.testing.assert_close(p[step]["u"], sog.u, rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- Poly-View


def naive_polyview(z, temperature, objective):
    """Poly-View (Shidani et al. 2024), one anchor (sample i, view a) at a time, no matrix
    tricks. z: (M, N, D). e(x, y) = exp(cos(x, y) / T); every objective is averaged over
    the M x N anchors."""
    m, n = z.shape[:2]
    # v[a][i]: view a of sample i
    v = [[z[a, i] / z[a, i].norm() for i in range(n)] for a in range(m)]

    def e(x, y):
        return torch.exp(torch.dot(x, y) / temperature)

    def p(i, a, b):
        # candidates: (i, b) and every view of every other sample
        negatives = sum(e(v[a][i], v[c][k]) for k in range(n) if k != i for c in range(m))
        return e(v[a][i], v[b][i]) / (e(v[a][i], v[b][i]) + negatives)

    def nt_xent(i, a, b):
        # NT-Xent on views a and b only: every view a or b except the anchor itself
        denominator = sum(e(v[a][i], v[c][k]) for k in range(n) for c in (a, b) if (k, c) != (i, a))
        return -torch.log(e(v[a][i], v[b][i]) / denominator)

    total = 0.0
    for i in range(n):
        for a in range(m):
            others = [b for b in range(m) if b != a]
            if objective == "geometric":
                total = total - sum(torch.log(p(i, a, b)) for b in others) / (m - 1)
            elif objective == "arithmetic":
                total = total - torch.log(sum(p(i, a, b) for b in others) / (m - 1))
            elif objective == "multicrop":
                total = total + sum(nt_xent(i, a, b) for b in others) / (m - 1)
            else:  # sufficient: t_k^a, the normalised mean of sample k's other views
                t = []
                for k in range(n):
                    mean = sum(v[b][k] for b in others) / (m - 1)
                    t.append(mean / mean.norm())
                total = total - torch.log(e(v[a][i], t[i])
                                          / sum(e(v[a][i], t[k]) for k in range(n)))
    return total / (m * n)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("m,n,temperature", [(2, 4, 0.5), (3, 5, 0.1), (4, 3, 0.2), (3, 1, 0.3)])
def test_polyview_matches_naive_loop(objective, m, n, temperature):
    z = torch.randn(m, n, 6, generator=torch.Generator().manual_seed(10 * m + n),
                    dtype=torch.float64)
    value, (g,) = grads(lambda x: polyview_loss(x, temperature, objective), z)
    ref, (r,) = grads(lambda x: naive_polyview(x, temperature, objective), z)
    torch.testing.assert_close(value, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("objective", ["geometric", "arithmetic", "multicrop"])
def test_polyview_two_views_is_info_nce(objective):
    z = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    value, (g,) = grads(lambda x: polyview_loss(x, 0.1, objective), z)
    ref, (r1, r2) = grads(lambda a, b: info_nce_loss(a, b, 0.1), z[0], z[1])
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, torch.stack([r1, r2]), rtol=1e-10, atol=1e-12)


def test_polyview_objectives_differ_and_order():
    z = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    values = {o: polyview_loss(z, 0.1, o).item() for o in OBJECTIVES}
    assert len(set(values.values())) == len(OBJECTIVES), values
    # Jensen: -log of the mean of the p_iab is at most the mean of the -log p_iab.
    assert values["arithmetic"] < values["geometric"]


def test_polyview_invariances_and_dtype():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    for o in OBJECTIVES:
        base = polyview_loss(z, 0.1, o)
        torch.testing.assert_close(
            polyview_loss(z[:, torch.randperm(6, generator=g)], 0.1, o), base)  # samples
        torch.testing.assert_close(
            polyview_loss(z[torch.randperm(3, generator=g)], 0.1, o), base)  # views
        torch.testing.assert_close(
            polyview_loss(z * (torch.rand(3, 6, 1, generator=g, dtype=torch.float64) + 0.1),
                          0.1, o), base)
        torch.testing.assert_close(polyview_loss(z, 0.1, o, chunk_size=2), base)
        assert polyview_loss(z.float(), 0.1, o).dtype == torch.float32
        torch.testing.assert_close(polyview_loss(z.float(), 0.1, o).double(), base,
                                   rtol=1e-5, atol=1e-6)


def test_polyview_analytic_case():
    # All views of a sample equal, samples orthogonal: p_iab = e^{1/T} / (e^{1/T} + M(N-1)).
    m, n, t = 3, 5, 0.2
    z = torch.eye(n, dtype=torch.float64).expand(m, n, n)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + m * (n - 1)))
    for o in ("geometric", "arithmetic"):
        assert math.isclose(polyview_loss(z, t, o).item(), expected, rel_tol=1e-12)


def test_polyview_rejects_bad_input():
    z = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="objective"):
        polyview_loss(z, 0.1, "harmonic")
    with pytest.raises(ValueError, match="2 views"):
        polyview_loss(z[:1], 0.1)


def _polyview_ddp_worker(r, w, port, z, temperature, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=w)
    try:
        b = z.shape[1] // w
        result = {}
        for o in OBJECTIVES:
            for chunk in (0, 2):  # dense, and tiles of 2 that divide neither M*B nor B*W
                value, (g,) = grads(lambda x: polyview_loss(x, temperature, o, chunk),
                                    z[:, r * b:(r + 1) * b])
                result[o, chunk] = dict(loss=value, grad=g)
        torch.save(result, os.path.join(out, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2])
def test_polyview_ddp_equals_single_process(tmp_path, world_size):
    """As test_ddp_equals_single_process, for every objective: W ranks holding B
    samples each (M views) give mean loss == single-process loss of the W*B samples, and
    rank r's input gradient / W == the single-process gradient of its slice."""
    torch.manual_seed(0)
    m, b, t = 3, 3, 0.1
    z = torch.randn(m, world_size * b, 6, dtype=torch.float64)  # one tensor, sliced in the worker
    mp.spawn(_polyview_ddp_worker, args=(world_size, free_port(), z, t, str(tmp_path)),
             nprocs=world_size)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]
    for o, chunk in parts[0]:
        ref, (g,) = grads(lambda x: polyview_loss(x, t, o, chunk_size=0), z)
        torch.testing.assert_close(sum(p[o, chunk]["loss"] for p in parts) / world_size, ref,
                                   rtol=1e-12, atol=1e-12, msg=lambda s: f"{o}, chunk {chunk}: {s}")
        for r, p in enumerate(parts):
            torch.testing.assert_close(p[o, chunk]["grad"] / world_size, g[:, r * b:(r + 1) * b],
                                       rtol=1e-10, atol=1e-12,
                                       msg=lambda s: f"{o}, chunk {chunk}, rank {r}: {s}")


# ----------------------------------------------------------------------------- chunked similarity


def naive_masked_lse(anchors, candidates, temperature, exclude):
    """log sum over the non-excluded candidates of exp(<a, c>/T), one row at a time."""
    rows = []
    for i, a in enumerate(anchors):
        skip = set(exclude[i].tolist()) if exclude is not None else set()
        terms = [torch.exp(torch.dot(a, c) / temperature)
                 for j, c in enumerate(candidates) if j not in skip]
        rows.append(torch.log(sum(terms)))
    return torch.stack(rows)


@pytest.mark.parametrize("chunk", [0, 1, 3, 7, 64])
def test_similarity_logsumexp_matches_naive_and_excludes(chunk):
    g = torch.Generator().manual_seed(chunk)
    a, c = (torch.randn(10, 5, generator=g, dtype=torch.float64),
            torch.randn(13, 5, generator=g, dtype=torch.float64))
    exclude = torch.randint(0, 13, (10, 3), generator=g)
    exclude[0] = torch.tensor([12, 12, 0])  # repeats and the last column, in different tiles
    value, (ga, gc) = grads(
        lambda x, y: common.similarity_logsumexp(x, y, 0.3, exclude, chunk).sum(), a, c)
    ref, (ra, rc) = grads(lambda x, y: naive_masked_lse(x, y, 0.3, exclude).sum(), a, c)
    torch.testing.assert_close(value, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, ra, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gc, rc, rtol=1e-10, atol=1e-12)
    # Excluded really means excluded: making excluded candidates huge changes nothing.
    c_big = c.clone()
    c_big[exclude[0]] *= 1e3
    row0 = common.similarity_logsumexp(a[:1], c_big, 0.3, exclude[:1], chunk)
    torch.testing.assert_close(row0, naive_masked_lse(a[:1], c, 0.3, exclude[:1]),
                               rtol=1e-12, atol=1e-12)


def test_fully_excluded_row_has_finite_gradients():
    """A row whose every candidate is excluded has lse = -inf and must not poison the other
    rows' gradients on the tiled path (exp(-inf - -inf) would be nan)."""
    a, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    exclude = torch.tensor([[0, 1], [0, 0], [1, 1]])  # row 0 excludes both candidates
    results = []
    for chunk in (0, 1):
        value, (ga, gc) = grads(
            lambda x, y: common.similarity_logsumexp(x, y, 0.5, exclude, chunk)[1:].sum(), a, c)
        assert torch.isfinite(ga).all() and torch.isfinite(gc).all()
        results.append((value, ga, gc))
    for dense, tiled in zip(*results):
        torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)


def test_low_precision_inputs_are_computed_in_fp32():
    a, c = torch.randn(6, 8, dtype=torch.float64), torch.randn(9, 8, dtype=torch.float64)
    ref = common.similarity_logsumexp(a, c, 0.05, None, 0)
    for chunk in (0, 4):
        value = common.similarity_logsumexp(a.bfloat16(), c.bfloat16(), 0.05, None, chunk)
        assert value.dtype == torch.float32
        # only the bf16 rounding of the inputs remains, not a bf16 accumulation
        ref_rounded = common.similarity_logsumexp(a.bfloat16().double(), c.bfloat16().double(),
                                                  0.05, None, 0)
        torch.testing.assert_close(value.double(), ref_rounded, rtol=1e-5, atol=1e-5)
        assert (value.double() - ref).abs().max() < 1.0


def test_chunked_logsumexp_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    c = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    exclude = torch.tensor([[0], [6], [2], [3], [1]])
    assert torch.autograd.gradcheck(
        lambda x, y: common.similarity_logsumexp(x, y, 0.5, exclude, 2), (a, c))


CHUNKED_LOSSES = {
    "info_nce": lambda a, b, k: info_nce_loss(a, b, 0.1, chunk_size=k),
    "dcl": lambda a, b, k: dcl_loss(a, b, 0.1, chunk_size=k),
    "dclw": lambda a, b, k: dcl_loss(a, b, 0.1, sigma=0.5, chunk_size=k),
    "flatnce": lambda a, b, k: flatnce_loss(a, b, 0.1, chunk_size=k)[0],
    "sogclr": lambda a, b, k: SogCLRLoss(12, 0.1, 0.9, chunk_size=k).double()(
        a, b, torch.arange(len(a)))[0],
}


@pytest.mark.parametrize("name", CHUNKED_LOSSES)
def test_chunked_equals_dense_two_view(name):
    """Tiles of 3 divide neither the 2B = 10 anchors nor the 10 candidates."""
    z1, z2 = (torch.randn(5, 8, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
              for k in (11, 12))
    fn = CHUNKED_LOSSES[name]
    dense, (d1, d2) = grads(lambda a, b: fn(a, b, 0), z1, z2)
    tiled, (t1, t2) = grads(lambda a, b: fn(a, b, 3), z1, z2)
    torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t1, d1, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(t2, d2, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("n", [5, 1])  # one sample: every other-sample column is excluded
def test_chunked_equals_dense_polyview(objective, n):
    z = torch.randn(3, n, 8, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    dense, (d,) = grads(lambda x: polyview_loss(x, 0.1, objective, chunk_size=0), z)
    tiled, (t,) = grads(lambda x: polyview_loss(x, 0.1, objective, chunk_size=4), z)
    torch.testing.assert_close(tiled, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, d, rtol=1e-10, atol=1e-13)


def flatnce_with_info_nce(z1, z2, temperature, chunk_size=None):
    """1 + InfoNCE in value (FlatNCE's objective is always 1), FlatNCE's gradient."""
    flat, info_nce = flatnce_loss(z1, z2, temperature, chunk_size)
    return flat + info_nce.mean()


@pytest.mark.parametrize("name", ["info_nce", "dcl", "dclw", "flatnce"])
def test_large_logits_stay_finite_in_fp32(name):
    """T = 0.01 puts logits near 100, where exp overflows fp32 without the max shift."""
    z1 = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    z2 = z1 + 0.01 * torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    fn = {"info_nce": info_nce_loss, "dcl": dcl_loss, "flatnce": flatnce_with_info_nce,
          "dclw": lambda a, b, t, chunk_size: dcl_loss(a, b, t, 0.5, chunk_size)}[name]
    for chunk in (0, 5):
        value, (g1, g2) = grads(lambda a, b: fn(a, b, 0.01, chunk_size=chunk), z1, z2)
        assert torch.isfinite(value) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
        ref = fn(z1.double(), z2.double(), 0.01, chunk_size=0)
        torch.testing.assert_close(value.double(), ref, rtol=1e-4, atol=1e-4)


def test_automatic_choice_is_dense_below_the_limit_and_tiled_above(monkeypatch):
    calls = []
    monkeypatch.setattr(common._ChunkedLogSumExp, "apply",
                        lambda *args: calls.append(args[-1]) or torch.zeros(len(args[0])))
    a = torch.randn(8, 4)
    common.similarity_logsumexp(a, a, 0.1)  # 64 logits: dense
    assert calls == []
    monkeypatch.setattr(common, "DENSE_LIMIT", 63)
    common.similarity_logsumexp(a, a, 0.1)
    assert calls == [common.AUTO_CHUNK]


def test_chunked_peak_memory_is_a_small_fraction_of_dense():
    """2 x 8192 views, D = 128, InfoNCE forward + backward, each in a fresh process (peak RSS)."""
    peaks = {}
    for mode in ("dense", "chunked"):
        out = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "loss-one",
                              "--views", "16384", "--mode", mode, "--device", "cpu"],
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        peaks[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]
    assert peaks["dense"] > 2 ** 30  # at least one 16384^2 fp32 matrix (1 GiB)
    assert peaks["chunked"] < 0.1 * peaks["dense"], peaks


# ----------------------------------------------------------------------------- spectral batches


def test_spectral_batches_equal_sizes_no_repeats_coverage():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(1000, 8, generator=g)
    batches, _ = common.spectral_batches(z1, z1 + 0.1 * torch.randn(1000, 8, generator=g), 16,
                                         clusters=5, generator=g)
    assert all(len(b) == 16 for b in batches)
    seen = torch.cat(batches)
    assert len(seen.unique()) == len(seen)  # no index twice
    # the last partial chunk is clustered too
    assert 1000 - len(seen) < 16 and len(batches) == 1000 // 16


def test_equal_size_assignment():
    dist = torch.rand(60, 4, generator=torch.Generator().manual_seed(1))
    assign = common._equal_size_assign(dist, 15)
    assert torch.bincount(assign, minlength=4).tolist() == [15] * 4
    # Every row prefers centre 0, some rows see only centre 0: still exactly 2 per centre.
    crowded = torch.tensor([[0.0, float("inf"), float("inf")]] + [[0.0, 1.0, 2.0]] * 5)
    assert torch.bincount(common._equal_size_assign(crowded, 2), minlength=3).tolist() == [2, 2, 2]
    # Rows whose nearest centre is unique and has room get it.
    easy = torch.full((8, 4), 9.0)
    easy[torch.arange(8), torch.arange(8) % 4] = 0.0
    assert common._equal_size_assign(easy, 2).tolist() == (torch.arange(8) % 4).tolist()


def test_spectral_batches_are_harder_than_random():
    """Clustered Gaussians: spectral batches gather mutually similar images, whose InfoNCE
    is higher than that of random batches of the same size."""
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(16, 32, generator=g)
    z1 = centres.repeat_interleave(32, 0) + 0.3 * torch.randn(512, 32, generator=g)
    z2 = z1 + 0.3 * torch.randn(512, 32, generator=g)
    spectral, _ = common.spectral_batches(z1, z2, 32, 0.1, clusters=16, generator=g)
    random = list(torch.randperm(512, generator=g).view(16, 32))

    def mean_loss(batches):
        return sum(info_nce_loss(z1[b], z2[b], 0.1).item() for b in batches) / len(batches)

    assert mean_loss(spectral) > mean_loss(random) + 1.0, (mean_loss(spectral), mean_loss(random))


def test_spectral_batches_find_hard_batches_in_a_loose_mixture():
    """200 overlapping clusters, B = 64: only a real spectral embedding finds the hard pairs
    here (self-loops in W, for one, would leave the batches as random: about 1.2x)."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(200, 32, generator=g)
    z1 = (centres[torch.randint(0, 200, (2560,), generator=g)]
          + 0.7 * torch.randn(2560, 32, generator=g))
    z2 = z1 + 0.3 * torch.randn(2560, 32, generator=g)
    spectral, _ = common.spectral_batches(z1, z2, 64, 0.1, 40, g)
    random = list(torch.randperm(2560, generator=g).view(40, 64))

    def mean_loss(batches):
        return sum(info_nce_loss(z1[b], z2[b], 0.1).item() for b in batches) / len(batches)

    assert mean_loss(spectral) > 3 * mean_loss(random), (mean_loss(spectral), mean_loss(random))


def test_kmeans_keeps_the_lowest_inertia_of_its_restarts():
    """k-means++ seeding + Lloyd, 10 restarts: finds three separated blobs' means, and returns
    exactly the centres of the lowest-inertia run among the 10 single runs drawn from the same
    generator stream."""
    g = torch.Generator().manual_seed(0)
    blobs = (torch.randn(300, 2, generator=g)
             + torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]]).repeat(100, 1))
    centres = common._kmeans(blobs, 3, torch.Generator().manual_seed(1))
    assert (torch.cdist(centres, torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0]]))
            .amin(0).max() < 0.5)
    x = torch.randn(500, 4, generator=g)
    # its best run is the 4th: neither the first nor the last
    stream = torch.Generator().manual_seed(3)
    runs = [common._kmeans(x, 20, stream, restarts=1) for _ in range(10)]
    inertia = [torch.cdist(x, c).amin(1).square().sum().item() for c in runs]
    assert inertia.index(min(inertia)) not in (0, 9) and max(inertia) > min(inertia) * 1.01
    best = common._kmeans(x, 20, torch.Generator().manual_seed(3), restarts=10)
    assert torch.equal(best, runs[inertia.index(min(inertia))])


def test_official_style_batches_with_no_swap_are_this_codes():
    """bench.py spectral-deviations measures the official code's choices against a second copy
    of the pipeline: with nothing swapped in, that copy must give exactly
    common.spectral_batches' batches."""
    from bench import deviation_settings, official_style_batches

    _, z1, z2, b, clusters = list(deviation_settings())[2]
    ours, _ = common.spectral_batches(z1, z2, b, 0.1, clusters, torch.Generator().manual_seed(0))
    copy = official_style_batches(z1, z2, b, 0.1, clusters, torch.Generator().manual_seed(0))
    assert len(ours) == len(copy) and all(torch.equal(x, y) for x, y in zip(ours, copy))


def test_spectral_eigenvectors_converge_on_a_flat_spectrum(monkeypatch):
    """10 classes in d 128, B 32, 40 clusters: eigenvalues 40 and 41 of the chunk's normalised
    adjacency differ by 5e-4, where 30 steps of plain subspace iteration reach principal-angle
    cosines of 0.64 on average with the exact eigenvectors. The solver must reach every cosine
    >= 0.99, report a residual within EIG_TOL, and its batches must be at least 0.95 as hard
    (mean in-batch InfoNCE) as those from exact eigenvectors."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 128, generator=g)
    z1 = centres[torch.randint(0, 10, (1280,), generator=g)] + torch.randn(1280, 128, generator=g)
    z2 = z1 + 0.5 * torch.randn(1280, 128, generator=g)
    solver, seen = common._top_eigenvectors, {}

    def recording(s, k, generator):
        q, res = solver(s, k, generator)
        seen.update(s=s, q=q)
        return q, res

    monkeypatch.setattr(common, "_top_eigenvectors", recording)
    batches, residual = common.spectral_batches(z1, z2, 32, 0.1, 40,
                                                torch.Generator().manual_seed(1))
    exact = torch.linalg.eigh(seen["s"].double()).eigenvectors[:, -40:]
    eig = torch.linalg.eigvalsh(seen["s"].double()).flip(0)
    assert eig[39] - eig[40] < 1e-3  # the flat spectrum this test is about
    cosines = torch.linalg.svdvals(seen["q"].double().T @ exact)
    assert residual <= common.EIG_TOL and cosines.min() >= 0.99, (residual, cosines.min())

    monkeypatch.setattr(common, "_top_eigenvectors", lambda s, k, generator: (
        torch.linalg.eigh(s.double()).eigenvectors[:, -k:].to(s.dtype), 0.0))
    exact_batches, _ = common.spectral_batches(z1, z2, 32, 0.1, 40,
                                               torch.Generator().manual_seed(1))

    def mean_loss(rows):
        return sum(info_nce_loss(z1[r], z2[r], 0.1).item() for r in rows) / len(rows)

    assert mean_loss(batches) >= 0.95 * mean_loss(exact_batches), (
        mean_loss(batches), mean_loss(exact_batches))


def test_spectral_batching_trains_the_synthetic_pairs_faster():
    """Cho et al.'s synthetic experiment (bench.py spectral-toy prints it): N = 32 trainable
    pairs in d = 64, B = 2, the same SGD steps; spectral batches end at a lower full-batch
    loss than random ones, for each of three seeds."""
    from bench import toy_run

    for seed in range(3):
        assert toy_run("spectral", seed) < toy_run("random", seed) - 0.1


def test_mechanisms_q_is_one_minus_p_pos():
    """bench.py mechanisms, part 1: q per anchor against a loop over the anchors, from the
    softmax's definition."""
    from bench import q_values

    g = torch.Generator().manual_seed(0)
    z1, z2, t = (torch.randn(5, 8, generator=g, dtype=torch.float64),
                 torch.randn(5, 8, generator=g, dtype=torch.float64), 0.3)
    views = [v / v.norm() for v in list(z1) + list(z2)]
    naive = []
    for i in range(10):
        e = [torch.exp(torch.dot(views[i], views[k]) / t) for k in range(10)]
        naive.append(1 - e[(i + 5) % 10] / sum(e[k] for k in range(10) if k != i))
    torch.testing.assert_close(q_values(z1, z2, t), torch.stack(naive), rtol=1e-12, atol=1e-12)


def test_mechanisms_exact_objectives_equal_the_losses_on_the_full_batch():
    """bench.py mechanisms, part 2-3: its exact full-data InfoNCE and global contrastive
    objective (and u's exact value) are the scripts' own losses with the whole data as the
    batch."""
    from bench import toy_objectives

    g = torch.Generator().manual_seed(1)
    n, t = 12, 0.2
    u, v = (torch.randn(n, 2 * n, generator=g, dtype=torch.float64),
            torch.randn(n, 2 * n, generator=g, dtype=torch.float64))
    info, gcl, exact_u = toy_objectives(u, v, t)
    assert math.isclose(info, info_nce_loss(u, v, t).item(), rel_tol=1e-12)
    assert math.isclose(info, naive_info_nce(u, v, t).item(), rel_tol=1e-12)
    assert math.isclose(gcl, dcl_loss(u, v, t).item() - math.log(2 * n - 2), rel_tol=1e-12)
    sog = SogCLRLoss(n, temperature=t, gamma=0.9).double()
    index = torch.arange(n)
    # first visit: u = g, the full-batch mean
    assert math.isclose(gcl, sog(u, v, index)[1].item(), rel_tol=1e-12)
    torch.testing.assert_close(sog.u, exact_u.view(2, n).mean(0), rtol=1e-12, atol=0)


def test_mechanisms_every_loss_steps_on_its_formulas_mean():
    """bench.mechanism_run trains on each loss as it returns it, the gradient of its formula's
    mean over anchors (SogCLR: the surrogate), with no reference-code factor. With gamma 1
    SogCLR's u is the batch estimate, so its formula's gradient is DCL's, which is FlatNCE's:
    the three runs must coincide. A stray factor (e.g. 2T on SogCLR's surrogate) changes the
    step and the result."""
    from bench import mechanism_run

    dcl, flat, sog = (mechanism_run(m, 4, 0, 40, gamma=1.0 if m == "sogclr" else None)
                      for m in ("dcl", "flatnce", "sogclr"))
    for a, b in ((dcl, flat), (dcl, sog)):
        assert (math.isclose(a[0], b[0], rel_tol=1e-4)
                and math.isclose(a[1], b[1], rel_tol=1e-4)), (a[:2], b[:2])
    init = mechanism_run("dcl", 4, 0, 0)
    # 40 steps do move the objective: the comparison is not of three starting points
    assert dcl[0] < init[0] - 0.1


def test_mechanisms_estimator_errors():
    """bench.mechanism_run's SogCLR errors: with gamma 1, u is the batch estimate g and the two
    errors are equal at every step; with frozen parameters (lr 0) and gamma 0.1, u averages g
    over visits and ends far closer to the exact full-data mean than g does (the estimator
    claim, without training's staleness)."""
    from bench import mechanism_run

    errors = mechanism_run("sogclr", 4, 0, 48, gamma=1.0)[2]
    assert len(errors) == 48 and all(math.isclose(u, g, rel_tol=1e-5) for u, g in errors)
    errors = torch.tensor(mechanism_run("sogclr", 4, 0, 320, lr=0.0, gamma=0.1)[2])
    u, g = errors[-80:].mean(0).tolist()
    # the first epoch: every visit is a first visit, u = g
    assert errors[:16, 0].allclose(errors[:16, 1])
    assert u < 0.5 * g, (u, g)


# ----------------------------------------------------------------------------- common


@pytest.mark.parametrize("chunk", [7, 50, 1000])
def test_chunked_topk_equals_full_topk(chunk):
    g = torch.Generator().manual_seed(chunk)
    queries, bank = (torch.randn(9, 16, generator=g, dtype=torch.float64),
                     torch.randn(300, 16, generator=g, dtype=torch.float64))
    values, index = common.chunked_topk(queries, bank, 20, chunk=chunk)
    ref_v, ref_i = (queries @ bank.T).topk(20, dim=1)
    # slices may round differently
    torch.testing.assert_close(values, ref_v, rtol=1e-12, atol=1e-12)
    assert torch.equal(index, ref_i)


def test_gather_with_grad_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert common.gather_with_grad(x) is x


# ----------------------------------------------------------------------------- host syncs


class HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every op that would make the host wait for the GPU: a value read back (.item(),
    `if tensor`, torch.equal) or an output whose size depends on the data (nonzero, a
    boolean-mask index, masked_select). Blind to .cpu() / .tolist() on CPU tensors, which reach
    no op here: those are checked by reading."""
    READS = {"_local_scalar_dense", "is_nonzero", "equal", "allclose", "nonzero", "masked_select",
             "_unique2", "unique_dim", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.found = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        mask = (name.startswith("index") and len(args) > 1 and isinstance(args[1], (list, tuple))
                and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in args[1]))
        if name in self.READS or mask:
            self.found.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("script,flags", [
    ("simclr", []), ("sogclr", []), ("dcl", []), ("dcl", ["--dcl-sigma", "0.5"]), ("flatnce", []),
    *(("polyview", ["--pv-objective", o]) for o in OBJECTIVES)])
def test_training_step_never_waits_for_the_device(monkeypatch, script, flags):
    """The forward, the loss, the backward and the LARS step of every method, as the training
    loop runs them: no op in them reads a value back or makes a data-dependent shape, so on a
    GPU the host never stalls."""
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [script, "--data", "synthetic", "--arch", "resnet18",
                                      "--batch", "8", *flags])
    args = module.get_args()
    args.precision = "fp32"
    torch.manual_seed(0)
    net = common.make_model("resnet18", 32, 3, torch.device("cpu"))
    opt = module.LARS(net.parameters(), lr=0.1, weight_decay=1e-6)
    criterion = module.make_criterion(args, 32, torch.device("cpu"))
    views, index = torch.randn(args.n_views, 8, 3, 32, 32), torch.randperm(32)[:8]
    for _ in range(2):  # the second step has LARS's momentum buffers already
        with HostSyncs() as syncs:
            objective, _ = module.train_step(net, views, index, criterion, args)
            objective.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        assert syncs.found == [], syncs.found
        assert torch.isfinite(objective)


@pytest.mark.parametrize("script,loss_name,scale", [
    ("simclr", "info_nce_loss", lambda args, z: 2), ("dcl", "dcl_loss", lambda args, z: 2),
    ("flatnce", "flatnce_loss", lambda args, z: 2),
    ("polyview", "polyview_loss", lambda args, z: len(z)),
    ("sogclr", None, lambda args, z: 2 * args.temperature)])
def test_train_step_differentiates_the_reference_codes_scale_and_logs_the_papers_loss(
        monkeypatch, script, loss_name, scale):
    """train_step returns scale x what the loss function differentiates (2 for SimCLR's two
    summed directions, and for DCL and FlatNCE; M for Poly-View; 2T for SogCLR's official
    surrogate) and logs the loss's own value: the mean over anchors (FlatNCE: InfoNCE's,
    SogCLR: the moving-average estimate)."""
    module = __import__(script)
    monkeypatch.setattr(sys, "argv", [script, "--data", "synthetic", "--arch", "resnet18",
                                      "--batch", "8", "--temperature", "0.2"]
                        + (["--pv-views", "3"] if script == "polyview" else []))
    args = module.get_args()
    args.precision = "fp32"
    torch.manual_seed(0)
    net = common.make_model("resnet18", 32, 3, torch.device("cpu"))
    seen = []

    def spy(fn):
        def wrapped(*a, **k):
            seen.append((a[0], fn(*a, **k)))
            return seen[-1][1]
        return wrapped

    criterion = module.make_criterion(args, 32, torch.device("cpu"))
    if loss_name:
        monkeypatch.setattr(module, loss_name, spy(getattr(module, loss_name)))
    else:
        criterion = spy(criterion)
    views, index = torch.randn(args.n_views, 8, 3, 32, 32), torch.randperm(32)[:8]
    objective, logs = module.train_step(net, views, index, criterion, args)
    (z, out), = seen
    differentiated = out[0] if isinstance(out, tuple) else out
    factor = scale(args, z)
    assert factor != 1
    torch.testing.assert_close(objective, factor * differentiated, rtol=0, atol=0)
    logged = {"flatnce": lambda: out[1].mean(),
              "sogclr": lambda: out[1]}.get(script, lambda: out.detach())()
    torch.testing.assert_close(logs["loss"], logged, rtol=0, atol=0)
    assert not logs["loss"].requires_grad


# ----------------------------------------------------------------------------- LARS and schedule


def test_lars_1d_parameters_get_plain_sgd_momentum():
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(4))
    bias_ref = torch.nn.Parameter(bias.detach().clone())
    lars = simclr.LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9)
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


class Ops(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every aten op run under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_lars_makes_its_momentum_buffers_once():
    """The first step creates one zero buffer per parameter; later steps allocate none (no
    zeros_like, no memset): 165 of them per step for ResNet-50 otherwise."""
    params = [torch.nn.Parameter(torch.randn(5, 4)), torch.nn.Parameter(torch.randn(5))]
    lars = simclr.LARS(params, lr=0.1, weight_decay=1e-6)
    for step in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        with Ops() as ops:
            lars.step()
        assert ops.names.count("zeros_like") == (2 if step == 0 else 0), ops.names


def test_lars_step_runs_a_fixed_number_of_ops_whatever_the_number_of_tensors():
    """Every LARS op works on all tensors at once (foreach), so a GPU step launches the same few
    kernels for ResNet-50's 161 tensors as for 6: no op per tensor, the trust ratio included."""
    counts = []
    for n in (3, 12):
        params = ([torch.nn.Parameter(torch.randn(4, 3)) for _ in range(n)]
                  + [torch.nn.Parameter(torch.randn(4)) for _ in range(n)])
        lars = simclr.LARS(params, lr=0.1, weight_decay=1e-6)
        for _ in range(2):  # the second step: buffers made
            for p in params:
                p.grad = torch.randn_like(p)
            with Ops() as ops:
                lars.step()
        counts.append([name for name in ops.names if not name.startswith("_record_function")])
    assert counts[0] == counts[1] and "_foreach_addcmul_" in counts[0], counts


def test_lars_foreach_equals_per_tensor_loop():
    """The fused LARS against the per-tensor loop written from the paper, over several steps,
    with a zero weight and a zero gradient (trust ratio 1) among the tensors."""
    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (8,), (5, 8), (5,), (4, 4)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    with torch.no_grad():
        params[4].zero_()
    ref = [p.detach().clone() for p in params]
    mu = [torch.zeros_like(p) for p in params]
    lars = simclr.LARS(params, lr=0.3, weight_decay=1e-3, momentum=0.9)
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        grads[2] = torch.zeros_like(grads[2]) if step == 1 else grads[2]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        lars.step()
        for w, g, m in zip(ref, grads, mu):
            d = g
            if w.ndim > 1:
                d = g + 1e-3 * w
                ok = w.norm() > 0 and d.norm() > 0
                d = d * (0.001 * w.norm() / d.norm() if ok else 1.0)
            m.mul_(0.9).add_(d)
            w.sub_(0.3 * m)
        for p, w in zip(params, ref):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_lr_schedule():
    base, total, warmup = 2.0, 1000, 100
    lrs = [simclr.lr_at(s, total, warmup, base) for s in range(total)]
    assert lrs[0] == base / warmup
    assert lrs[warmup - 1] == base and lrs[warmup] == base  # end of warmup: the peak
    assert 0 < lrs[-1] < base * (math.pi / (total - warmup)) ** 2  # last step: nearly zero
    assert all(a <= b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:]))
    assert simclr.lr_at(0, 10, 0, base) == base  # no warmup: start at the peak


def test_sqrt_and_linear_lr_scaling():
    assert math.isclose(simclr.scale_lr(None, "sqrt", 256), 0.075 * 16)
    assert math.isclose(simclr.scale_lr(None, "linear", 256), 0.3)
    assert math.isclose(simclr.scale_lr(0.5, "linear", 512), 1.0)  # --lr overrides the factor


# ----------------------------------------------------------------------------- augmentation


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic max |F_a - F_b|."""
    grid = torch.cat([a, b]).sort().values
    return float(((torch.searchsorted(a.sort().values, grid, right=True) / len(a))
                  - (torch.searchsorted(b.sort().values, grid, right=True) / len(b))).abs().max())


KS_LIMIT = 1.95 * math.sqrt(2 / 20000)  # the 0.1% critical value for two samples of 20,000


@pytest.mark.parametrize("height,width", [(32, 32), (375, 500), (100, 400)])
def test_crop_boxes_match_torchvision_distribution(height, width):
    """Our vectorised RandomResizedCrop against torchvision's get_params, 20,000 draws each:
    area fraction, aspect ratio, and position of the box, compared by KS distance. (100 x 400
    is wider than 4:3, so some draws fall back to the centre crop.)"""
    import torchvision.transforms as T

    n = 20000
    torch.manual_seed(0)
    ours = common.crop_boxes(n, height, width)
    img = torch.zeros(1, height, width)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(n)], dtype=torch.float)
    for boxes in (ours, theirs):
        top, left, h, w = boxes.unbind(1)
        assert ((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)
                & (h > 0) & (w > 0)).all()

    def stats(b):  # area, log aspect, centre y, centre x
        return [b[:, 2] * b[:, 3] / (height * width), (b[:, 3] / b[:, 2]).log(),
                b[:, 0] + b[:, 2] / 2, b[:, 1] + b[:, 3] / 2]

    for name, a, b in zip(("area", "aspect", "centre y", "centre x"), stats(ours), stats(theirs)):
        assert ks_distance(a, b) < KS_LIMIT, name


META_RGB = dict(size=96, channels=3, stats=((0.5, 0.4, 0.3), (0.2, 0.25, 0.3)), folder=False)


@pytest.mark.parametrize("meta", [META_RGB, dict(META_RGB, size=32)])
def test_augmentation_parameters_match_torchvision_distribution(meta):
    """Probabilities (flip 0.5, jitter 0.8, grayscale 0.2, blur 0.5 for photos), jitter
    factors and blur sigma against torchvision's own samplers (KS distance), and the
    jitter order: each of the 24 permutations about equally often."""
    import torchvision.transforms as T

    n, s = 20000, common.recipe(meta)["strength"]
    torch.manual_seed(0)
    floats, jitter, _ = common.sample_augmentation(n, meta)
    order = torch.full((n, 4), -1)
    for i, idx in enumerate(jitter):
        order[idx, i // 4] = i % 4
    jittered = order[:, 0] >= 0
    for frac, p in ((floats[:, 4].mean(), 0.5), (jittered.float().mean(), 0.8),
                    (floats[:, 5].mean(), 0.2),
                    ((floats[:, 10] > 0).float().mean(), 0.5 if meta["size"] > 64 else 0.0)):
        assert abs(float(frac) - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-9
    assert (order[jittered].sort(1).values == torch.arange(4)).all()  # each operation exactly once
    codes = (order[jittered] * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[codes.unique()]
    assert (len(counts) == 24
            and (counts - len(codes) / 24).abs().max() < 5 * math.sqrt(len(codes) / 24))
    ranges = [[max(0, 1 - 0.8 * s), 1 + 0.8 * s]] * 3 + [[-0.2 * s, 0.2 * s]]
    theirs = torch.tensor([T.ColorJitter.get_params(*ranges)[1:] for _ in range(n)])
    for k in range(4):
        assert ks_distance(floats[:, 6 + k], theirs[:, k]) < KS_LIMIT, k
    if meta["size"] > 64:
        sigma = floats[:, 10][floats[:, 10] > 0]
        theirs = torch.tensor([T.GaussianBlur.get_params(0.1, 2.0) for _ in range(n)])
        assert ks_distance(sigma, theirs) < 1.95 * math.sqrt(1 / len(sigma) + 1 / n)


@pytest.mark.parametrize("meta", [META_RGB, dict(META_RGB, size=32),
                                  dict(size=28, channels=1, stats=((0.3,), (0.35,)), folder=False)])
def test_augment_equals_torchvision_per_image(meta):
    """For the same parameters, the batched device augmentation gives torchvision's pixels:
    resized_crop, horizontal_flip, the jitter operations in each sample's order, grayscale,
    gaussian_blur and normalize, one image at a time on float images."""
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    n, size = 48, meta["size"]
    x = torch.randint(0, 256, (n, meta["channels"], size, size), dtype=torch.uint8)
    floats, jitter, _ = common.sample_augmentation(n, meta, size, size)
    out = common.augment(x, floats, jitter, meta, crop=True)
    ops = [[] for _ in range(n)]
    for i, idx in enumerate(jitter):
        for j in idx.tolist():
            ops[j].append(i % 4)
    blur = common.recipe(meta)["blur"]
    for j in range(n):
        top, left, h, w, flip, gray, b, c, s, hue, sigma = floats[j].tolist()
        img = TF.resized_crop(x[j].float() / 255, int(top), int(left), int(h), int(w), [size, size],
                              antialias=True)
        img = TF.horizontal_flip(img) if flip else img
        for op in ops[j]:
            img = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation,
                   TF.adjust_hue)[op](img, (b, c, s, hue)[op])
        img = TF.rgb_to_grayscale(img, 3) if gray else img
        img = TF.gaussian_blur(img, [blur, blur], [sigma, sigma]) if sigma > 0 else img
        torch.testing.assert_close(out[j], TF.normalize(img, *meta["stats"]), atol=2e-3, rtol=0)
    assert sum(map(len, jitter)) > 0 or meta["channels"] == 1


def test_worker_crops_match_full_decode(tmp_path):
    """Crops decodes JPEGs at reduced size (draft) and crops with PIL; against torchvision's
    resized_crop of the fully decoded image with the same boxes, pixels differ by little."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    small = torch.rand(3, 12, 16)
    photo = torch.nn.functional.interpolate(small[None], size=(750, 1000),
                                            mode="bicubic")[0].clamp(0, 1)
    path = str(tmp_path / "a.jpg")
    TF.to_pil_image(photo).save(path, quality=90)
    ds = common.Crops([(path, 3)] * 1, 96, 4)
    torch.manual_seed(1)
    crops, label, index = ds[0]
    assert crops.shape == (4, 3, 96, 96) and crops.dtype == torch.uint8 and (label, index) == (3, 0)
    torch.manual_seed(1)
    boxes = common.crop_boxes(4, 750, 1000)
    full = TF.pil_to_tensor(Image.open(path).convert("RGB")).float()
    for crop, (top, left, h, w) in zip(crops, boxes.int().tolist()):
        ref = TF.resized_crop(full, top, left, h, w, [96, 96], antialias=True)
        # of 255: JPEG's reduced-size decode vs full decode
        assert (crop.float() - ref).abs().mean() < 2.0


@pytest.mark.parametrize("folder", [False, True])
def test_eval_workers_send_uint8_normalised_on_the_device_as_torchvision(folder):
    """The evaluation workers return uint8 (a quarter of float32's shared memory); `features`
    normalises on the device and gets torchvision's float pipeline: resize / centre crop,
    ToDtype(scale), Normalize."""
    import torchvision.transforms.v2 as T
    from PIL import Image

    torch.manual_seed(0)
    meta = dict(META_RGB, size=32, folder=folder)
    images = [torch.randint(0, 256, (3, 40, 50) if folder else (3, 32, 32), dtype=torch.uint8)
              for _ in range(5)]
    base = [(Image.fromarray(x.permute(1, 2, 0).numpy()) if folder else x, 0) for x in images]
    plain = common.eval_transform(meta)
    assert plain(base[0][0]).dtype == torch.uint8
    identity = torch.nn.Conv2d(3, 3, 1, bias=False)  # a 'network' that returns its input, flattened
    torch.nn.init.dirac_(identity.weight)
    net = torch.nn.Sequential(identity, torch.nn.Flatten())
    got, _ = common.features(net, base, plain, 0, "fp32", meta["stats"])
    resize = [T.Resize(36, antialias=True), T.CenterCrop(32)] if folder else []
    reference = T.Compose([T.ToImage(), *resize, T.ToDtype(torch.float32, scale=True),
                           T.Normalize(*meta["stats"])])
    want = torch.stack([reference(img).flatten() for img, _ in base])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- global batch norm


def _bn_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(64, 5),
                               torch.nn.BatchNorm1d(5)).double()


def _bn_worker(r, w, port, xs, weights, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=w)
    try:
        net = torch.nn.parallel.DistributedDataParallel(common.global_batchnorm(_bn_net()))
        results = []
        for x, weight in zip(xs, weights):
            b = len(x) // w
            x = x[r * b:(r + 1) * b].clone().requires_grad_()
            y = net(x)
            # rank r's share of the global objective
            (y * weight[r * b:(r + 1) * b]).sum().backward()
            results.append(dict(y=y.detach(), dx=x.grad,
                                dp=[p.grad.clone() for p in net.parameters()]))
            net.zero_grad()
        net.eval()
        results.append(dict(state=net.module.state_dict(),
                            eval_y=net(xs[0][r * b:(r + 1) * b]).detach()))
        torch.save(results, os.path.join(out, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_batchnorm_equals_one_process_batchnorm(tmp_path):
    """2 gloo ranks, each with half of a batch of 8, through conv-BN2d-ReLU-linear-BN1d under DDP,
    two training steps: the outputs, input gradients, parameter gradients (after DDP's average)
    and running statistics equal one process's nn.BatchNorm on the whole batch. Fails if the
    statistics or the backward's sums stay local."""
    w = 2
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(2)]
    weights = [torch.randn(8, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    mp.spawn(_bn_worker, args=(w, free_port(), xs, weights, str(tmp_path)), nprocs=w)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(w)]
    ref = _bn_net()
    for step, (x, weight) in enumerate(zip(xs, weights)):
        x = x.clone().requires_grad_()
        y = ref(x)
        (y * weight).sum().backward()
        for r, p in enumerate(parts):
            rows = slice(r * 4, (r + 1) * 4)
            torch.testing.assert_close(p[step]["y"], y[rows].detach(), rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(p[step]["dx"], x.grad[rows], rtol=1e-10, atol=1e-12)
            for got, param in zip(p[step]["dp"], ref.parameters()):
                # DDP averages over ranks
                torch.testing.assert_close(got, param.grad / w, rtol=1e-10, atol=1e-12)
        ref.zero_grad()
    ref.eval()
    for r, p in enumerate(parts):
        state = p[-1]["state"]
        assert state.keys() == ref.state_dict().keys()  # checkpoints move between 1 and N processes
        for k, v in ref.state_dict().items():
            torch.testing.assert_close(state[k], v, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p[-1]["eval_y"], ref(xs[0][r * 4:(r + 1) * 4]).detach(),
                                   rtol=1e-10, atol=1e-12)


def test_global_batchnorm_is_identity_without_distributed():
    net = _bn_net()
    assert common.global_batchnorm(net) is net
    assert all(type(m) is not common.GlobalBatchNorm for m in net.modules())


def test_global_batchnorm_traces_whole_and_never_waits_for_the_device():
    """Under a fake 2-rank process group (no peers; collectives return at once), the model that
    the scripts build: dynamo traces its forward as one graph (torch's SyncBatchNorm breaks the
    graph at every layer, pytorch issues 156680 and 161302, and runs only on GPUs), and a
    training forward + backward reaches no op that reads a value back (HostSyncs)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        torch.manual_seed(0)
        net = common.make_model("resnet18", 32, 3, torch.device("cpu"))
        # resnet18's 20 + the projector's
        assert sum(type(m) is common.GlobalBatchNorm for m in net.modules()) == 21
        x = torch.randn(4, 3, 32, 32)
        explain = torch._dynamo.explain(net)(x)
        assert (explain.graph_count, explain.graph_break_count) == (1, 0), explain.break_reasons
        with HostSyncs() as syncs:
            net(x).square().sum().backward()
        assert syncs.found == [], syncs.found
    finally:
        dist.destroy_process_group()
        torch._dynamo.reset()
