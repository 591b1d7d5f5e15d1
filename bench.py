"""bench.py: speed and memory of the project's paths next to their baselines, in one run.

    python bench.py loss                                  # GPU if present, else CPU sizes
    python bench.py loss --device cpu --views 2048,4096,8192
    python bench.py spectral                              # 1.28M x 128 on GPU, 50k on CPU
    python bench.py spectral-toy                          # the paper's synthetic experiment
    python bench.py spectral-deviations                   # the official code's spectral choices, one at a time
    python bench.py mechanisms --plot q_vs_batch.png      # what each method changes, measured (README's tables)
    python bench.py pipeline                              # ResNet-50, B 256, synthetic JPEG folder
    python bench.py pipeline --data fashion-mnist --arch resnet18 --batch 32
    python bench.py reproduce --dry-run                   # the README's results grid: commands
    python bench.py reproduce --plot results.png          # run it (resumable), table + figure
    python bench.py gpu --dry-run                         # the GPU session's parts, what each measures, budgets
    python bench.py gpu --json $OUT/bench-gpu.json        # all of them in one run on a GPU machine, fail-soft
    python bench.py gpu --toy                             # every part at tiny sizes on the CPU (the test)

`loss`: InfoNCE forward + backward on `views` random 128-d projections (views / 2 images,
every view an anchor against all views, as on one GPU): the dense path (the baseline: the
whole logit matrix, its two excluded columns per row masked, torch.logsumexp) against the
exact tiled path of common.similarity_logsumexp. It prints time per step,
peak extra memory, the ratios tiled / dense, and the achieved TFLOP/s of the tiled path
counted as the 3 matmuls of N x N x D that forward + backward need at least (the tiled
backward does a 4th, the recompute). "OOM" where dense does not fit.
On GPU both run in this process: peak memory is torch.cuda.max_memory_allocated above the
inputs. On CPU every (mode, size) runs in a fresh process (`loss-one`): peak memory is the peak RSS
above the RSS before the first step, time is that of a second step. A configuration whose
process dies prints its error and shows as "failed".
`spectral`: seconds for common.spectral_batches to build one epoch of batches (B 256, 40
clusters per chunk) from random 128-d embeddings: 1.28M (ImageNet) on GPU, 50k (CIFAR) on
CPU. The embedding pass is a forward of every training image and is reported by the
training log (`spectral_seconds` includes it).
`spectral-toy`: Cho et al.'s synthetic experiment: N trainable pairs (u_i, v_i) in d = 2N,
batches of B = 2, SGD; the full-batch loss after the same number of steps with random and
with spectral batches, over three seeds.
`spectral-deviations`: the mean in-batch InfoNCE of the batches (Cho et al.'s measure of hardness) in the
spectral tests' three synthetic settings, for this code and with each of the official code's choices in its
place, over three clustering seeds (bench.official_style_batches; the Hungarian rows need scipy).
`mechanisms`: the mechanism each paper names, measured in minutes on a CPU (toy scale, not the papers' accuracy
claims). 1: q = 1 - p+ per anchor (InfoNCE's gradient is q x DCL's, and FlatNCE's gradient is DCL's) for B 16 to 512
at T 0.1 and 0.5, on two views of --q-images Fashion-MNIST test images from a random resnet18 and from a pretrained
one (--checkpoint, or SimCLR trained here on --pretrain-images for --pretrain-epochs at B 128, the quick start's
recipe on fewer images); --plot draws q against B (needs matplotlib). 2: Cho et al.'s synthetic setting (64
trainable pairs, d 128, T 0.1) for every two-view method at B 2 to 16 and an equal --toy-steps SGD steps, 3 seeds:
the exact full-batch InfoNCE and global contrastive objective at the end; 2b: a learning-rate sweep at B 2 (seed 0),
with the vectors' final norm. 3: from the same SogCLR runs, the relative error of u_i and of the batch estimate g_i
against the exact full-data mean, per quarter of training.
`pipeline`: views/s of a SimCLR training step (forward, loss, backward, LARS) fed three ways:
(a) the compute bound, the same step on random views already on the device; (b) the
project's data path (common.augmented_batches: workers decode and crop JPEGs, the device does
the rest; small sets live on the device); (c) the plain torchvision CPU pipeline, the same
recipe per image in the same number of DataLoader workers. Also (b) and (c) without the
step ("data only": what the pipeline can deliver), b/a and b/c, each with --compile off and
on (on GPU), and, when --batch is not 256, the epoch time at --batch over that at 256
(path b). --data: an ImageFolder root (its train/ is read), a named small set, or nothing:
a synthetic folder of --images photo-like JPEGs (500 x 375, quality 90) is made under
data/bench-jpeg. --save-grid PATH writes 8 images' two views from (b) (top rows) and
(c) (bottom rows).
`reproduce`: the README's results grid, every method at every --batches size and --seeds seed
with the same backbone (resnet18, CIFAR stem), epochs and T; each run in its own --out-dir
under runs/reproduce/, skipped when its log already holds a linear top-1, so an interrupted
grid resumes. Prints a markdown table of linear and kNN top-1 (mean +- std over seeds) with
the wall time of each cell; --plot PATH draws accuracy against batch size (needs matplotlib,
the only place this repository uses it).
`gpu`: everything only a GPU can tell, each with its baseline, in one command meant to take under 8
minutes on one H100: `pipeline` (ResNet-50, B 256, synthetic JPEGs, compile off then on), `pipeline-fmnist`
(resnet18 at B 32 and 256), `loss` (8k to 256k views), `spectral` (1.28M embeddings) and `train-<method>`:
each method script's main() in this process, one epoch of 10,240 Fashion-MNIST images at B 256 (the
384 synthetic images at B 64 if the copy is missing), no kNN, a 1-epoch probe; images/s is the median
of the logged rates after the first, peak memory torch.cuda.max_memory_allocated over the whole run.
Each part has a time budget (SIGALRM; the budgets add up to 450 s and are guesses, not measurements):
a part that raises, exits or runs over is recorded as failed with its error and the next one runs.
After every part the JSON (--json) is rewritten: the hardware line, then per part name, status,
seconds, error and results; a summary table ends the run. --parts runs a subset. Fashion-MNIST
must travel with the working tree: `mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
data/fashion-mnist/` here (data/ is git-ignored, 30 MB), then the device tool's run with
carry=["data/fashion-mnist"], command `python bench.py gpu --json $OUT/bench-gpu.json`, timeout_s 600.
--fmnist-dir names another folder. --toy shrinks every part (resnet18, B 4 to 16, 1 step, 512 views,
2048 embeddings, 16 synthetic images) to check the plumbing, not to measure.
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
from torch.utils.data import DataLoader, RandomSampler
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
    if device == "cpu":  # a fresh process, so that the peak RSS is this configuration's
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "loss-one", "--views", str(views),
                              "--mode", mode, "--device", "cpu", "--chunk", str(chunk)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode} at {views} views failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return "failed"
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return r["seconds"], r["peak_extra_bytes"]
    try:
        return loss_step(views, mode, device, chunk)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def bench_loss(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default = "8192,16384,32768,65536,131072,262144" if device == "cuda" else "1024,2048,4096,8192"
    sizes = [int(v) for v in (args.views or default).split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"InfoNCE forward + backward, D=128, fp32, {name}, torch {torch.__version__}, tile {args.chunk}")
    print(f"{'views':>8} {'dense ms':>10} {'dense MiB':>10} {'tiled ms':>10} {'tiled MiB':>10} "
          f"{'time x':>7} {'mem x':>7} {'tiled TFLOP/s':>14}")
    rows = []
    for n in sizes:
        dense, tiled = measure(n, "dense", device, args.chunk), measure(n, "chunked", device, args.chunk)
        ok = not isinstance(dense, str) and not isinstance(tiled, str)
        d_ms, d_mib = (dense, dense) if isinstance(dense, str) else (f"{dense[0] * 1e3:.1f}", f"{dense[1] / 2**20:.0f}")
        t_ms, t_mib = (tiled, tiled) if isinstance(tiled, str) else (f"{tiled[0] * 1e3:.1f}", f"{tiled[1] / 2**20:.0f}")
        ratio_t = f"{tiled[0] / dense[0]:.2f}" if ok else "-"
        ratio_m = f"{tiled[1] / max(dense[1], 1):.3f}" if ok else "-"
        tflops = "-" if isinstance(tiled, str) else f"{3 * 2 * n * n * 128 / tiled[0] / 1e12:.2f}"
        print(f"{n:>8} {d_ms:>10} {d_mib:>10} {t_ms:>10} {t_mib:>10} {ratio_t:>7} {ratio_m:>7} {tflops:>14}", flush=True)
        ms, mib = (lambda r: r if isinstance(r, str) else r[0] * 1e3), (lambda r: r if isinstance(r, str) else r[1] / 2**20)
        rows.append(dict(views=n, dense_ms=ms(dense), dense_mib=mib(dense), tiled_ms=ms(tiled), tiled_mib=mib(tiled),
                         tiled_tflops=None if isinstance(tiled, str) else 3 * 2 * n * n * 128 / tiled[0] / 1e12))
    return dict(device=name, chunk=args.chunk, rows=rows)


def bench_spectral(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = int(args.views or (1_281_167 if device == "cuda" else 50_000))
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, 128, generator=g).to(device)
    z2 = z1 + 0.5 * torch.randn(n, 128, generator=g).to(device)
    common.spectral_batches(z1[:20480], z2[:20480], 256, generator=torch.Generator().manual_seed(1))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    batches, residual = common.spectral_batches(z1, z2, 256, 0.1, 40, torch.Generator().manual_seed(2))
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"spectral_batches: {n} x 128 embeddings, B 256, 40 clusters per chunk, {name}, torch {torch.__version__}: "
          f"{seconds:.1f} s for {len(batches)} batches, largest eigen-residual {residual:.1e} (tolerance {common.EIG_TOL:g})")
    return dict(device=name, n=n, seconds=seconds, batches=len(batches), eig_residual=residual)


def toy_run(mode, seed, n=32, epochs=30, lr=0.25, temperature=0.1):
    """One run of the synthetic experiment; returns the full-batch loss at the end.

    lr 0.25 with info_nce_loss's 2x gradient (google-research/simclr's scale) is lr 0.5 on the mean, bit for bit."""
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
    print("N 32 pairs, d 64, B 2, T 0.1, SGD lr 0.25 (0.5 on the mean), 30 epochs of 16 steps; full-batch InfoNCE at the end")
    for mode in ("random", "spectral"):
        losses = [toy_run(mode, seed) for seed in range(3)]
        print(f"{mode:>9}: " + "  ".join(f"{x:.3f}" for x in losses) + f"   mean {sum(losses) / 3:.3f}")


def official_style_batches(z1, z2, b, temperature, clusters, g, sqrt_degree=False, hungarian=False, exact=False,
                           one_run=False):
    """common.spectral_batches, written out again with any of the official code's choices swapped in (krafton-ai/
    mini-batch-cl, utils.py, on scikit-learn 0.23 / scipy 1.5): spectral_embedding divides the eigenvectors by
    sqrt(degree) and does not normalise rows; linear_sum_assignment matches onto B copies of each centre
    (Hungarian). exact: torch.linalg.eigh instead of the iterative solver (ARPACK's converged answer). one_run: one
    k-means++ run, not 10 (this code before 2026-12-04 ran one Lloyd from random rows). All False: the same
    batches as common.spectral_batches."""
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
        a = F.softplus(uc @ vc.T - pos + math.log(b - 1)) + F.softplus(vc @ uc.T - pos + math.log(b - 1))
        a = (a + a.T).fill_diagonal_(float("-inf"))
        log_d = a.logsumexp(1)
        s = torch.exp(a - log_d[:, None] / 2 - log_d[None, :] / 2)
        q = torch.linalg.eigh(s.double()).eigenvectors[:, -k:].float() if exact else common._top_eigenvectors(s, k, g)[0]
        emb = q * torch.exp(-log_d / 2)[:, None] if sqrt_degree else F.normalize(q, dim=1)
        dist = torch.cdist(emb, common._kmeans(emb, k, g, restarts=1 if one_run else 10))
        if hungarian:
            from scipy.optimize import linear_sum_assignment  # here only: scipy is no dependency

            assign = torch.as_tensor(linear_sum_assignment(dist.repeat_interleave(b, 1).double().numpy())[1] // b)
        else:
            assign = common._equal_size_assign(dist, b)
        batches += list(idx[assign.argsort(stable=True)].view(k, b))
    return [batches[i] for i in torch.randperm(len(batches), generator=g)]


def deviation_settings():
    """The spectral tests' three settings (test_losses.py): name, z1, z2, B, clusters per chunk."""
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(200, 32, generator=g)
    z1 = centres[torch.randint(0, 200, (2560,), generator=g)] + 0.7 * torch.randn(2560, 32, generator=g)
    yield "loose 200-cluster mixture, B 64", z1, z1 + 0.3 * torch.randn(2560, 32, generator=g), 64, 40
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 128, generator=g)
    z1 = centres[torch.randint(0, 10, (1280,), generator=g)] + torch.randn(1280, 128, generator=g)
    yield "flat spectrum, 10 classes, B 32", z1, z1 + 0.5 * torch.randn(1280, 128, generator=g), 32, 40
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(16, 32, generator=g).repeat_interleave(32, 0) + 0.3 * torch.randn(512, 32, generator=g)
    yield "16 clustered Gaussians, B 32", z1, z1 + 0.3 * torch.randn(512, 32, generator=g), 32, 16


def bench_spectral_deviations(args):
    variants = [("this code", {}), ("exact eigenvectors (ARPACK's answer)", dict(exact=True)),
                ("/ sqrt(degree), no row normalisation", dict(exact=True, sqrt_degree=True)),
                ("one k-means run, not 10", dict(exact=True, one_run=True)),
                ("Hungarian equal-size matching", dict(exact=True, hungarian=True)),
                ("official: both", dict(exact=True, sqrt_degree=True, hungarian=True))]
    print(f"mean in-batch InfoNCE (T 0.1) over clustering seeds 0, 1, 2; higher is harder; CPU, {os.cpu_count()} cores")
    table = {}
    for name, z1, z2, b, clusters in deviation_settings():
        print(f"\n{name}, {len(z1)} pairs, {clusters} clusters per chunk")
        loss = lambda batches: sum(info_nce_loss(z1[r], z2[r], 0.1).item() for r in batches) / len(batches)
        rows = [("random", [loss(torch.randperm(len(z1), generator=torch.Generator().manual_seed(s))[:len(z1) // b * b]
                                 .view(-1, b)) for s in range(3)])]
        for label, flags in variants:
            try:
                rows.append((label, [loss(official_style_batches(z1, z2, b, 0.1, clusters, torch.Generator().manual_seed(s),
                                                                 **flags)) for s in range(3)]))
            except ImportError:
                rows.append((label, "needs scipy (pip install scipy)"))
        for label, values in rows:
            shown = values if isinstance(values, str) else "  ".join(f"{x:.4f}" for x in values) + f"   mean {sum(values) / 3:.4f}"
            print(f"{label:>40}: {shown}")
        table[name] = dict(rows)
    return table


# ----------------------------------------------------------------------------- mechanisms


def q_values(z1, z2, temperature):
    """q = 1 - p+ per anchor (2B,), p+ InfoNCE's softmax probability of the positive within the batch. Per anchor,
    InfoNCE's term is logaddexp(neg, pos) - pos and DCL's neg - pos (pos = s_ip/T, neg = log sum over N_i), so
    d InfoNCE / d (pos, neg) = (-q, q) = q x d DCL / d (pos, neg): q is the coupling that DCL (and FlatNCE) removes."""
    _, positive, negative = common.two_view_terms(z1, z2, temperature, 0)
    return torch.sigmoid(negative - positive)  # exp(neg) / (exp(neg) + exp(pos))


@torch.no_grad()
def embed_test_views(model, n, seed, root="./data"):
    """Projections (n, 128) of two augmented views of the first n Fashion-MNIST test images, as the loss sees them in
    training: the training augmentation, BN in train mode (a copy: the model is unchanged). BN's statistics are over
    512 views (256 images) at a time whatever the B of the table, those of a B 256 batch; BN over each batch of 16
    itself moved the random backbone's q at B 16, T 0.1 from 0.928 to 0.925 (a one-off check)."""
    _, val, meta = common.base_datasets("fashion-mnist", root)
    images = torch.utils.data.TensorDataset(val.tensors[0][:n], val.tensors[1][:n])
    net, z = copy.deepcopy(model).train(), []
    torch.manual_seed(seed)
    for views, _ in common.augmented_batches(images, meta, torch.arange(n).view(-1, 256), 2, 0, torch.device("cpu")):
        z.append(common.forward_views(net, views))
    return [torch.cat(zv).cpu() for zv in zip(*z)]  # on a GPU machine the pretrained model is on the GPU


def q_table(z1, z2, sizes, temperatures, seed=0):
    """{(T, B): (mean, 10th, 90th percentile) of q} over all 2n anchors, the n images cut at random into n / B batches."""
    g, out = torch.Generator().manual_seed(seed), {}
    for b in sizes:
        rows = torch.randperm(len(z1), generator=g)[:len(z1) // b * b].view(-1, b)
        for t in temperatures:
            q = torch.cat([q_values(z1[r], z2[r], t) for r in rows])
            out[t, b] = (q.mean().item(), *torch.quantile(q, torch.tensor([0.1, 0.9])).tolist())
    return out


def short_pretraining(subset, epochs, out_dir):
    """SimCLR as the quick start trains it (simclr.pretrain, its flags), on fewer images: the model after it."""
    import simclr

    args = simclr.get_parser().parse_args(["--data", "fashion-mnist", "--arch", "resnet18", "--subset", str(subset),
                                           "--batch", "128", "--epochs", str(epochs), "--warmup-epochs", "0.5",
                                           "--workers", "0", "--knn-every", "0", "--out-dir", out_dir])
    simclr.check_args(args)
    args.n_views = 2
    device = simclr.setup(args)
    train_set, meta = common.train_dataset(args.data, args.data_root, args.subset, args.seed, 2)
    model = common.make_model(args.arch, meta["size"], meta["channels"], device)
    simclr.pretrain(args, model, train_set, meta, None)
    return model


def toy_objectives(u, v, temperature):
    """The exact full-data objectives of N pairs, the whole data as one batch of common.two_view_terms: InfoNCE, the
    mean over the 2N anchors of -log(exp(s_ip/T) / sum_{k != i} exp(s_ik/T)); SogCLR's global contrastive objective
    (the paper's eq. 3, in units of 1/T), the mean of -s_ip/T + log(mean_{k not i, p} exp(s_ik/T)); and that exact
    mean per anchor, (2N,), the value u_i estimates. The test checks them against a naive loop and the losses."""
    _, positive, negative = common.two_view_terms(u, v, temperature, 0)
    log_u = negative - math.log(2 * len(u) - 2)
    return (torch.logaddexp(negative, positive) - positive).mean().item(), (log_u - positive).mean().item(), log_u.exp()


def mechanism_run(method, b, seed, steps, n=64, lr=0.5, temperature=0.1, gamma=None):
    """Cho et al.'s synthetic setting for every two-view method: N trainable pairs (u_i, v_i) in d = 2N, `steps` SGD
    steps at batch b on `method`'s loss, each loss's gradient rescaled to that of its formula's mean over anchors (the
    scripts' losses carry their reference code's factor: 2 for SimCLR, DCL, FlatNCE, 2T for SogCLR). Returns the
    exact full-batch InfoNCE and global contrastive objective at the end, and for SogCLR the mean relative error,
    per step, of u_i^k (the moving average the gradient uses) and of g_i^k (the batch estimate) against the exact
    full-data mean that both estimate, at the same parameters."""
    from dcl import dcl_loss
    from flatnce import flatnce_loss
    from sogclr import SogCLRLoss

    g = torch.Generator().manual_seed(seed)
    u, v = (torch.randn(n, 2 * n, generator=g).requires_grad_() for _ in range(2))
    opt = torch.optim.SGD([u, v], lr=lr)
    sog = SogCLRLoss(n, temperature, gamma) if method == "sogclr" else None
    errors, done = [], 0
    while done < steps:  # epochs; the last one may stop midway: every batch size gets `steps` steps
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
                    g_batch = torch.exp(common.two_view_terms(z1, z2, temperature)[2] - math.log(2 * b - 2))
                    u_new = torch.where(u_old == 0, g_batch, (1 - gamma) * u_old + gamma * g_batch)  # first visit: g
                loss = sog(z1, z2, idx) / (2 * temperature)
                # the loss's own state after the step is the view average of the u_new above: a check on this copy
                if not torch.allclose(sog.u[idx], u_new.view(2, b).mean(0), rtol=1e-5):
                    raise RuntimeError("bench's copy of u's update differs from SogCLRLoss's")
                errors.append((((u_new - exact).abs() / exact).mean().item(), ((g_batch - exact).abs() / exact).mean().item()))
            elif method == "dcl":
                loss = dcl_loss(z1, z2, temperature) / 2
            elif method == "flatnce":
                loss = flatnce_loss(z1, z2, temperature) / 2
            else:
                loss = info_nce_loss(z1, z2, temperature) / 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
    with torch.no_grad():  # and the mean norm of the free vectors: SGD grows it, which shrinks the step on the sphere
        return (*toy_objectives(u, v, temperature)[:2], errors, torch.cat([u, v]).norm(dim=1).mean().item())


MECHANISMS = (("SimCLR, random batches", "simclr", None), ("SimCLR, spectral batches", "simclr-spectral", None),
              ("DCL", "dcl", None), ("FlatNCE", "flatnce", None), ("SogCLR, gamma 0.9", "sogclr", 0.9),
              ("SogCLR, gamma 0.1", "sogclr", 0.1))


def bench_mechanisms(args):
    hardware = (f"{torch.cuda.get_device_name()} for the pretraining, else " if torch.cuda.is_available() else "") + \
        f"CPU, {os.cpu_count()} cores, torch {torch.__version__}"
    report = dict(hardware=hardware, command="python " + " ".join(sys.argv))
    start = time.time()
    # 1. q = 1 - p+ on Fashion-MNIST test images
    sizes, temperatures, n = (16, 32, 64, 128, 256, 512), (0.1, 0.5), args.q_images
    if not sizes[-1] <= n <= 9984 or n % 256 or args.toy_steps < 4:
        sys.exit("error: --q-images must be a multiple of 256 from 512 (the largest batch) to 9984 (of the 10,000 test "
                 "images), --toy-steps at least 4")
    torch.manual_seed(0)
    try:
        meta = common.base_datasets("fashion-mnist", "./data")[2]
    except common.BadInput as e:
        sys.exit(f"error: {e}")
    backbones = [("random init", common.make_model("resnet18", meta["size"], meta["channels"], torch.device("cpu")))]
    if args.checkpoint:
        model = common.make_model("resnet18", meta["size"], meta["channels"], torch.device("cpu"))
        try:
            model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True)["model"])
        except Exception as e:
            sys.exit(f"error: --checkpoint {args.checkpoint} is not a simclr.py checkpoint of resnet18 on fashion-mnist "
                     f"({type(e).__name__}); give the quick start's runs/demo/checkpoint.pt, or leave --checkpoint out")
        backbones.append((f"pretrained ({args.checkpoint})", model))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-mechanisms-") as d:
            label = f"pretrained here: SimCLR, {args.pretrain_images} images, {args.pretrain_epochs} epochs at B 128"
            backbones.append((label, short_pretraining(args.pretrain_images, args.pretrain_epochs, d)))
    print(f"\n1. q = 1 - p+ (InfoNCE's factor on DCL's gradient) over the {2 * n} anchors of {n} Fashion-MNIST test "
          f"images' two views, resnet18 projections; mean [10th, 90th percentile]; {hardware}")
    print(f"{'backbone':>60} {'T':>4} " + " ".join(f"{'B ' + str(b):>20}" for b in sizes))
    report["q"] = []
    for label, model in backbones:
        z1, z2 = embed_test_views(model, n, seed=1)
        table = q_table(z1, z2, sizes, temperatures)
        for t in temperatures:
            print(f"{label:>60} {t:>4} " + " ".join(f"{'%.3f [%.3f, %.3f]' % table[t, b]:>20}" for b in sizes))
            report["q"].append(dict(backbone=label, temperature=t, **{str(b): table[t, b] for b in sizes}))
    print(f"({time.time() - start:.0f} s so far)")
    # 2. and 3. the synthetic setting at equal steps
    seeds, batch_sizes = range(3), (2, 4, 8, 16)
    print(f"\n2. N 64 pairs, d 128, T 0.1, SGD lr 0.5 on each formula's mean gradient, {args.toy_steps} steps at every "
          f"batch size, seeds 0-2: the exact full-batch InfoNCE / global contrastive objective at the end, mean +- std")
    print(f"{'method':>26} " + " ".join(f"{'B ' + str(b):>26}" for b in batch_sizes))
    report["toy"], errors = [], {}
    for label, method, gamma in MECHANISMS:
        cells = []
        for b in batch_sizes:
            runs = [mechanism_run(method, b, s, args.toy_steps, gamma=gamma) for s in seeds]
            info, gcl = ([r[i] for r in runs] for i in (0, 1))
            cells.append((statistics.mean(info), statistics.stdev(info), statistics.mean(gcl), statistics.stdev(gcl)))
            if method == "sogclr":
                errors[gamma, b] = torch.stack([torch.tensor(r[2]) for r in runs]).mean(0)  # (steps, 2), seed mean
        print(f"{label:>26} " + " ".join(f"{'%.3f+-%.3f / %.3f+-%.3f' % c:>26}" for c in cells))
        report["toy"].append(dict(method=label, **{str(b): c for b, c in zip(batch_sizes, cells)}))
    init = mechanism_run("dcl", 2, 0, 0)[:2]  # no steps: seed 0's starting point
    # The minimum of both over the sphere: the 64 pairs at the corners of a regular simplex, every other cosine -1/63.
    floor = math.log1p(126 * math.exp((-1 / 63 - 1) / 0.1)), -1 / 0.1 + (-1 / 63) / 0.1
    print("seed 0's initialisation: %.3f / %.3f; the minimum (a regular simplex): %.3f / %.3f" % (*init, *floor))
    # The factor q acts like a per-anchor learning rate: how much of the gap does a tuned lr close? FlatNCE is left out:
    # its gradient is DCL's, so its runs are DCL's.
    lrs = (0.125, 0.5, 2, 8, 32, 128)
    print(f"\n2b. learning rate at B 2, seed 0, {args.toy_steps} steps: full-batch InfoNCE / GCL (mean |u_i| at the end; "
          f"it starts at 11.3)")
    print(f"{'method':>26} " + " ".join(f"{'lr ' + str(lr):>22}" for lr in lrs))
    report["lr"] = []
    for label, method, gamma in MECHANISMS:
        if method == "flatnce":
            continue
        runs = [mechanism_run(method, 2, 0, args.toy_steps, lr=lr, gamma=gamma) for lr in lrs]
        print(f"{label:>26} " + " ".join(f"{'%.3f / %.2f (%.0f)' % (r[0], r[1], r[3]):>22}" for r in runs))
        report["lr"].append(dict(method=label, **{str(lr): (r[0], r[1], r[3]) for lr, r in zip(lrs, runs)}))
    print(f"({time.time() - start:.0f} s so far)")
    print(f"\n3. SogCLR: mean relative error of u_i (moving average) and g_i (batch estimate) against the exact "
          f"full-data mean, per quarter of the {args.toy_steps} steps, seeds 0-2 averaged")
    report["estimator"] = []
    for (gamma, b), e in sorted(errors.items()):
        if b not in (4, 16):
            continue
        quarters = [w.mean(0).tolist() for w in torch.tensor_split(e, 4)]
        print(f"gamma {gamma} B {b:>2}: " + "   ".join(f"u {a:.3f} g {c:.3f}" for a, c in quarters))
        report["estimator"].append(dict(gamma=gamma, batch=b, quarters=quarters))
    print(f"\nbench mechanisms took {time.time() - start:.0f} s; {hardware}")
    if args.plot:
        plot_q(report["q"], sizes, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def plot_q(rows, sizes, path):
    """q against batch size, mean and the 10th-90th percentile band, one line per backbone and T."""
    import matplotlib  # here only: matplotlib is no dependency

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        mean, lo, hi = zip(*(r[str(b)] for b in sizes))
        line, = ax.plot(sizes, mean, marker="o", label=f"{r['backbone'].split(':')[0]}, T {r['temperature']}")
        ax.fill_between(sizes, lo, hi, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="batch size B (images)", ylabel="q = 1 - p+ (mean, 10th-90th percentile)", ylim=(0, 1.02),
           title="InfoNCE's gradient factor on Fashion-MNIST test images")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def torchvision_transform(meta):
    """The baseline: SimCLR's recipe as torchvision composes it, one image at a time on the CPU
    (PIL operations for photos, uint8 tensor operations for the small sets)."""
    rec = common.recipe(meta)
    s = rec["strength"]
    ops = [T.RandomResizedCrop(meta["size"], scale=(0.08, 1.0), antialias=True), T.RandomHorizontalFlip()]
    if rec["colour"]:
        ops += [T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8), T.RandomGrayscale(p=0.2)]
    if rec["blur"]:
        ops += [T.RandomApply([T.GaussianBlur(rec["blur"], sigma=(0.1, 2.0))], p=0.5)]
    return T.Compose(ops + [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(*meta["stats"])])


def _photo(i, out, size=(375, 500)):
    """A photo-like image: smooth colour regions, texture at two scales, sensor noise."""
    g = torch.Generator().manual_seed(i)
    x = sum(a * F.interpolate(torch.rand(1, 3, *(d * k for d in (3, 4)), generator=g), size=size, mode="bicubic")
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


def bench_pipeline(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    root = args.data or jpeg_folder(args.images)
    folder = root not in common.NAMED
    if folder:
        train = torchvision.datasets.ImageFolder(os.path.join(root, "train"), loader=common.load_image)
        meta = dict(size=224, channels=3, classes=len(train.classes), stats=common.IMAGENET_STATS, folder=True)
    else:
        train, _, meta = common.base_datasets(root, "./data")
    precision = "bf16" if device.type == "cuda" else "fp32"
    total = args.warmup + args.steps
    print(f"{device.type} ({torch.cuda.get_device_name() if device.type == 'cuda' else f'{os.cpu_count()} CPU cores'}), "
          f"torch {torch.__version__}; {args.arch}, batch {args.batch}, 2 views, {args.workers} workers, "
          f"{'folder ' + root if folder else root} ({len(train)} images); {args.steps} timed steps after {args.warmup}")

    ours = common.Crops(train.samples, meta["size"], 2) if folder else torch.utils.data.TensorDataset(train.tensors[0].to(device))
    theirs = common.Views(train, torchvision_transform(meta), 2)

    def project(batch, rows=None):  # (b): random global batches, as many as the timing needs, cycling the set
        rows = torch.stack([torch.randperm(len(train))[:batch] for _ in range(total)]) if rows is None else rows
        return (v for v, _ in common.augmented_batches(ours, meta, rows, 2, args.workers, device))

    def baseline(batch):  # (c): torchvision per image in the workers, the views then copied to the device
        data = DataLoader(theirs, batch, sampler=RandomSampler(theirs, num_samples=total * batch), num_workers=args.workers,
                          pin_memory=device.type == "cuda", drop_last=True)
        return (v.to(device, non_blocking=True).transpose(0, 1) for v, _, _ in data)

    if args.save_grid:
        mean, std = (torch.tensor(s)[None, :, None, None] for s in meta["stats"])
        views = torch.cat([*next(project(8, torch.arange(8)[None])).cpu(), *torch.stack([theirs[i][0] for i in range(8)], 1)])
        views = F.interpolate(views * std + mean, size=min(112, meta["size"]), mode="bilinear", antialias=True)
        torchvision.utils.save_image(views.clamp(0, 1), args.save_grid, nrow=8, padding=2)
        print(f"wrote {args.save_grid}: 8 images; rows 1-2 their two views from (b), rows 3-4 from (c)")
        if not args.steps:
            return dict(grid=args.save_grid)

    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile or ("both" if device.type == "cuda" else "off")]
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
    none = lambda views: None
    data_b = timed(project(args.batch), none, args.warmup, args.steps, device)
    data_c = timed(baseline(args.batch), none, args.warmup, args.steps, device)
    print(f"{'compile':>8} {'(a) bound':>10} {'(b) ours':>10} {'(c) tv':>10} {'b/a':>6} {'b/c':>6}   views/s")
    for compiled, r in results.items():
        print(f"{'on' if compiled else 'off':>8} {r['a']:10.0f} {r['b']:10.0f} {r['c']:10.0f} {r['b'] / r['a']:6.2f} {r['b'] / r['c']:6.2f}"
              + (f"   epoch time batch {args.batch} / batch {args.ref_batch}: {r['b_ref'] / r['b']:.2f}" if "b_ref" in r else ""))
        r.update(b_over_a=r["b"] / r["a"], b_over_c=r["b"] / r["c"], **({"epoch_ratio": r["b_ref"] / r["b"]} if "b_ref" in r else {}))
    print(f"data only (no step): (b) {data_b:.0f}  (c) {data_c:.0f}  views/s, b/c {data_b / data_c:.2f}")
    return dict(data=root, images=len(train), arch=args.arch, batch=args.batch, ref_batch=args.ref_batch, views_per_s={
        "on" if c else "off": r for c, r in results.items()}, data_only_b=data_b, data_only_c=data_c)


GRID = (("SimCLR", "simclr.py", []), ("SogCLR", "sogclr.py", []), ("DCL", "dcl.py", []),
        ("DCLW", "dcl.py", ["--dcl-sigma", "0.5"]), ("FlatNCE", "flatnce.py", []),
        ("Poly-View M=4", "polyview.py", ["--pv-views", "4", "--pv-objective", "geometric"]),
        ("Poly-View M=4, equal views", "polyview.py", ["--pv-views", "4", "--pv-objective", "geometric", "HALF"]),
        ("SimCLR, spectral batches", "simclr.py", ["--batching", "spectral"]))


def bench_reproduce(args):
    rows = []
    for name, script, flags in GRID:
        for batch in map(int, args.batches.split(",")):
            cell = []
            for seed in map(int, args.seeds.split(",")):
                # equal views: M = 4 views for half the epochs process as many views as 2 views for all
                epochs = args.epochs // 2 if "HALF" in flags else args.epochs
                out = os.path.join(args.runs, f"{re.sub('[^a-z0-9]+', '-', name.lower())}-b{batch}-s{seed}")
                cmd = [sys.executable, script, "--data", args.data or "fashion-mnist", "--arch", "resnet18",
                       "--batch", str(batch), "--epochs", str(epochs), "--warmup-epochs", str(min(10, epochs / 10)),
                       "--temperature", str(args.temperature), "--subset", str(args.subset), "--seed", str(seed),
                       "--knn-every", str(epochs), "--workers", "0", "--out-dir", out] + [f for f in flags if f != "HALF"]
                if args.dry_run:
                    print(" ".join(cmd[1:]))
                    continue
                log = os.path.join(out, "log.jsonl")
                records = [json.loads(line) for line in open(log)] if os.path.exists(log) else []
                if not any("linear_top1" in r for r in records):
                    tick = time.time()
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    records = [json.loads(line) for line in open(log)]
                    records.append(dict(wall_seconds=time.time() - tick))
                    with open(log, "a") as f:
                        f.write(json.dumps(records[-1]) + "\n")
                get = lambda key: [r[key] for r in records if key in r][-1]
                sc = [(r["spectral_batch_loss"], r["random_batch_loss"]) for r in records if "spectral_batch_loss" in r]
                cell.append(dict(lin=get("linear_top1"), knn=get("knn_top1"), wall=get("wall_seconds"), sc=sc[-1] if sc else None))
            if cell:
                rows.append(dict(method=name, batch=batch, cell=cell))
    if args.dry_run:
        return
    ms = lambda xs: f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")
    print("| method | batch | linear top-1 | kNN top-1 | seeds | minutes per run | in-batch loss, last rebuild: spectral / random |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        sc = [c["sc"] for c in r["cell"] if c["sc"]]
        print(f"| {r['method']} | {r['batch']} | {ms([c['lin'] for c in r['cell']])} | {ms([c['knn'] for c in r['cell']])} "
              f"| {len(r['cell'])} | {statistics.mean(c['wall'] for c in r['cell']) / 60:.1f} | "
              + (f"{ms([s for s, _ in sc])} / {ms([q for _, q in sc])}" if sc else "") + " |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
        for ax, key in zip(axes, ("lin", "knn")):
            for name in dict.fromkeys(r["method"] for r in rows):
                mine = [r for r in rows if r["method"] == name]
                ys = [[c[key] for c in r["cell"]] for r in mine]
                ax.errorbar([r["batch"] for r in mine], [statistics.mean(y) for y in ys],
                            yerr=[statistics.stdev(y) if len(y) > 1 else 0 for y in ys], marker="o", capsize=3, label=name)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("global batch size")
            ax.set_ylabel(("linear" if key == "lin" else "kNN") + " top-1 (%)")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{args.data or 'fashion-mnist'}, resnet18, {args.epochs} epochs, T {args.temperature}"
                     + (f", {args.subset} training images" if args.subset else ""))
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"wrote {args.plot}")


FMNIST_FILES = [f"{p}-{k}-idx{d}-ubyte.gz" for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
METHODS = ("simclr", "sogclr", "dcl", "flatnce", "polyview")


def fmnist_problem(root):
    """Why Fashion-MNIST cannot be read from `root`, or None. Checked here: common would otherwise try a
    download, which the GPU machine cannot do."""
    missing = [f for f in FMNIST_FILES if not os.path.isfile(os.path.join(root, f))]
    return (f"no {missing[0]} in {root}: mkdir -p data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz "
            "data/fashion-mnist/ here, carry data/fashion-mnist to the GPU machine, or set --fmnist-dir") if missing else None


def train_run(script, flags, out):
    """One in-process run of a method script (its main() reads sys.argv): images/s from its log.jsonl and
    the peak GPU memory of the whole run (training and the 1-epoch probe)."""
    module = __import__(script)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix=f"bench-{script}-") as d:  # fresh: a checkpoint there would resume
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
               linear_top1=[r["linear_top1"] for r in records if "linear_top1" in r][-1])


def gpu_parts(args):
    """[(name, what it measures, budget in s, fn(out))]: fn fills `out`, so a part that fails midway keeps
    what it measured. The GPU budgets add up to 450 s; the estimates behind them are untested guesses."""
    toy, fm = args.toy, not fmnist_problem(common.DEBIAN_FMNIST)
    cli = lambda *a: parser().parse_args([str(x) for x in a])
    steps = ("--warmup", 0, "--steps", 1) if toy else ("--warmup", 5, "--steps", 20)
    compiles = ("off",) if toy else ("off", "on")  # separate calls: a slow compile loses only its own rows

    def pipeline(out):
        sizes = ("--data", jpeg_folder(16, "data/bench-jpeg-toy"), "--arch", "resnet18", "--batch", 4,
                 "--ref-batch", 4, "--workers", 1) if toy else ()
        for c in compiles:
            out[c] = bench_pipeline(cli("pipeline", *sizes, *steps, "--compile", c))

    def pipeline_fmnist(out):
        if fmnist_problem(common.DEBIAN_FMNIST):
            raise FileNotFoundError(fmnist_problem(common.DEBIAN_FMNIST))
        sizes = ("--batch", 8, "--ref-batch", 16, "--workers", 1) if toy else ("--batch", 32)
        for c in compiles:
            out[c] = bench_pipeline(cli("pipeline", "--data", "fashion-mnist", "--arch", "resnet18", *sizes, *steps, "--compile", c))

    if toy:
        data = ("--data", "synthetic", "--subset", 16, "--batch", 8, "--workers", 0, "--log-every", 1, "--lin-batch", 8)
    elif fm:  # 40 steps at B 256, a rate logged every 10
        data = ("--data", "fashion-mnist", "--subset", 10240, "--batch", 256, "--workers", 8, "--log-every", 10, "--lin-batch", 256)
    else:  # no Fashion-MNIST copy: the 384 synthetic images, 6 steps of 64
        data = ("--data", "synthetic", "--batch", 64, "--workers", 8, "--log-every", 2, "--lin-batch", 64)
    flags = data + ("--arch", "resnet18", "--epochs", 1, "--warmup-epochs", 1, "--knn-every", 0, "--lin-epochs", 1)
    views, n = ("512", 2048) if toy else ("", 1_281_167)
    parts = [("pipeline", f"{'resnet18 B 4' if toy else 'ResNet-50 B 256'} views/s: compute bound (a), our data path (b), "
              f"torchvision (c); compile {', '.join(compiles)}", 190, pipeline),
             ("pipeline-fmnist", f"Fashion-MNIST resnet18 B {8 if toy else 32} views/s (a, b, c) and epoch time over "
              f"B {16 if toy else 256}'s; compile {', '.join(compiles)}", 80, pipeline_fmnist),
             ("loss", f"InfoNCE fwd+bwd, dense vs tiled, {views or '8k to 256k'} views: ms, MiB, TFLOP/s", 45,
              lambda out: out.update(bench_loss(cli("loss", *(("--views", views) if views else ()))))),
             ("spectral", f"spectral_batches over {n} x 128 embeddings: seconds", 45,
              lambda out: out.update(bench_spectral(cli("spectral", "--views", n))))]
    parts += [(f"train-{m}", f"{m}.py, 1 epoch of {data[1]} at B {data[data.index('--batch') + 1]}: img/s, peak MiB", 18,
               functools.partial(train_run, m, flags)) for m in METHODS]
    return [(name, what, 120 if toy else budget, fn) for name, what, budget, fn in parts]  # toy: slack for shared CPUs


def run_part(name, budget, fn):
    """Fail-soft: an exception (SystemExit too) or going over `budget` seconds (SIGALRM, so only between
    Python bytecodes: a hung CUDA kernel is not interrupted) marks the part failed; the rest still runs."""
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
    gc.collect()  # a failed part's tensors, held by its frames, would shrink the next part's GPU memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return dict(name=name, status="failed" if error else "ok", seconds=seconds, budget_s=budget, error=error,
                traceback=trace, results=out)


def headline(part):
    r = part["results"]
    if part["name"].startswith("pipeline"):
        return "  ".join(f"compile {c}: a {v['a']:.0f} b {v['b']:.0f} c {v['c']:.0f}" + (
            f" epoch x {v['epoch_ratio']:.2f}" if "epoch_ratio" in v else "") for c in r for v in [r[c]["views_per_s"][c]])
    if part["name"] == "loss":
        return "  ".join(f"{x['views']}: tiled {x['tiled_ms']:.1f} ms" if isinstance(x["tiled_ms"], float) else
                         f"{x['views']}: {x['tiled_ms']}" for x in r["rows"][-2:])
    if part["name"] == "spectral":
        return f"{r['n']}: {r['seconds']:.1f} s, {r['batches']} batches"
    return f"{r['img_per_s']:.0f} img/s, peak {r['peak_mib'] or 0:.0f} MiB, linear {r['linear_top1']:.1f}%"


def bench_gpu(args):
    args.json = args.json or "bench-gpu.json"
    # Fashion-MNIST is found only at common.DEBIAN_FMNIST (the GPU machine has no Debian package and no
    # internet); common.py is not bench's to change, so point that constant at the copy and drop the cache.
    default = "data/fashion-mnist" if os.path.isdir("data/fashion-mnist") else common.DEBIAN_FMNIST
    common.DEBIAN_FMNIST = os.path.abspath(args.fmnist_dir or default)
    common.base_datasets.cache_clear()
    parts = gpu_parts(args)
    chosen = args.parts.split(",") if args.parts else [name for name, *_ in parts]
    unknown = set(chosen) - {name for name, *_ in parts}
    if unknown:
        sys.exit(f"error: --parts {','.join(sorted(unknown))}: no such part; choose from {', '.join(n for n, *_ in parts)}")
    parts = [p for p in parts if p[0] in chosen]
    if args.dry_run:
        for name, what, budget, _ in parts:
            print(f"{name:>16} {budget:>4} s  {what}")
        print(f"{'total':>16} {sum(p[2] for p in parts):>4} s  at most; Fashion-MNIST from {common.DEBIAN_FMNIST}")
        return
    if not args.toy and not torch.cuda.is_available():
        sys.exit("error: no GPU visible; use --toy for the CPU sizes, or --dry-run to list the parts")
    cuda = torch.cuda.is_available()
    report = dict(hardware=dict(device=torch.cuda.get_device_name() if cuda else "CPU", torch=torch.__version__,
                                cuda=torch.version.cuda, cpus=os.cpu_count()), toy=args.toy, parts=[])
    print(json.dumps(report["hardware"]), flush=True)
    for name, what, budget, fn in parts:
        print(f"\n== {name} ({budget} s budget): {what}", flush=True)
        report["parts"].append(run_part(name, budget, fn))
        with open(args.json + ".tmp", "w") as f:  # after every part: a run killed later keeps what it measured
            json.dump(report, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    print(f"\n{'part':>16} {'status':>7} {'s':>6}  result")
    for p in report["parts"]:
        print(f"{p['name']:>16} {p['status']:>7} {p['seconds']:6.1f}  {p['error'] or headline(p)}")
    print(f"wrote {args.json}")


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("loss", "loss-one", "spectral", "spectral-toy", "spectral-deviations", "mechanisms", "pipeline", "reproduce", "gpu"))
    p.add_argument("--views", default=None, help="comma-separated view counts (loss-one: one number)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--chunk", type=int, default=4096, help="tile size of the chunked path")
    p.add_argument("--mode", choices=("dense", "chunked"), default="chunked", help="loss-one only")
    p.add_argument("--data", default=None, help="pipeline: ImageFolder root or named small set (default: synthetic JPEGs)")
    p.add_argument("--images", type=int, default=5000, help="pipeline: synthetic JPEGs to make")
    p.add_argument("--arch", default="resnet50", choices=common.ARCHS)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ref-batch", type=int, default=256, help="pipeline: the batch whose epoch time --batch's is compared with")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--steps", type=int, default=50, help="pipeline: timed steps (0 with --save-grid: the grid only)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--compile", choices=("off", "on", "both"), default=None, help="default: both on GPU, off on CPU")
    p.add_argument("--save-grid", default=None, help="pipeline: write augmented views of both pipelines to this PNG")
    p.add_argument("--batches", default="32,128,512", help="reproduce: global batch sizes")
    p.add_argument("--seeds", default="0,1,2", help="reproduce: seeds")
    p.add_argument("--epochs", type=int, default=50, help="reproduce: pretraining epochs")
    p.add_argument("--temperature", type=float, default=0.1, help="reproduce: T of every method")
    p.add_argument("--subset", type=int, default=0, help="reproduce: training images (0: all)")
    p.add_argument("--runs", default="runs/reproduce", help="reproduce: where the runs go")
    p.add_argument("--dry-run", action="store_true", help="reproduce: print the commands only; gpu: list the parts")
    p.add_argument("--plot", default=None, help="reproduce: write accuracy against batch size to this PNG; "
                   "mechanisms: q against batch size")
    p.add_argument("--q-images", type=int, default=1024, help="mechanisms: Fashion-MNIST test images embedded for q")
    p.add_argument("--checkpoint", default=None, help="mechanisms: a simclr.py checkpoint.pt (resnet18, fashion-mnist) "
                   "as the pretrained backbone, e.g. the quick start's runs/demo/checkpoint.pt (default: train one here)")
    p.add_argument("--pretrain-images", type=int, default=2048, help="mechanisms: images of the short pretraining")
    p.add_argument("--pretrain-epochs", type=int, default=2, help="mechanisms: its epochs at B 128")
    p.add_argument("--toy-steps", type=int, default=2048, help="mechanisms: SGD steps of every synthetic run")
    p.add_argument("--toy", action="store_true", help="gpu: every part at tiny sizes (CPU, tests)")
    p.add_argument("--parts", default=None, help="gpu: comma-separated parts to run (default: all)")
    p.add_argument("--fmnist-dir", default=None, help="gpu: folder of Fashion-MNIST's 4 idx .gz files "
                   "(default: data/fashion-mnist if there, else " + common.DEBIAN_FMNIST + ")")
    p.add_argument("--json", default=None, help="gpu (default bench-gpu.json), mechanisms: where the results go")
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
    else:
        seconds, peak = loss_step(int(args.views), args.mode, args.device or "cpu", args.chunk)
        print(json.dumps(dict(views=int(args.views), mode=args.mode, seconds=seconds, peak_extra_bytes=peak)))


if __name__ == "__main__":
    main()
