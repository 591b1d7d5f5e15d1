"""bench.py: speed, memory and mechanisms of the project's paths next to their baselines.

    python bench.py loss                          # GPU if present, else CPU sizes
    python bench.py loss --device cpu --views 2048,4096,8192
    python bench.py spectral                      # 1.28M x 128 on GPU, 50k on CPU
    python bench.py spectral-toy                  # the paper's synthetic experiment
    python bench.py spectral-deviations           # the official code's choices, one at a time
    python bench.py mechanisms --plot docs/q_vs_batch.png  # docs/methods.md's tables, figure
    python bench.py pipeline                      # ResNet-50, B 256, synthetic JPEG folder
    python bench.py pipeline --data fashion-mnist --arch resnet18 --batch 32
    python bench.py reproduce --dry-run           # docs/results.md's grid: the commands
    python bench.py reproduce --plot accuracy_vs_batch.png  # run it (resumable): table, figure
    python bench.py data-memory --data stl10 --stand-in  # host memory of loading STL-10
    python bench.py gpu --dry-run                 # the GPU parts, what each measures, budgets
    python bench.py gpu --json bench-gpu.json     # all of them on a GPU machine, fail-soft
    python bench.py gpu --toy                     # every part at tiny sizes on the CPU (a test)

The function behind each command (bench_loss, bench_spectral, bench_spectral_toy,
bench_spectral_deviations, bench_mechanisms, bench_pipeline, bench_reproduce, bench_data_memory,
bench_gpu) says
what it measures and against which baseline.
Matplotlib (--plot) and scipy (the Hungarian rows) are imported only where they are used.
"""
import argparse
import copy
import functools
import gc
import json
import math
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision.transforms import v2 as T

import common
from simclr import LARS, info_nce_loss


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_step(views, mode, device, chunk, dim=128, repeats=3):
    """One configuration: seconds per forward + backward and peak extra bytes."""
    torch.manual_seed(0)
    z1 = torch.randn(views // 2, dim, device=device, requires_grad=True)
    z2 = torch.randn(views // 2, dim, device=device, requires_grad=True)
    chunk_size = 0 if mode == "dense" else chunk

    def step():
        info_nce_loss(z1, z2, 0.1, chunk_size=chunk_size).backward()
        z1.grad = z2.grad = None

    if device == "cuda":
        step()  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() - base
    base = _rss()
    step()  # the first step sets the peak
    peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    start = time.perf_counter()
    step()  # the second is timed: pages are mapped, kernels warm
    return time.perf_counter() - start, peak


def measure(views, mode, device, chunk):
    """(seconds, peak extra bytes), or "failed" / "OOM"."""
    if device == "cpu":  # a fresh process, so that the peak RSS is this configuration's
        cmd = [sys.executable, os.path.abspath(__file__), "loss-one", "--views", str(views),
               "--mode", mode, "--device", "cpu", "--chunk", str(chunk)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode} at {views} views failed: {out.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            return "failed"
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return r["seconds"], r["peak_extra_bytes"]
    try:
        return loss_step(views, mode, device, chunk)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def in_units(result):
    """measure's result as (ms, MiB), or its failure twice."""
    if isinstance(result, str):
        return result, result
    return result[0] * 1e3, result[1] / 2**20


def bench_loss(args):
    """InfoNCE forward + backward on `views` random 128-d projections (every view an anchor
    against all views, as on one GPU): the dense path (the baseline: the whole logit matrix,
    torch.logsumexp) against the exact tiled path of common.similarity_logsumexp. Prints time
    per step, peak extra memory, the ratios tiled / dense, and the tiled path's TFLOP/s counted
    as the 3 matmuls of N x N x D that forward + backward need at least (the tiled backward
    does a 4th, the recompute); "OOM" where dense does not fit. On GPU both run in this process
    (peak memory: torch.cuda.max_memory_allocated above the inputs). On CPU every (mode, size)
    runs in a fresh process (`loss-one`): peak RSS above the RSS before the first step, time of
    a second step; a process that dies shows as "failed"."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default = "8192,16384,32768,65536,131072,262144" if device == "cuda" else "1024,2048,4096,8192"
    sizes = [int(v) for v in (args.views or default).split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"InfoNCE forward + backward, D=128, fp32, {name}, torch {torch.__version__}, "
          f"tile {args.chunk}")
    print(f"{'views':>8} {'dense ms':>10} {'dense MiB':>10} {'tiled ms':>10} {'tiled MiB':>10} "
          f"{'time x':>7} {'mem x':>7} {'tiled TFLOP/s':>14}")
    rows = []
    for n in sizes:
        dense = measure(n, "dense", device, args.chunk)
        tiled = measure(n, "chunked", device, args.chunk)
        (d_ms, d_mib), (t_ms, t_mib) = in_units(dense), in_units(tiled)
        ok = not isinstance(dense, str) and not isinstance(tiled, str)
        ratio_t = f"{tiled[0] / dense[0]:.2f}" if ok else "-"
        ratio_m = f"{tiled[1] / max(dense[1], 1):.3f}" if ok else "-"
        tflops = None if isinstance(tiled, str) else 3 * 2 * n * n * 128 / tiled[0] / 1e12
        cells = [x if isinstance(x, str) else f"{x:.{digits}f}"
                 for x, digits in ((d_ms, 1), (d_mib, 0), (t_ms, 1), (t_mib, 0))]
        shown_tflops = "-" if tflops is None else f"{tflops:.2f}"
        print(f"{n:>8} " + " ".join(f"{c:>10}" for c in cells)
              + f" {ratio_t:>7} {ratio_m:>7} {shown_tflops:>14}", flush=True)
        rows.append(dict(views=n, dense_ms=d_ms, dense_mib=d_mib, tiled_ms=t_ms, tiled_mib=t_mib,
                         tiled_tflops=tflops))
    return dict(device=name, chunk=args.chunk, rows=rows)


def bench_spectral(args):
    """Seconds for common.spectral_batches to build one epoch of batches (B 256, 40 clusters per
    chunk) from random 128-d embeddings, 1.28M (ImageNet) on GPU, 50k on CPU. The embedding
    pass is in the training log's `spectral_seconds`."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = int(args.views or (1_281_167 if device == "cuda" else 50_000))
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, 128, generator=g).to(device)
    z2 = z1 + 0.5 * torch.randn(n, 128, generator=g).to(device)
    warm = torch.Generator().manual_seed(1)
    common.spectral_batches(z1[:20480], z2[:20480], 256, generator=warm)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    batches, residual = common.spectral_batches(z1, z2, 256, 0.1, 40,
                                                torch.Generator().manual_seed(2))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"spectral_batches: {n} x 128 embeddings, B 256, 40 clusters per chunk, {name}, "
          f"torch {torch.__version__}: {seconds:.1f} s for {len(batches)} batches, largest "
          f"eigen-residual {residual:.1e} (tolerance {common.EIG_TOL:g})")
    return dict(device=name, n=n, seconds=seconds, batches=len(batches), eig_residual=residual)


def toy_run(mode, seed, n=32, epochs=30, lr=0.5, temperature=0.1):
    """One run of the synthetic experiment; returns the full-batch InfoNCE at the end.

    SGD on the mean InfoNCE over anchors, info_nce_loss as it is. The scripts' train_step
    differentiates 2x the mean, google-research/simclr's scale, for LARS; under plain SGD a
    factor on the loss is one on lr: lr 0.5 here is lr 0.25 on 2x the mean, bit for bit
    (powers of two scale exactly)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 2 * n, generator=g).requires_grad_()
    v = torch.randn(n, 2 * n, generator=g).requires_grad_()
    opt = torch.optim.SGD([u, v], lr=lr)
    for _ in range(epochs):  # n / 2 steps per epoch in both modes
        if mode == "random":
            batches = torch.randperm(n, generator=g).view(-1, 2)
        else:
            batches, _ = common.spectral_batches(u.detach(), v.detach(), 2, temperature, n // 2, g)
        for b in batches:
            opt.zero_grad()
            info_nce_loss(u[b], v[b], temperature).backward()
            opt.step()
    with torch.no_grad():
        return info_nce_loss(u, v, temperature).item()


def bench_spectral_toy(args):
    """Cho et al.'s synthetic experiment: the full-batch InfoNCE after equal SGD steps with random
    and with spectral batches of 2, over three seeds."""
    print("N 32 pairs, d 64, B 2, T 0.1, SGD lr 0.5 on the mean InfoNCE, 30 epochs of 16 steps; "
          "full-batch InfoNCE at the end")
    for mode in ("random", "spectral"):
        losses = [toy_run(mode, seed) for seed in range(3)]
        print(f"{mode:>9}: " + "  ".join(f"{x:.3f}" for x in losses)
              + f"   mean {sum(losses) / 3:.3f}")


def official_style_batches(z1, z2, b, temperature, clusters, g, sqrt_degree=False,
                           hungarian=False, exact=False, one_run=False):
    """common.spectral_batches written out again, with any of the official code's choices
    swapped in (krafton-ai/mini-batch-cl, utils.py, on scikit-learn 0.23 / scipy 1.5):
    sqrt_degree: spectral_embedding divides the eigenvectors by sqrt(degree) and does not
    normalise rows; hungarian: linear_sum_assignment matches onto B copies of each centre;
    exact: torch.linalg.eigh instead of the iterative solver (ARPACK's converged answer);
    one_run: one k-means++ run instead of the best of 10. All False: exactly the batches of
    common.spectral_batches (a test checks it)."""
    u, v = (F.normalize(z.float(), dim=1) / temperature ** 0.5 for z in (z1, z2))
    order, batches = torch.randperm(len(u), generator=g), []
    for start in range(0, len(u) - b + 1, clusters * b):
        idx = order[start:start + clusters * b]
        k = len(idx) // b
        idx = idx[:k * b]
        if k == 1:
            batches.append(idx)
            continue
        uc, vc = u[idx], v[idx]
        pos = (uc * vc).sum(1, keepdim=True)
        shift = math.log(b - 1)
        a = F.softplus(uc @ vc.T - pos + shift) + F.softplus(vc @ uc.T - pos + shift)
        a = (a + a.T).fill_diagonal_(float("-inf"))
        log_d = a.logsumexp(1)
        s = torch.exp(a - log_d[:, None] / 2 - log_d[None, :] / 2)
        if exact:
            q = torch.linalg.eigh(s.double()).eigenvectors[:, -k:].float()
        else:
            q = common._top_eigenvectors(s, k, g)[0]
        emb = q * torch.exp(-log_d / 2)[:, None] if sqrt_degree else F.normalize(q, dim=1)
        dist = torch.cdist(emb, common._kmeans(emb, k, g, restarts=1 if one_run else 10))
        if hungarian:
            from scipy.optimize import linear_sum_assignment  # here only: scipy is no dependency

            cols = linear_sum_assignment(dist.repeat_interleave(b, 1).double().numpy())[1]
            assign = torch.as_tensor(cols // b)
        else:
            assign = common._equal_size_assign(dist, b)
        batches += list(idx[assign.argsort(stable=True)].view(k, b))
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


def deviation_settings():
    """The spectral tests' three settings (test_losses.py): name, z1, z2, B, clusters per chunk."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(200, 32, generator=g)
    z1 = (centres[torch.randint(0, 200, (2560,), generator=g)]
          + 0.7 * torch.randn(2560, 32, generator=g))
    z2 = z1 + 0.3 * torch.randn(2560, 32, generator=g)
    yield "loose 200-cluster mixture, B 64", z1, z2, 64, 40
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 128, generator=g)
    z1 = centres[torch.randint(0, 10, (1280,), generator=g)] + torch.randn(1280, 128, generator=g)
    z2 = z1 + 0.5 * torch.randn(1280, 128, generator=g)
    yield "flat spectrum, 10 classes, B 32", z1, z2, 32, 40
    g = torch.Generator().manual_seed(2)
    z1 = (torch.randn(16, 32, generator=g).repeat_interleave(32, 0)
          + 0.3 * torch.randn(512, 32, generator=g))
    z2 = z1 + 0.3 * torch.randn(512, 32, generator=g)
    yield "16 clustered Gaussians, B 32", z1, z2, 32, 16


def mean_in_batch_loss(z1, z2, batches, temperature=0.1):
    """Cho et al.'s measure of hardness: the mean InfoNCE within each batch (row of indices)."""
    return sum(info_nce_loss(z1[r], z2[r], temperature).item() for r in batches) / len(batches)


def bench_spectral_deviations(args):
    """Cho et al.'s measure of hardness, the mean in-batch InfoNCE, in the spectral tests' three
    synthetic settings: for this code, and with each of the official code's choices in its
    place, over three clustering seeds (the Hungarian rows need scipy)."""
    variants = [("this code", {}),
                ("exact eigenvectors (ARPACK's answer)", dict(exact=True)),
                ("/ sqrt(degree), no row normalisation", dict(exact=True, sqrt_degree=True)),
                ("one k-means run, not 10", dict(exact=True, one_run=True)),
                ("Hungarian equal-size matching", dict(exact=True, hungarian=True)),
                ("official: both", dict(exact=True, sqrt_degree=True, hungarian=True))]
    print("mean in-batch InfoNCE (T 0.1) over clustering seeds 0, 1, 2; higher is harder; "
          f"CPU, {os.cpu_count()} cores")
    table = {}
    for name, z1, z2, b, clusters in deviation_settings():
        print(f"\n{name}, {len(z1)} pairs, {clusters} clusters per chunk")
        seeds = [torch.Generator().manual_seed(s) for s in range(3)]
        random = [torch.randperm(len(z1), generator=g)[:len(z1) // b * b].view(-1, b)
                  for g in seeds]
        rows = [("random", [mean_in_batch_loss(z1, z2, r) for r in random])]
        for label, flags in variants:
            seeds = [torch.Generator().manual_seed(s) for s in range(3)]
            try:
                found = [official_style_batches(z1, z2, b, 0.1, clusters, g, **flags)
                         for g in seeds]
                rows.append((label, [mean_in_batch_loss(z1, z2, r) for r in found]))
            except ImportError:
                rows.append((label, "needs scipy (pip install scipy)"))
        for label, values in rows:
            if isinstance(values, str):
                shown = values
            else:
                shown = "  ".join(f"{x:.4f}" for x in values) + f"   mean {sum(values) / 3:.4f}"
            print(f"{label:>40}: {shown}")
        table[name] = dict(rows)
    return table


# ----------------------------------------------------------------------------- mechanisms


def q_values(z1, z2, temperature):
    """q = 1 - p+ per anchor (2B,), p+ InfoNCE's softmax probability of the positive within the
    batch. Per anchor, InfoNCE's term is logaddexp(neg, pos) - pos and DCL's neg - pos (pos =
    s_ip/T, neg = log sum over N_i), so d InfoNCE / d (pos, neg) = (-q, q) = q x d DCL /
    d (pos, neg): q is the coupling that DCL (and FlatNCE) removes."""
    _, positive, negative = common.two_view_terms(z1, z2, temperature, 0)
    return torch.sigmoid(negative - positive)  # exp(neg) / (exp(neg) + exp(pos))


@torch.no_grad()
def embed_test_views(model, n, seed, root="./data"):
    """Projections (n, 128) of two augmented views of the first n Fashion-MNIST test images, as
    the loss sees them in training: the training augmentation, BN in train mode (on a copy: the
    model is unchanged). BN's statistics are over 256 images (512 views) at a time whatever
    the B of the table, those of a B 256 batch; BN over each batch of 16 instead gives the
    random backbone's q at B 16, T 0.1 as 0.925 against 0.928 (a one-off check)."""
    _, val, meta = common.base_datasets("fashion-mnist", root)
    images = torch.utils.data.TensorDataset(val.tensors[0][:n], val.tensors[1][:n])
    net, z = copy.deepcopy(model).train(), []
    torch.manual_seed(seed)
    rows = torch.arange(n).view(-1, 256)
    for views, _ in common.augmented_batches(images, meta, rows, 2, 0, torch.device("cpu")):
        z.append(common.forward_views(net, views))
    return [torch.cat(zv).cpu() for zv in zip(*z)]  # a pretrained model may be on a GPU


def q_table(z1, z2, sizes, temperatures, seed=0):
    """{(T, B): (mean, 10th, 90th percentile) of q} over all 2n anchors, the n images cut at
    random into n / B batches."""
    g, out = torch.Generator().manual_seed(seed), {}
    for b in sizes:
        rows = torch.randperm(len(z1), generator=g)[:len(z1) // b * b].view(-1, b)
        for t in temperatures:
            q = torch.cat([q_values(z1[r], z2[r], t) for r in rows])
            out[t, b] = (q.mean().item(), *torch.quantile(q, torch.tensor([0.1, 0.9])).tolist())
    return out


def short_pretraining(subset, epochs, out_dir):
    """SimCLR as the quick start trains it (simclr.pretrain with its flags) on fewer images: the
    model after it."""
    import simclr

    args = simclr.get_parser().parse_args([
        "--data", "fashion-mnist", "--arch", "resnet18", "--subset", str(subset),
        "--batch", "128", "--epochs", str(epochs), "--warmup-epochs", "0.5", "--workers", "0",
        "--knn-every", "0", "--out-dir", out_dir])
    simclr.check_args(args)
    args.n_views = 2
    device = simclr.setup(args)
    train_set, meta = common.train_dataset(args.data, args.data_root, args.subset, args.seed, 2,
                                           device)
    model = common.make_model(args.arch, meta["size"], meta["channels"], device)
    criterion = simclr.make_criterion(args, len(train_set), device)
    simclr.pretrain(args, model, train_set, meta, criterion)
    return model


def toy_objectives(u, v, temperature):
    """The exact full-data objectives of N pairs, the whole data as one batch of
    common.two_view_terms: InfoNCE, the mean over the 2N anchors of
    -log(exp(s_ip/T) / sum_{k != i} exp(s_ik/T)); SogCLR's global contrastive objective (the
    paper's eq. 3, in units of 1/T), the mean of -s_ip/T + log(mean_{k not i, p} exp(s_ik/T));
    and that exact mean per anchor, (2N,), the value u_i estimates. A test checks them against
    a naive loop and the losses."""
    _, positive, negative = common.two_view_terms(u, v, temperature, 0)
    log_u = negative - math.log(2 * len(u) - 2)
    info_nce = (torch.logaddexp(negative, positive) - positive).mean().item()
    return info_nce, (log_u - positive).mean().item(), log_u.exp()


def mechanism_run(method, b, seed, steps, n=64, lr=0.5, temperature=0.1, gamma=None):
    """Cho et al.'s synthetic setting for every two-view method: N trainable pairs (u_i, v_i)
    in d = 2N, `steps` SGD steps at batch b on the gradient of `method`'s formula averaged over
    anchors, which is what each loss differentiates (SogCLR: its surrogate). The scripts'
    train_step multiplies by the reference code's factor for LARS; plain SGD here does not.
    Returns the exact full-batch InfoNCE and global contrastive objective at the end, for
    SogCLR the mean relative error, per step, of u_i^k (the moving average the gradient uses)
    and of g_i^k (the batch estimate) against the exact full-data mean that both estimate at
    the same parameters, and the mean norm of the free vectors."""
    from dcl import dcl_loss
    from flatnce import flatnce_loss
    from sogclr import SogCLRLoss

    g = torch.Generator().manual_seed(seed)
    u, v = (torch.randn(n, 2 * n, generator=g).requires_grad_() for _ in range(2))
    opt = torch.optim.SGD([u, v], lr=lr)
    sog = SogCLRLoss(n, temperature, gamma) if method == "sogclr" else None
    errors, done = [], 0
    while done < steps:  # epochs; the last may stop midway: every batch size gets `steps` steps
        if method == "simclr-spectral":
            batches, _ = common.spectral_batches(u.detach(), v.detach(), b, temperature, n // b, g)
        else:
            batches = torch.randperm(n, generator=g)[:n // b * b].view(-1, b)
        for idx in batches[:steps - done]:
            z1, z2 = u[idx], v[idx]
            if sog is not None:
                with torch.no_grad():  # the estimates the step is about to use, and the exact value
                    exact = toy_objectives(u, v, temperature)[2][torch.cat([idx, idx + n])]
                    u_old = sog.u[idx].repeat(2)
                    negative = common.two_view_terms(z1, z2, temperature)[2]
                    g_batch = torch.exp(negative - math.log(2 * b - 2))
                    moved = (1 - gamma) * u_old + gamma * g_batch
                    u_new = torch.where(u_old == 0, g_batch, moved)  # first visit: g
                loss, _ = sog(z1, z2, idx)  # the surrogate, whose gradient is the formula's
                # the loss's own u after the step is the view average of u_new: a check on this copy
                if not torch.allclose(sog.u[idx], u_new.view(2, b).mean(0), rtol=1e-5):
                    raise RuntimeError("bench's copy of u's update differs from SogCLRLoss's")
                u_error = ((u_new - exact).abs() / exact).mean().item()
                g_error = ((g_batch - exact).abs() / exact).mean().item()
                errors.append((u_error, g_error))
            elif method == "dcl":
                loss = dcl_loss(z1, z2, temperature)
            elif method == "flatnce":
                loss, _ = flatnce_loss(z1, z2, temperature)
            else:
                loss = info_nce_loss(z1, z2, temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    with torch.no_grad():  # the vectors' norm: SGD grows it, which shrinks the step on the sphere
        norm = torch.cat([u, v]).norm(dim=1).mean().item()
        return (*toy_objectives(u, v, temperature)[:2], errors, norm)


MECHANISMS = (("SimCLR, random batches", "simclr", None),
              ("SimCLR, spectral batches", "simclr-spectral", None),
              ("DCL", "dcl", None),
              ("FlatNCE", "flatnce", None),
              ("SogCLR, gamma 0.9", "sogclr", 0.9),
              ("SogCLR, gamma 0.1", "sogclr", 0.1))


def mechanism_backbones(args, meta):
    """[(label, resnet18)]: a random one and a pretrained one (--checkpoint, or trained here)."""
    def resnet18():
        return common.make_model("resnet18", meta["size"], meta["channels"], torch.device("cpu"))

    backbones = [("random init", resnet18())]
    if args.checkpoint:
        model = resnet18()
        try:
            saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
        except Exception as e:
            sys.exit(f"error: --checkpoint {args.checkpoint} is not a simclr.py checkpoint of "
                     f"resnet18 on fashion-mnist ({type(e).__name__}); give the quick start's "
                     "runs/demo/checkpoint.pt, or leave --checkpoint out")
        backbones.append((f"pretrained ({args.checkpoint})", model))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-mechanisms-") as d:
            label = (f"pretrained here: SimCLR, {args.pretrain_images} images, "
                     f"{args.pretrain_epochs} epochs at B 128")
            model = short_pretraining(args.pretrain_images, args.pretrain_epochs, d)
            backbones.append((label, model))
    return backbones


def bench_mechanisms(args):
    """The mechanism each paper names, measured on a CPU in minutes (toy scale, not the papers'
    accuracy claims; docs/methods.md). 1: q = 1 - p+ per anchor (InfoNCE's gradient is q x
    DCL's; FlatNCE's is DCL's) for B 16 to 512 at T 0.1 and 0.5, on two views of --q-images
    Fashion-MNIST test images, from a random resnet18 and a pretrained one (--checkpoint, or
    SimCLR trained here on --pretrain-images for --pretrain-epochs at B 128 with the quick
    start's recipe); --plot draws q against B. 2: Cho et al.'s synthetic setting (64 pairs,
    d 128, T 0.1) for every two-view method at B 2 to 16 and --toy-steps SGD steps, 3 seeds:
    the exact full-batch InfoNCE and global contrastive objective at the end; 2b: a
    learning-rate sweep at B 2. 3: from the same SogCLR runs, the relative error of u_i and of
    the batch estimate g_i against the exact mean."""
    hardware = f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        hardware = f"{torch.cuda.get_device_name()} for the pretraining, else " + hardware
    report = dict(hardware=hardware, command="python " + " ".join(sys.argv))
    start = time.time()
    # 1. q = 1 - p+ on Fashion-MNIST test images
    sizes, temperatures, n = (16, 32, 64, 128, 256, 512), (0.1, 0.5), args.q_images
    if not sizes[-1] <= n <= 9984 or n % 256 or args.toy_steps < 4:
        sys.exit("error: --q-images must be a multiple of 256 from 512 (the largest batch) to "
                 "9984 (of the 10,000 test images), --toy-steps at least 4")
    torch.manual_seed(0)
    try:
        meta = common.base_datasets("fashion-mnist", "./data")[2]
    except common.BadInput as e:
        sys.exit(f"error: {e}")
    backbones = mechanism_backbones(args, meta)
    print(f"\n1. q = 1 - p+ (InfoNCE's factor on DCL's gradient) over the {2 * n} anchors of {n} "
          f"Fashion-MNIST test images' two views, resnet18 projections; mean [10th, 90th "
          f"percentile]; {hardware}")
    print(f"{'backbone':>60} {'T':>4} " + " ".join(f"{'B ' + str(b):>20}" for b in sizes))
    report["q"] = []
    for label, model in backbones:
        z1, z2 = embed_test_views(model, n, seed=1)
        table = q_table(z1, z2, sizes, temperatures)
        for t in temperatures:
            cells = " ".join(f"{'%.3f [%.3f, %.3f]' % table[t, b]:>20}" for b in sizes)
            print(f"{label:>60} {t:>4} " + cells)
            report["q"].append(dict(backbone=label, temperature=t,
                                    **{str(b): table[t, b] for b in sizes}))
    print(f"({time.time() - start:.0f} s so far)")

    # 2. and 3. the synthetic setting at equal steps
    seeds, batch_sizes = range(3), (2, 4, 8, 16)
    print(f"\n2. N 64 pairs, d 128, T 0.1, SGD lr 0.5 on each formula's mean gradient, "
          f"{args.toy_steps} steps at every batch size, seeds 0-2: the exact full-batch InfoNCE "
          f"/ global contrastive objective at the end, mean +- std")
    print(f"{'method':>26} " + " ".join(f"{'B ' + str(b):>26}" for b in batch_sizes))
    report["toy"], errors = [], {}
    for label, method, gamma in MECHANISMS:
        cells = []
        for b in batch_sizes:
            runs = [mechanism_run(method, b, s, args.toy_steps, gamma=gamma) for s in seeds]
            info, gcl = [r[0] for r in runs], [r[1] for r in runs]
            cells.append((statistics.mean(info), statistics.stdev(info),
                          statistics.mean(gcl), statistics.stdev(gcl)))
            if method == "sogclr":  # (steps, 2), the seeds' mean
                errors[gamma, b] = torch.stack([torch.tensor(r[2]) for r in runs]).mean(0)
        print(f"{label:>26} " + " ".join(f"{'%.3f+-%.3f / %.3f+-%.3f' % c:>26}" for c in cells))
        report["toy"].append(dict(method=label, **{str(b): c for b, c in zip(batch_sizes, cells)}))
    init = mechanism_run("dcl", 2, 0, 0)[:2]  # no steps: seed 0's starting point
    # The minimum of both over the sphere: the 64 pairs at the corners of a regular simplex,
    # every other cosine -1/63.
    floor = math.log1p(126 * math.exp((-1 / 63 - 1) / 0.1)), -1 / 0.1 + (-1 / 63) / 0.1
    print("seed 0's initialisation: %.3f / %.3f; the minimum (a regular simplex): %.3f / %.3f"
          % (*init, *floor))
    # The factor q acts like a per-anchor learning rate: how much of the gap does a tuned lr
    # close? FlatNCE is left out: its gradient is DCL's, so its runs are DCL's.
    lrs = (0.125, 0.5, 2, 8, 32, 128)
    print(f"\n2b. learning rate at B 2, seed 0, {args.toy_steps} steps: full-batch InfoNCE / GCL "
          f"(mean |u_i| at the end; it starts at 11.3)")
    print(f"{'method':>26} " + " ".join(f"{'lr ' + str(lr):>22}" for lr in lrs))
    report["lr"] = []
    for label, method, gamma in MECHANISMS:
        if method == "flatnce":
            continue
        runs = [mechanism_run(method, 2, 0, args.toy_steps, lr=lr, gamma=gamma) for lr in lrs]
        print(f"{label:>26} "
              + " ".join(f"{'%.3f / %.2f (%.0f)' % (r[0], r[1], r[3]):>22}" for r in runs))
        report["lr"].append(dict(method=label,
                                 **{str(lr): (r[0], r[1], r[3]) for lr, r in zip(lrs, runs)}))
    print(f"({time.time() - start:.0f} s so far)")
    print(f"\n3. SogCLR: mean relative error of u_i (moving average) and g_i (batch estimate) "
          f"against the exact full-data mean, per quarter of the {args.toy_steps} steps, seeds "
          f"0-2 averaged")
    report["estimator"] = []
    for (gamma, b), e in sorted(errors.items()):
        if b not in (4, 16):
            continue
        quarters = [w.mean(0).tolist() for w in torch.tensor_split(e, 4)]
        print(f"gamma {gamma} B {b:>2}: "
              + "   ".join(f"u {a:.3f} g {c:.3f}" for a, c in quarters))
        report["estimator"].append(dict(gamma=gamma, batch=b, quarters=quarters))
    print(f"\nbench mechanisms took {time.time() - start:.0f} s; {hardware}")
    if args.plot:
        plot_q(report["q"], sizes, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def plot_q(rows, sizes, path):
    """q against batch size, mean and the 10th-90th percentile band, one line per backbone and
    T."""
    import matplotlib  # here only: matplotlib is no dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        mean, lo, hi = zip(*(r[str(b)] for b in sizes))
        label = f"{r['backbone'].split(':')[0]}, T {r['temperature']}"
        line, = ax.plot(sizes, mean, marker="o", label=label)
        ax.fill_between(sizes, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size B (images)", ylabel="q = 1 - p+ (mean, 10th-90th percentile)",
           ylim=(0, 1.02), title="InfoNCE's gradient factor on Fashion-MNIST test images")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------- pipeline


class Views(Dataset):
    """(views, label, index) of a dataset of (image, label): n_views draws of `transform` each."""

    def __init__(self, base, transform, n_views):
        self.base, self.transform, self.n_views = base, transform, n_views

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return torch.stack([self.transform(img) for _ in range(self.n_views)]), label, i


def torchvision_transform(meta):
    """The baseline: SimCLR's recipe as torchvision composes it, one image at a time on the CPU
    (PIL operations for photos, uint8 tensor operations for the small sets)."""
    rec = common.recipe(meta)
    s = rec["strength"]
    ops = [T.RandomResizedCrop(meta["size"], scale=(0.08, 1.0), antialias=True),
           T.RandomHorizontalFlip()]
    if rec["colour"]:
        ops += [T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
                T.RandomGrayscale(p=0.2)]
    if rec["blur"]:
        ops += [T.RandomApply([T.GaussianBlur(rec["blur"], sigma=(0.1, 2.0))], p=0.5)]
    return T.Compose(ops + [T.ToImage(), T.ToDtype(torch.float32, scale=True),
                            T.Normalize(*meta["stats"])])


def _photo(i, out, size=(375, 500)):
    """A photo-like image: smooth colour regions, texture at two scales, sensor noise."""
    g = torch.Generator().manual_seed(i)
    x = sum(a * F.interpolate(torch.rand(1, 3, 3 * k, 4 * k, generator=g), size=size,
                              mode="bicubic")
            for a, k in ((0.7, 2), (0.2, 12), (0.1, 48)))
    x = (x + 0.03 * torch.randn(1, 3, *size, generator=g)).clamp(0, 1)[0]
    cls = os.path.join(out, "train", f"c{i % 10}")
    os.makedirs(cls, exist_ok=True)
    T.functional.to_pil_image(x).save(os.path.join(cls, f"{i}.jpg"), quality=90)


def jpeg_folder(n, root="data/bench-jpeg"):
    done = sum(len(f) for _, _, f in os.walk(root)) if os.path.isdir(root) else 0
    if done != n:
        import shutil
        from multiprocessing import Pool

        shutil.rmtree(root, ignore_errors=True)
        torch.set_num_threads(1)
        with Pool(os.cpu_count()) as pool:
            pool.starmap(_photo, [(i, root) for i in range(n)])
        torch.set_num_threads(os.cpu_count())
    return root


def timed(batches, step, warmup, steps, device):
    """Views per second over `steps` steps after `warmup` steps (worker start-up excluded)."""
    it = iter(batches)
    for _ in range(warmup):
        step(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize()
    tick, n = time.perf_counter(), 0
    for _ in range(steps):
        views = next(it)
        step(views)
        n += views.shape[0] * views.shape[1]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - tick)


def no_step(views):
    """The data-only rate: the batches are made and dropped."""


def bench_pipeline(args):
    """Views/s of a SimCLR training step (forward, loss, backward, LARS) fed three ways: (a)
    random views already on the device (the compute bound); (b) the project's data path
    (common.augmented_batches: workers decode and crop JPEGs, the device does the rest; small
    sets live on the device); (c) the plain torchvision CPU pipeline, the same recipe per image
    in as many workers. Also (b) and (c) without the step ("data only"), b/a and b/c, with
    --compile off and on (GPU), and when --batch is not --ref-batch the epoch time at --batch
    over that at --ref-batch (path b). --data: an ImageFolder root, a named small set, or
    nothing: --images synthetic photo-like JPEGs under data/bench-jpeg. --save-grid PATH writes
    8 images' two views from (b) (top rows) and (c) (bottom rows)."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = args.data or jpeg_folder(args.images)
    folder = root not in common.NAMED
    if folder:
        train = torchvision.datasets.ImageFolder(os.path.join(root, "train"),
                                                 loader=common.load_image)
        meta = dict(size=224, channels=3, classes=len(train.classes), stats=common.IMAGENET_STATS,
                    folder=True)
    else:
        train, _, meta = common.base_datasets(root, "./data")
    precision = "bf16" if device.type == "cuda" else "fp32"
    total = args.warmup + args.steps
    hardware = (torch.cuda.get_device_name() if device.type == "cuda"
                else f"{os.cpu_count()} CPU cores")
    print(f"{device.type} ({hardware}), torch {torch.__version__}; {args.arch}, batch "
          f"{args.batch}, 2 views, {args.workers} workers, "
          f"{'folder ' + root if folder else root} ({len(train)} images); {args.steps} timed "
          f"steps after {args.warmup}")

    if folder:
        ours = common.Crops(train.samples, meta["size"], 2)
    else:
        ours = torch.utils.data.TensorDataset(train.tensors[0].to(device))
    theirs = Views(train, torchvision_transform(meta), 2)

    def project(batch, rows=None):  # (b): random global batches, as many as the timing needs
        if rows is None:
            rows = torch.stack([torch.randperm(len(train))[:batch] for _ in range(total)])
        return (v for v, _ in common.augmented_batches(ours, meta, rows, 2, args.workers, device))

    def baseline(batch):  # (c): torchvision per image in the workers, then copied to the device
        data = DataLoader(theirs, batch, sampler=RandomSampler(theirs, num_samples=total * batch),
                          num_workers=args.workers, pin_memory=device.type == "cuda",
                          drop_last=True)
        return (v.to(device, non_blocking=True).transpose(0, 1) for v, _, _ in data)

    if args.save_grid:
        mean, std = (torch.tensor(s)[None, :, None, None] for s in meta["stats"])
        ours_grid = next(project(8, torch.arange(8)[None])).cpu()
        theirs_grid = torch.stack([theirs[i][0] for i in range(8)], 1)
        views = torch.cat([*ours_grid, *theirs_grid])
        views = F.interpolate(views * std + mean, size=min(112, meta["size"]), mode="bilinear",
                              antialias=True)
        torchvision.utils.save_image(views.clamp(0, 1), args.save_grid, nrow=8, padding=2)
        print(f"wrote {args.save_grid}: 8 images; rows 1-2 their two views from (b), rows 3-4 "
              f"from (c)")
        if not args.steps:
            return dict(grid=args.save_grid)

    default = "both" if device.type == "cuda" else "off"
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or default]
    results = {}
    for compiled in compiles:
        torch.manual_seed(0)
        model = common.make_model(args.arch, meta["size"], meta["channels"], device)
        opt = LARS(model.parameters(), lr=0.1, weight_decay=1e-6)
        net = torch.compile(model) if compiled else model

        def step(views):
            z1, z2 = common.forward_views(net, views, precision)
            loss = info_nce_loss(z1, z2, 0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def fixed(batch):
            x = torch.randn(2, batch, meta["channels"], meta["size"], meta["size"], device=device)
            return (x for _ in range(total))

        row = dict(a=timed(fixed(args.batch), step, args.warmup, args.steps, device),
                   b=timed(project(args.batch), step, args.warmup, args.steps, device),
                   c=timed(baseline(args.batch), step, args.warmup, args.steps, device))
        if args.batch != args.ref_batch:
            row["b_ref"] = timed(project(args.ref_batch), step, args.warmup, args.steps, device)
        results[compiled] = row
    data_b = timed(project(args.batch), no_step, args.warmup, args.steps, device)
    data_c = timed(baseline(args.batch), no_step, args.warmup, args.steps, device)
    print(f"{'compile':>8} {'(a) bound':>10} {'(b) ours':>10} {'(c) tv':>10} {'b/a':>6} "
          f"{'b/c':>6}   views/s")
    for compiled, r in results.items():
        r.update(b_over_a=r["b"] / r["a"], b_over_c=r["b"] / r["c"])
        epoch = ""
        if "b_ref" in r:
            r["epoch_ratio"] = r["b_ref"] / r["b"]
            epoch = (f"   epoch time batch {args.batch} / batch {args.ref_batch}: "
                     f"{r['epoch_ratio']:.2f}")
        print(f"{'on' if compiled else 'off':>8} {r['a']:10.0f} {r['b']:10.0f} {r['c']:10.0f} "
              f"{r['b_over_a']:6.2f} {r['b_over_c']:6.2f}" + epoch)
    print(f"data only (no step): (b) {data_b:.0f}  (c) {data_c:.0f}  views/s, "
          f"b/c {data_b / data_c:.2f}")
    views_per_s = {"on" if c else "off": r for c, r in results.items()}
    return dict(data=root, images=len(train), arch=args.arch, batch=args.batch,
                ref_batch=args.ref_batch, views_per_s=views_per_s, data_only_b=data_b,
                data_only_c=data_c)


# ----------------------------------------------------------------------------- reproduce


GRID = (("SimCLR", "simclr.py", []),
        ("SogCLR", "sogclr.py", []),
        ("DCL", "dcl.py", []),
        ("DCLW", "dcl.py", ["--dcl-sigma", "0.5"]),
        ("FlatNCE", "flatnce.py", []),
        ("Poly-View M=4", "polyview.py", ["--pv-views", "4", "--pv-objective", "geometric"]),
        ("Poly-View M=4, equal views", "polyview.py",
         ["--pv-views", "4", "--pv-objective", "geometric", "HALF"]),
        ("SimCLR, spectral batches", "simclr.py", ["--batching", "spectral"]))


def mean_std(xs):
    """'mean ± std', or the mean alone for one value."""
    return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def last(records, key):
    """The last logged value of `key`."""
    return [r[key] for r in records if key in r][-1]


def reproduce_cell(args, name, script, flags, batch, seed):
    """One run of the grid, skipped when its log already holds a linear top-1: its results, or
    None with --dry-run (the command is printed)."""
    # equal views: M = 4 views for half the epochs process as many views as 2 views for all
    epochs = args.epochs // 2 if "HALF" in flags else args.epochs
    out = os.path.join(args.runs, f"{re.sub('[^a-z0-9]+', '-', name.lower())}-b{batch}-s{seed}")
    cmd = [sys.executable, script, "--data", args.data or "fashion-mnist", "--arch", "resnet18",
           "--batch", str(batch), "--epochs", str(epochs),
           "--warmup-epochs", str(min(10, epochs / 10)), "--temperature", str(args.temperature),
           "--subset", str(args.subset), "--seed", str(seed), "--knn-every", str(epochs),
           "--workers", "0", "--out-dir", out] + [f for f in flags if f != "HALF"]
    if args.dry_run:
        print(" ".join(cmd[1:]))
        return None
    log = os.path.join(out, "log.jsonl")
    records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
    if not any("linear_top1" in r for r in records):
        tick = time.time()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        records = [json.loads(line) for line in open(log)]
        records.append(dict(wall_seconds=time.time() - tick))
        with open(log, "a") as f:
            f.write(json.dumps(records[-1]) + "\n")
    sc = [(r["spectral_batch_loss"], r["random_batch_loss"])
          for r in records if "spectral_batch_loss" in r]
    return dict(lin=last(records, "linear_top1"), knn=last(records, "knn_top1"),
                wall=last(records, "wall_seconds"), sc=sc[-1] if sc else None)


def bench_reproduce(args):
    """The results grid of docs/results.md: every method at every --batches size and --seeds
    seed, resnet18 (CIFAR stem), equal epochs and T; each run in its own folder under --runs,
    skipped when its log holds a linear top-1, so an interrupted grid resumes. Prints a
    markdown table of linear and kNN top-1 (mean +- std over seeds) and minutes per run;
    --plot draws accuracy against batch size."""
    rows = []
    for name, script, flags in GRID:
        for batch in map(int, args.batches.split(",")):
            cell = [reproduce_cell(args, name, script, flags, batch, seed)
                    for seed in map(int, args.seeds.split(","))]
            if not args.dry_run:
                rows.append(dict(method=name, batch=batch, cell=cell))
    if args.dry_run:
        return
    print("| method | batch | linear top-1 | kNN top-1 | seeds | minutes per run | in-batch loss, "
          "last rebuild: spectral / random |\n| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        sc = [c["sc"] for c in r["cell"] if c["sc"]]
        minutes = statistics.mean(c["wall"] for c in r["cell"]) / 60
        hardness = f"{mean_std([s for s, _ in sc])} / {mean_std([q for _, q in sc])}" if sc else ""
        print(f"| {r['method']} | {r['batch']} | {mean_std([c['lin'] for c in r['cell']])} "
              f"| {mean_std([c['knn'] for c in r['cell']])} | {len(r['cell'])} | {minutes:.1f} | "
              + hardness + " |")
    if args.plot:
        plot_accuracy(rows, args)


def plot_accuracy(rows, args):
    """Linear and kNN top-1 against batch size, mean and std over seeds, one line per method."""
    import matplotlib  # here only: matplotlib is no dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for ax, key in zip(axes, ("lin", "knn")):
        for name in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == name]
            ys = [[c[key] for c in r["cell"]] for r in mine]
            ax.errorbar([r["batch"] for r in mine], [statistics.mean(y) for y in ys],
                        yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys], marker="o",
                        capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size")
        ax.set_ylabel(("linear" if key == "lin" else "kNN") + " top-1 (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{args.data or 'fashion-mnist'}, resnet18, {args.epochs} epochs, "
                 f"T {args.temperature}"
                 + (f", {args.subset} training images" if args.subset else ""))
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


# ----------------------------------------------------------------------------- gpu


FMNIST_FILES = [f"{p}-{k}-idx{d}-ubyte.gz"
                for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
METHODS = ("simclr", "sogclr", "dcl", "flatnce", "polyview")


def fmnist_problem(root):
    """Why Fashion-MNIST cannot be read from `root`, or None. Checked here: common would
    otherwise try a download, which a GPU machine without internet cannot do."""
    missing = [f for f in FMNIST_FILES if not os.path.isfile(os.path.join(root, f))]
    if not missing:
        return None
    return (f"no {missing[0]} in {root}: mkdir -p data/fashion-mnist && cp "
            "/usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/ here, carry "
            "data/fashion-mnist to the GPU machine, or set --fmnist-dir")


def train_run(script, flags, out):
    """One in-process run of a method script (its main() reads sys.argv): images/s from its
    log.jsonl and the peak GPU memory of the whole run (training and the 1-epoch probe)."""
    module = __import__(script)
    cuda = torch.cuda.is_available()
    # a fresh folder: a checkpoint there would resume
    with tempfile.TemporaryDirectory(prefix=f"bench-{script}-") as d:
        argv, sys.argv = sys.argv, [script + ".py", *map(str, flags), "--out-dir", d]
        out["argv"] = sys.argv[1:-2]
        try:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            module.main()
        finally:
            sys.argv = argv
        records = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))]
    rates = [r["img_per_s"] for r in records if "img_per_s" in r]
    # the first logged rate includes cudnn autotuning and allocator warm-up
    out.update(img_per_s=statistics.median(rates[1:] or rates), img_per_s_logged=rates,
               peak_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
               linear_top1=last(records, "linear_top1"))


def gpu_parts(args):
    """[(name, what it measures, budget in s, fn(out))]: fn fills `out`, so a part that fails
    midway keeps what it measured. The GPU budgets add up to 450 s; they are estimates, not
    measurements."""
    toy = args.toy
    steps = ("--warmup", 0, "--steps", 1) if toy else ("--warmup", 5, "--steps", 20)
    # separate calls: a slow compile loses only its own rows
    compiles = ("off",) if toy else ("off", "on")

    def cli(*flags):
        return parser().parse_args([str(x) for x in flags])

    def pipeline(out):
        sizes = ()
        if toy:
            sizes = ("--data", jpeg_folder(16, "data/bench-jpeg-toy"), "--arch", "resnet18",
                     "--batch", 4, "--ref-batch", 4, "--workers", 1)
        for c in compiles:
            out[c] = bench_pipeline(cli("pipeline", *sizes, *steps, "--compile", c))

    def pipeline_fmnist(out):
        if fmnist_problem(common.DEBIAN_FMNIST):
            raise FileNotFoundError(fmnist_problem(common.DEBIAN_FMNIST))
        sizes = ("--batch", 8, "--ref-batch", 16, "--workers", 1) if toy else ("--batch", 32)
        for c in compiles:
            out[c] = bench_pipeline(cli("pipeline", "--data", "fashion-mnist", "--arch", "resnet18",
                                        *sizes, *steps, "--compile", c))

    views, n = ("512", 2048) if toy else ("", 1_281_167)

    def loss(out):
        out.update(bench_loss(cli("loss", *(("--views", views) if views else ()))))

    def spectral(out):
        out.update(bench_spectral(cli("spectral", "--views", n)))

    if toy:
        data = ("--data", "synthetic", "--subset", 16, "--batch", 8, "--workers", 0,
                "--log-every", 1, "--lin-batch", 8)
    elif not fmnist_problem(common.DEBIAN_FMNIST):  # 40 steps at B 256, a rate logged every 10
        data = ("--data", "fashion-mnist", "--subset", 10240, "--batch", 256, "--workers", 8,
                "--log-every", 10, "--lin-batch", 256)
    else:  # no Fashion-MNIST copy: the 384 synthetic images, 6 steps of 64
        data = ("--data", "synthetic", "--batch", 64, "--workers", 8, "--log-every", 2,
                "--lin-batch", 64)
    flags = data + ("--arch", "resnet18", "--epochs", 1, "--warmup-epochs", 1, "--knn-every", 0,
                    "--lin-epochs", 1)
    batch = data[data.index("--batch") + 1]
    shown = ", ".join(compiles)
    parts = [("pipeline", f"{'resnet18 B 4' if toy else 'ResNet-50 B 256'} views/s: compute bound "
              f"(a), our data path (b), torchvision (c); compile {shown}", 190, pipeline),
             ("pipeline-fmnist", f"Fashion-MNIST resnet18 B {8 if toy else 32} views/s (a, b, c) "
              f"and epoch time over B {16 if toy else 256}'s; compile {shown}", 80,
              pipeline_fmnist),
             ("loss", f"InfoNCE fwd+bwd, dense vs tiled, {views or '8k to 256k'} views: ms, MiB, "
              "TFLOP/s", 45, loss),
             ("spectral", f"spectral_batches over {n} x 128 embeddings: seconds", 45, spectral)]
    parts += [(f"train-{m}", f"{m}.py, 1 epoch of {data[1]} at B {batch}: img/s, peak MiB", 18,
               functools.partial(train_run, m, flags)) for m in METHODS]
    # toy: slack for shared CPUs
    return [(name, what, 120 if toy else budget, fn) for name, what, budget, fn in parts]


def run_part(name, budget, fn):
    """Fail-soft: an exception (SystemExit too) or going over `budget` seconds (SIGALRM, so only
    between Python bytecodes: a hung CUDA kernel is not interrupted) marks the part failed; the
    rest still runs."""
    def over(signum, frame):
        raise TimeoutError(f"over its {budget} s budget")

    out, error, trace = {}, None, None
    old = signal.signal(signal.SIGALRM, over)
    tick = time.perf_counter()
    try:
        try:
            signal.alarm(budget)
            fn(out)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    except (Exception, SystemExit) as e:
        lines = str(e).strip().splitlines()
        error, trace = f"{type(e).__name__}: {lines[-1] if lines else ''}", traceback.format_exc()
        print(f"part {name} failed: {trace}", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - tick
    gc.collect()  # a failed part's tensors, held by its frames, would shrink the next part's memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(name=name, status="failed" if error else "ok", seconds=seconds, budget_s=budget,
                error=error, traceback=trace, results=out)


def headline(part):
    """One line of the summary table."""
    r = part["results"]
    if part["name"].startswith("pipeline"):
        shown = []
        for c in r:
            v = r[c]["views_per_s"][c]
            ratio = f" epoch x {v['epoch_ratio']:.2f}" if "epoch_ratio" in v else ""
            shown.append(f"compile {c}: a {v['a']:.0f} b {v['b']:.0f} c {v['c']:.0f}" + ratio)
        return "  ".join(shown)
    if part["name"] == "loss":
        return "  ".join(f"{x['views']}: tiled {x['tiled_ms']:.1f} ms"
                         if isinstance(x["tiled_ms"], float) else f"{x['views']}: {x['tiled_ms']}"
                         for x in r["rows"][-2:])
    if part["name"] == "spectral":
        return f"{r['n']}: {r['seconds']:.1f} s, {r['batches']} batches"
    return (f"{r['img_per_s']:.0f} img/s, peak {r['peak_mib'] or 0:.0f} MiB, "
            f"linear {r['linear_top1']:.1f}%")


def bench_gpu(args):
    """What only a GPU can tell, each with its baseline, in one command meant to take under 8
    minutes on one H100: `pipeline` (ResNet-50, B 256, compile off then on), `pipeline-fmnist`
    (resnet18, B 32 against 256), `loss` (8k to 256k views), `spectral` (1.28M embeddings) and
    `train-<method>`: each script's main() in this process, one epoch of 10,240 Fashion-MNIST
    images at B 256 (384 synthetic images at B 64 without the copy), no kNN, a 1-epoch probe;
    images/s is the median of the logged rates after the first. Each part has a time budget
    (SIGALRM): a part that raises, exits or runs over is recorded as failed and the next one
    runs. The JSON (--json) is rewritten after every part; --parts runs a subset. The GPU
    machine reads Fashion-MNIST from a copy that travels with the working tree: `mkdir -p
    data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz data/fashion-mnist/` (data/
    is git-ignored, 30 MB); --fmnist-dir names another folder. --toy shrinks every part
    (resnet18, B 4 to 16, 1 step, 512 views, 2048 embeddings) to check the plumbing, not to
    measure."""
    args.json = args.json or "bench-gpu.json"
    # common reads Fashion-MNIST from common.DEBIAN_FMNIST, and a GPU machine may have neither
    # the Debian package nor internet: point that constant at the copy, and drop the cache.
    default = "data/fashion-mnist" if os.path.isdir("data/fashion-mnist") else common.DEBIAN_FMNIST
    common.DEBIAN_FMNIST = os.path.abspath(args.fmnist_dir or default)
    common.base_datasets.cache_clear()
    parts = gpu_parts(args)
    names = [name for name, *_ in parts]
    chosen = args.parts.split(",") if args.parts else names
    unknown = set(chosen) - set(names)
    if unknown:
        sys.exit(f"error: --parts {','.join(sorted(unknown))}: no such part; choose from "
                 f"{', '.join(names)}")
    parts = [p for p in parts if p[0] in chosen]
    if args.dry_run:
        for name, what, budget, _ in parts:
            print(f"{name:>16} {budget:>4} s  {what}")
        print(f"{'total':>16} {sum(p[2] for p in parts):>4} s  at most; Fashion-MNIST from "
              f"{common.DEBIAN_FMNIST}")
        return
    if not args.toy and not torch.cuda.is_available():
        sys.exit("error: no GPU visible; use --toy for the CPU sizes, or --dry-run to list the "
                 "parts")
    cuda = torch.cuda.is_available()
    hardware = dict(device=torch.cuda.get_device_name() if cuda else "CPU", torch=torch.__version__,
                    cuda=torch.version.cuda, cpus=os.cpu_count())
    report = dict(hardware=hardware, toy=args.toy, parts=[])
    print(json.dumps(report["hardware"]), flush=True)
    for name, what, budget, fn in parts:
        print(f"\n== {name} ({budget} s budget): {what}", flush=True)
        report["parts"].append(run_part(name, budget, fn))
        # after every part: a run killed later keeps what it measured
        with open(args.json + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print(f"\n{'part':>16} {'status':>7} {'s':>6}  result")
    for p in report["parts"]:
        print(f"{p['name']:>16} {p['status']:>7} {p['seconds']:6.1f}  {p['error'] or headline(p)}")
    print(f"wrote {args.json}")


# ----------------------------------------------------------------------------- data memory


MEMORY_PROBE = """
import re, sys, time
sys.path.insert(0, {here!r})
start = time.time()
if {ours}:
    import common
    kept = common.train_dataset({data!r}, {root!r}, 0, 0, 2)[0].tensors
else:
    import torchvision
    torchvision.datasets.STL10._check_integrity = lambda self: True  # a stand-in's sums differ
    kept = torchvision.datasets.STL10({root!r}, split="train+unlabeled").data,
seconds, images = time.time() - start, len(kept[0])
kib = {{k: int(re.search(k + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
       for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}}
print(images, seconds, *(kib[k] / 2 ** 20 for k in kib))
"""


def bench_data_memory(args):
    """Host memory of loading a pretraining set, each reader in a fresh process (Linux only):
    common.train_dataset on the CPU against torchvision's reader (STL-10 train+unlabeled): peak
    RSS, then RSS with its anonymous and file-backed parts, in GiB. --stand-in first writes a
    full-size random STL-10 into --data-root where its files are absent (offline machines)."""
    root = args.data_root
    folder = os.path.join(root, "stl10_binary")
    if args.stand_in and not os.path.exists(os.path.join(folder, "unlabeled_X.bin")):
        os.makedirs(folder, exist_ok=True)
        g = torch.Generator().manual_seed(0)
        for split, n in (("train", 5000), ("test", 8000), ("unlabeled", 100000)):
            with open(os.path.join(folder, f"{split}_X.bin"), "wb") as f:
                for i in range(0, n, 5000):
                    f.write(torch.randint(0, 256, (min(5000, n - i), 27648), generator=g,
                                          dtype=torch.uint8).numpy().tobytes())
            if split != "unlabeled":
                (torch.arange(n) % 10 + 1).to(torch.uint8).numpy().tofile(
                    os.path.join(folder, f"{split}_y.bin"))
    print(f"{args.data} from {root}: load, peak RSS, then RSS = anonymous + file-backed (GiB)")
    rows = {}
    for name, ours in (("common.train_dataset", True), ("torchvision STL10", False)):
        if not ours and args.data != "stl10":
            continue
        code = MEMORY_PROBE.format(here=os.path.dirname(os.path.abspath(__file__)), ours=ours,
                                   data=args.data, root=root)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
        if out.returncode:
            sys.exit(f"error: {name} failed: {out.stderr.strip().splitlines()[-1]}")
        images, seconds, peak, rss, anon, file = (float(x) for x in out.stdout.split()[-6:])
        rows[name] = peak
        print(f"  {name:22s} {int(images):7d} images {seconds:6.1f} s  peak {peak:5.2f}  "
              f"after {rss:5.2f} = {anon:5.2f} + {file:5.2f}")
    if len(rows) == 2:
        print(f"  peak RSS ratio (ours / torchvision): "
              f"{rows['common.train_dataset'] / rows['torchvision STL10']:.2f}")


# ----------------------------------------------------------------------------- main


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("loss", "loss-one", "spectral", "spectral-toy",
                                     "spectral-deviations", "mechanisms", "pipeline", "reproduce",
                                     "data-memory", "gpu"))
    p.add_argument("--views", default=None, help="comma-separated view counts (loss-one: one)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--chunk", type=int, default=4096, help="tile size of the chunked path")
    p.add_argument("--mode", choices=("dense", "chunked"), default="chunked", help="loss-one only")
    p.add_argument("--data", default=None, help="pipeline: ImageFolder root or named small set "
                   "(default: synthetic JPEGs)")
    p.add_argument("--data-root", default="./data", help="data-memory: where named sets are")
    p.add_argument("--stand-in", action="store_true",
                   help="data-memory: write a full-size random STL-10 there if it is absent")
    p.add_argument("--images", type=int, default=5000, help="pipeline: synthetic JPEGs to make")
    p.add_argument("--arch", default="resnet50", choices=common.ARCHS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ref-batch", type=int, default=256,
                   help="pipeline: the batch whose epoch time --batch's is compared with")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=50,
                   help="pipeline: timed steps (0 with --save-grid: the grid only)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", choices=("off", "on", "both"), default=None,
                   help="default: both on GPU, off on CPU")
    p.add_argument("--save-grid", default=None,
                   help="pipeline: write augmented views of both pipelines to this PNG")
    p.add_argument("--batches", default="32,128,512", help="reproduce: global batch sizes")
    p.add_argument("--seeds", default="0,1,2", help="reproduce: seeds")
    p.add_argument("--epochs", type=int, default=50, help="reproduce: pretraining epochs")
    p.add_argument("--temperature", type=float, default=0.1, help="reproduce: T of every method")
    p.add_argument("--subset", type=int, default=0, help="reproduce: training images (0: all)")
    p.add_argument("--runs", default="runs/reproduce", help="reproduce: where the runs go")
    p.add_argument("--dry-run", action="store_true",
                   help="reproduce: print the commands only; gpu: list the parts")
    p.add_argument("--plot", default=None,
                   help="reproduce: write accuracy against batch size to this PNG (as "
                   "docs/accuracy_vs_batch_cpu.png); mechanisms: q against batch size (as "
                   "docs/q_vs_batch.png); needs matplotlib")
    p.add_argument("--q-images", type=int, default=1024,
                   help="mechanisms: Fashion-MNIST test images embedded for q")
    p.add_argument("--checkpoint", default=None,
                   help="mechanisms: a simclr.py checkpoint.pt (resnet18, fashion-mnist) as the "
                   "pretrained backbone, e.g. the quick start's runs/demo/checkpoint.pt "
                   "(default: train one here)")
    p.add_argument("--pretrain-images", type=int, default=2048,
                   help="mechanisms: images of the short pretraining")
    p.add_argument("--pretrain-epochs", type=int, default=2,
                   help="mechanisms: its epochs at B 128")
    p.add_argument("--toy-steps", type=int, default=2048,
                   help="mechanisms: SGD steps of every synthetic run")
    p.add_argument("--toy", action="store_true", help="gpu: every part at tiny sizes (CPU, tests)")
    p.add_argument("--parts", default=None, help="gpu: comma-separated parts to run (default: all)")
    p.add_argument("--fmnist-dir", default=None,
                   help="gpu: folder of Fashion-MNIST's 4 idx .gz files (default: "
                   f"data/fashion-mnist if there, else {common.DEBIAN_FMNIST})")
    p.add_argument("--json", default=None,
                   help="gpu (default bench-gpu.json), mechanisms: where the results go")
    return p


def main():
    args = parser().parse_args()
    if args.what == "gpu":
        bench_gpu(args)
    elif args.what == "reproduce":
        bench_reproduce(args)
    elif args.what == "pipeline":
        bench_pipeline(args)
    elif args.what == "loss":
        bench_loss(args)
    elif args.what == "spectral":
        bench_spectral(args)
    elif args.what == "spectral-toy":
        bench_spectral_toy(args)
    elif args.what == "spectral-deviations":
        bench_spectral_deviations(args)
    elif args.what == "mechanisms":
        bench_mechanisms(args)
    elif args.what == "data-memory":
        bench_data_memory(args)
    else:
        seconds, peak = loss_step(int(args.views), args.mode, args.device or "cpu", args.chunk)
        print(json.dumps(dict(views=int(args.views), mode=args.mode, seconds=seconds,
                              peak_extra_bytes=peak)))


if __name__ == "__main__":
    main()
