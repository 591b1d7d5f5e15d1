"""common.py: the plumbing every method script shares, and nothing method-specific.

Sections, in order: errors, distributed, similarity (the exact tiled logsumexp every loss
is built on), data, augmentation, model, optimisation, arguments, training loop with
checkpoints and logging, evaluation (kNN monitor and linear probe). A method file
(simclr.py, ...) defines its loss and train step and calls `build`, `pretrain` and
`linear_eval` from here; see README.md for the commands.
"""
import argparse
import functools
import gzip
import json
import math
import os
import struct
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset
from torchvision.transforms import v2 as T
from tqdm import tqdm

# ----------------------------------------------------------------------------- errors


class BadInput(Exception):
    """A mistake the user can fix (path, flag, file); reported as one line, no traceback."""


def run(main):
    """Call main(); turn BadInput into `error: ...` on stderr and exit status 2."""
    try:
        main()
    except BadInput as e:
        # An error raised in a DataLoader worker comes back wrapped in the worker's
        # traceback text; its last line is ours.
        msg = str(e).strip().splitlines()[-1].split("BadInput: ")[-1]
        print(f"error: {msg}", file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- distributed


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def setup_distributed():
    """Join the torchrun job if there is one (RANK/WORLD_SIZE/LOCAL_RANK set), else run
    as one process. nccl on GPU, gloo on CPU. Returns the device of this rank."""
    cuda = torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums every rank's gradient w.r.t. the gathered tensor
    (all_reduce) and keeps this rank's slice, because this rank's rows were candidates
    in every rank's loss. Returning only the local slice without the all_reduce drops
    the terms where these rows are negatives for other ranks (SogCLR's issue #1)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n:(dist.get_rank() + 1) * n]


def gather_with_grad(x):
    """(n, ...) local rows -> (n * world, ...) rows of all ranks in rank order, with the
    gradient flowing back to every rank. The identity when not distributed."""
    return x if world() == 1 else _GatherWithGrad.apply(x)


def gather_rows(x):
    """Concatenate tensors of possibly different lengths from all ranks, in rank order,
    without gradient (evaluation). Pads to the longest for all_gather, then trims."""
    if world() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    pad = torch.zeros((int(max(sizes)),) + x.shape[1:], dtype=x.dtype, device=x.device)
    pad[: x.shape[0]] = x
    parts = [torch.empty_like(pad) for _ in range(world())]
    dist.all_gather(parts, pad)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


# ----------------------------------------------------------------------------- similarity

# Losses compute the (anchors x candidates) logits densely up to this many entries (256 MiB
# for one fp32 copy; the dense path's peak is a few copies), in tiles of AUTO_CHUNK beyond.
DENSE_LIMIT = 2 ** 26
AUTO_CHUNK = 4096


def _tile_logits(scaled, candidates, exclude, col0):
    """<anchor/T, candidate> for one tile of the tiled path (no autograd), each row's
    excluded columns (global indices, or None for no exclusion) set to -inf in place."""
    logits = scaled @ candidates.T
    if exclude is not None:
        n = logits.shape[1]
        cols = exclude - col0
        inside = (cols >= 0) & (cols < n)
        # amin with +inf leaves a column unchanged, so columns outside this tile are no-ops.
        fill = torch.where(inside, float("-inf"), float("inf")).to(logits.dtype)
        logits.scatter_reduce_(1, cols.clamp(0, n - 1), fill, "amin")
    return logits


class _ChunkedLogSumExp(torch.autograd.Function):
    """Exact logsumexp over tiles of chunk x chunk logits, never the whole matrix (the
    Inf-CL idea). Forward: an online, max-shifted logsumexp per row. Backward: recomputes
    each tile; d lse_a / d logit_ac is softmax_ac = exp(logit_ac - lse_a), so
    grad_anchor_a = sum_c g_a softmax_ac cand_c / T and grad_cand_c = sum_a g_a softmax_ac anchor_a / T.
    Memory O(chunk^2) beyond inputs and outputs."""

    @staticmethod
    def forward(ctx, anchors, candidates, temperature, exclude, chunk):
        lse = torch.empty(len(anchors), dtype=anchors.dtype, device=anchors.device)
        for r in range(0, len(anchors), chunk):
            scaled, ex = anchors[r:r + chunk] / temperature, None if exclude is None else exclude[r:r + chunk]
            top = torch.full((len(scaled),), float("-inf"), dtype=scaled.dtype, device=scaled.device)
            total = torch.zeros_like(top)
            for c in range(0, len(candidates), chunk):
                cand = candidates[c:c + chunk]
                logits = _tile_logits(scaled, cand, ex, c)
                new_top = torch.maximum(top, logits.amax(1))
                shift = new_top.masked_fill(new_top == float("-inf"), 0.0)  # rows with nothing yet
                total = total * torch.exp(top - shift) + logits.sub_(shift[:, None]).exp_().sum(1)
                top = new_top
            lse[r:r + chunk] = top + torch.log(total)
        ctx.save_for_backward(anchors, candidates, exclude, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return lse

    @staticmethod
    def backward(ctx, grad):
        anchors, candidates, exclude, lse = ctx.saved_tensors
        t, chunk = ctx.temperature, ctx.chunk
        # A row with every column excluded has lse = -inf and passes no gradient (as in the
        # dense path): zero its incoming gradient, which may be nan, and use lse = +inf so
        # that its weights are exp(-inf) = 0 rather than exp(-inf + inf) = nan.
        empty = lse == float("-inf")
        grad, lse = grad.masked_fill(empty, 0.0), lse.masked_fill(empty, float("inf"))
        grad_a, grad_c = torch.zeros_like(anchors), torch.zeros_like(candidates)
        for r in range(0, len(anchors), chunk):
            a, ex = anchors[r:r + chunk], None if exclude is None else exclude[r:r + chunk]
            scaled, g = a / t, grad[r:r + chunk, None] / t
            for c in range(0, len(candidates), chunk):
                cand = candidates[c:c + chunk]
                logits = _tile_logits(scaled, cand, ex, c)
                weight = logits.sub_(lse[r:r + chunk, None]).exp_().mul_(g)
                grad_a[r:r + chunk].addmm_(weight, cand)
                grad_c[c:c + chunk].addmm_(weight.T, a)
        return grad_a, grad_c, None, None, None


def similarity_logsumexp(anchors, candidates, temperature, exclude=None, chunk_size=None):
    """lse_a = log sum_{c not in exclude[a]} exp(<anchor_a, candidate_c> / T), shape (A,).
    anchors (A, D), candidates (N, D), exclude (A, E) global column indices or None.
    chunk_size: None chooses (dense while A x N <= DENSE_LIMIT, else tiles of AUTO_CHUNK);
    0 is always dense; n > 0 is tiles of n x n (same values and gradients, O(n^2) memory).
    The maths runs in at least fp32, whatever the input dtype."""
    dtype = torch.promote_types(anchors.dtype, torch.float32)
    anchors, candidates = anchors.to(dtype), candidates.to(dtype)
    if chunk_size is None:
        chunk_size = 0 if len(anchors) * len(candidates) <= DENSE_LIMIT else AUTO_CHUNK
    if chunk_size == 0:
        logits = anchors / temperature @ candidates.T
        if exclude is not None:  # out of place: autograd then saves only the indices
            logits = logits.scatter(1, exclude, float("-inf"))
        if exclude is None or len(candidates) > exclude.shape[1]:
            return torch.logsumexp(logits, dim=1)
        # Some row may exclude every candidate (a batch of one image): its lse is -inf, and
        # logsumexp's backward would give nan, exp(-inf - -inf), instead of no gradient.
        empty = (logits == float("-inf")).all(1)
        return torch.logsumexp(logits.masked_fill(empty[:, None], 0.0), dim=1).masked_fill(empty, float("-inf"))
    return _ChunkedLogSumExp.apply(anchors, candidates, temperature, exclude, chunk_size)


def two_view_terms(z1, z2, temperature, chunk_size=None):
    """What every two-view loss is made of. z1, z2: (B, D) raw projections of this rank.
    Normalises them, gathers all ranks' views as candidates (with gradient) and returns,
    for this rank's 2B anchors (view 1 rows, then view 2 rows):
      z        (2B, D)  the normalised anchors;
      positive (2B,)    s(x_i^k, x_i^o) / T, the other view of the same image;
      negative (2B,)    log sum_{z in N_i} exp(s(x_i^k, z) / T), N_i = both views of every
                        other image of the global batch, 2(BW - 1) entries.
    InfoNCE's denominator, which also holds the positive, is logaddexp(negative, positive)."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = gather_with_grad(z)  # (2BW, D): rank r's views at rows 2Br .. 2B(r+1)-1
    rows = torch.arange(2 * b, device=z.device)
    partner = (rows + b) % (2 * b)
    exclude = rank() * 2 * b + torch.stack([rows, partner], dim=1)  # itself and its positive
    positive = (z * z[partner]).sum(1) / temperature
    return z, positive, similarity_logsumexp(z, candidates, temperature, exclude, chunk_size)


# ----------------------------------------------------------------------------- data

NAMED = ("cifar10", "cifar100", "stl10", "fashion-mnist", "synthetic")
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Views(Dataset):
    """Wraps a base dataset of (image, label) and yields (views, label, index): `n_views`
    independently augmented copies, so every view of every sample draws its own random
    crop, flip and colour parameters. `index` is the position in the dataset (SogCLR's u)."""

    def __init__(self, base, transform, n_views):
        self.base, self.transform, self.n_views = base, transform, n_views

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return torch.stack([self.transform(img) for _ in range(self.n_views)]), label, i


def load_image(path):
    """PIL loader that names the broken file instead of failing deep inside PIL."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"cannot decode image {path} ({type(e).__name__}); delete or replace that file") from None


def _read_idx(path):
    """An idx file (MNIST format, gzip): uint8 payload after a big-endian shape header."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(raw[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def _synthetic(train):
    """At most 512 images of 32 px: 10 classes, each a fixed coarse 4x4 colour layout,
    plus per-image noise. Crops and colour jitter keep enough of the layout that a
    contrastive model learns it, so kNN and linear accuracy rise above 10% chance."""
    protos = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    n = 384 if train else 128
    g = torch.Generator().manual_seed(1 if train else 2)
    labels = torch.arange(n) % 10
    x = F.interpolate(protos[labels], size=32, mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.randn(x.shape, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels


def _torchvision_set(name, root, train):
    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}.get(name)
    try:
        if cls:
            ds = cls(root, train=train, download=True)
            return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
        if name == "stl10":
            ds = torchvision.datasets.STL10(root, split="train" if train else "test", download=True)
            return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()
        ds = torchvision.datasets.FashionMNIST(root, train=train, download=True)
        return ds.data.unsqueeze(1), ds.targets
    except Exception as e:  # offline machines fail here with a long urllib chain
        raise BadInput(f"{name} is not under --data-root {root} and could not be downloaded "
                       f"({type(e).__name__}); download it there on a machine with internet") from None


def base_datasets(args):
    """(train, val, meta) with train/val yielding (image, label). meta: size, channels,
    classes, stats (mean, std), folder (an ImageFolder root of full-size photos)."""
    return _base_datasets(args.data, args.data_root)


@functools.lru_cache(maxsize=2)  # the kNN monitor and the probe ask again; scanning a folder is slow
def _base_datasets(name, root):
    if name not in NAMED:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(name, split)):
                raise BadInput(f"--data {name}: no folder {os.path.join(name, split)}; "
                               f"give an ImageFolder root holding train/ and val/, or one of {', '.join(NAMED)}")
        try:
            train, val = (torchvision.datasets.ImageFolder(os.path.join(name, s), loader=load_image) for s in ("train", "val"))
        except (FileNotFoundError, RuntimeError) as e:
            raise BadInput(f"--data {name}: {e}") from None
        meta = dict(size=224, channels=3, classes=len(train.classes), stats=IMAGENET_STATS, folder=True)
        return train, val, meta
    if name == "synthetic":
        (xt, yt), (xv, yv) = _synthetic(True), _synthetic(False)
    elif name == "fashion-mnist" and os.path.isdir(DEBIAN_FMNIST):
        files = [os.path.join(DEBIAN_FMNIST, f"{p}-{k}-idx{d}-ubyte.gz")
                 for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
        xt, yt, xv, yv = (_read_idx(f) for f in files)
        xt, xv, yt, yv = xt.unsqueeze(1), xv.unsqueeze(1), yt.long(), yv.long()
    else:
        (xt, yt), (xv, yv) = (_torchvision_set(name, root, t) for t in (True, False))
    stats = {"cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
             "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
             "fashion-mnist": ((0.286,), (0.353,)), "stl10": IMAGENET_STATS}.get(name, ((0.5,) * 3, (0.25,) * 3))
    meta = dict(size=xt.shape[-1], channels=xt.shape[1], classes=int(yt.max()) + 1, stats=stats, folder=False)
    return TensorDataset(xt, yt), TensorDataset(xv, yv), meta  # uint8 (N, C, H, W) images in memory


def subset_indices(total, n, seed):
    """A fixed random choice of n of `total` samples (n = 0: all), the same on every rank."""
    if not n or n >= total:
        return list(range(total))
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].tolist()


def subset(ds, n, seed):
    keep = subset_indices(len(ds), n, seed)
    return ds if len(keep) == len(ds) else torch.utils.data.Subset(ds, keep)


# ----------------------------------------------------------------------------- augmentation
# SimCLR's recipe (Chen et al. 2020, appendix A) with per-sample random parameters, split so
# that no CPU core touches a pixel it does not have to. Photo folders: DataLoader workers
# read, decode at reduced size where the crop allows (JPEG draft mode) and RandomResizedCrop
# to uint8 (`Crops`). Small sets: the whole uint8 set sits on the device and the crop is a
# batched bilinear resample. Everything else (flip, colour jitter in a random order per
# sample, grayscale, blur, normalisation) runs in `augment` on the device, in batches. All
# random parameters come from torch's CPU RNG, which the checkpoint saves, so resumes are
# exact; they follow torchvision's distributions (tested against its samplers in test_losses.py).
# Deviations from torchvision's per-image pipeline: colour operations run on floats
# (torchvision rounds uint8 images to integers after each one); no solarize (SimCLR has none).


def recipe(meta):
    """Photos (> 64 px): colour jitter strength 1.0, blur p 0.5 with a kernel of 10% of the
    side. Small colour images (<= 64 px): strength 0.5 and no blur, as in the paper's CIFAR-10
    runs. Grayscale data: no colour operations."""
    large = meta["size"] > 64
    return dict(colour=meta["channels"] == 3, strength=1.0 if large else 0.5,
                blur=int(0.1 * meta["size"]) // 2 * 2 + 1 if large else 0)


def crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params for n crops at once, as a float (n, 4)
    tensor of (top, left, h, w): up to 10 tries of an area fraction ~ U(scale) and a
    log-uniform aspect ratio, the first that fits, else a centre crop of clamped ratio."""
    area = height * width * torch.empty(n, 10).uniform_(*scale)
    r = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * r).sqrt().round(), (area / r).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    if width / height < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, (torch.rand(n) * (height - h + 1)).floor(), ((height - h) // 2))
    left = torch.where(found, (torch.rand(n) * (width - w + 1)).floor(), ((width - w) // 2))
    return torch.stack([top, left, h, w], 1)


def sample_augmentation(n, meta, height=None, width=None):
    """Random parameters for n views, on the CPU: (floats, jitter, lengths). floats is
    (n, 11): crop box (top, left, h, w; only when height and width are given, else zeros),
    flip, grayscale, brightness, contrast, saturation and hue factors, blur sigma (0: no blur).
    jitter holds 16 index lists, one per (position, operation) of the colour jitter, whose
    order is a uniform random permutation per sample, applied with p 0.8; lengths their sizes."""
    rec = recipe(meta)
    s = rec["strength"]
    box = crop_boxes(n, height, width) if height else torch.zeros(n, 4)
    flip = (torch.rand(n) < 0.5).float()
    factors = torch.stack([torch.empty(n).uniform_(max(0, 1 - 0.8 * s), 1 + 0.8 * s) for _ in range(3)]
                          + [torch.empty(n).uniform_(-0.2 * s, 0.2 * s)], 1)
    jittered, order = torch.rand(n) < 0.8, torch.rand(n, 4).argsort(1)  # argsort of uniforms: a uniform permutation
    gray = (torch.rand(n) < 0.2).float()
    sigma = torch.empty(n).uniform_(0.1, 2.0) * (torch.rand(n) < 0.5)
    if not rec["colour"]:
        jittered, gray = torch.zeros(n, dtype=torch.bool), torch.zeros(n)
    if not rec["blur"]:
        sigma = torch.zeros(n)
    jitter = [torch.nonzero(jittered & (order[:, k] == op))[:, 0] for k in range(4) for op in range(4)]
    return torch.cat([box, flip[:, None], gray[:, None], factors, sigma[:, None]], 1), jitter, [len(j) for j in jitter]


def _gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # ITU-R 601-2, as torchvision


def _hue(x, shift):
    """torchvision's adjust_hue (RGB -> HSV, h + shift mod 1, -> RGB) in closed form:
    channel c = v - (v - min) * clamp(min(k, 4 - k), 0, 1), k = (n_c + 6h) mod 6, n = 5, 3, 1."""
    v, lo = x.amax(1), x.amin(1)
    r, g, b = x.unbind(1)
    delta = v - lo
    d = torch.where(delta > 0, delta, 1)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, (b - r) / d + 2, (r - g) / d + 4))
    h = (h / 6 + shift[:, None, None]) % 1
    k = (torch.arange(5.0, 0.0, -2.0, device=x.device)[None, :, None, None] + 6 * h[:, None]) % 6  # made on the device: no copy
    return v[:, None] - delta[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)


_JITTER = (lambda x, f: x * f[:, None, None, None],  # brightness, contrast, saturation: torchvision's blends
           lambda x, f: f[:, None, None, None] * x + (1 - f[:, None, None, None]) * _gray(x).mean((2, 3), keepdim=True),
           lambda x, f: f[:, None, None, None] * x + (1 - f[:, None, None, None]) * _gray(x),
           _hue)


def augment(x, floats, jitter, meta, crop):
    """The device half of the recipe for a batch x (n, C, H, W) uint8 with the parameters of
    sample_augmentation (already on x's device). With `crop`, crop and flip are one
    bilinear resample to meta's size (sample coordinates clamped to the box, which is what
    resizing the cropped image does); without, x holds the crops already and is flipped.
    Returns normalised float32 views, channels_last."""
    size, rec = meta["size"], recipe(meta)
    top, left, h, w, flip, gray = floats[:, :6].unbind(1)
    if crop:
        o = (torch.arange(size, device=x.device) + 0.5) / size
        ys = torch.minimum(torch.maximum(top[:, None] + o * h[:, None] - 0.5, top[:, None]), (top + h - 1)[:, None])
        xs = torch.minimum(torch.maximum(left[:, None] + o * w[:, None] - 0.5, left[:, None]), (left + w - 1)[:, None])
        xs = torch.where(flip[:, None] > 0, xs.flip(1), xs)
        grid = torch.stack(torch.broadcast_tensors(((2 * xs + 1) / x.shape[3] - 1)[:, None, :],
                                                   ((2 * ys + 1) / x.shape[2] - 1)[:, :, None]), 3)
        x = F.grid_sample(x.float() / 255, grid, mode="bilinear", padding_mode="border", align_corners=False)
    else:
        x = x.float() / 255
        x = torch.where(flip[:, None, None, None] > 0, x.flip(3), x)
    if rec["colour"]:
        factors = floats[:, 6:10]
        for i, idx in enumerate(jitter):  # position i // 4, operation i % 4
            if len(idx):
                x.index_copy_(0, idx, _JITTER[i % 4](x[idx], factors[idx, i % 4]).clamp_(0, 1))
        x = torch.where(gray[:, None, None, None] > 0, _gray(x).expand_as(x), x)
    if rec["blur"]:
        # Per-sample Gaussian kernels as torchvision builds them (a delta where sigma is 0),
        # applied separably as one grouped convolution over the reflect-padded batch.
        sigma, k = floats[:, 10], rec["blur"]
        t = torch.arange(k, device=x.device) - k // 2
        pdf = torch.exp(-0.5 * (t / torch.where(sigma > 0, sigma, 1)[:, None]) ** 2)
        kern = torch.where(sigma[:, None] > 0, pdf / pdf.sum(1, keepdim=True), (t == 0).float())
        kern = kern.repeat_interleave(x.shape[1], 0)[:, None]  # (n * C, 1, k)
        y = F.pad(x, [k // 2] * 4, mode="reflect").view(1, -1, size + k - 1, size + k - 1)
        y = F.conv2d(F.conv2d(y, kern[..., None, :], groups=len(kern)), kern[..., None], groups=len(kern))
        x = y.view(x.shape)
    mean, std = _normalisation(tuple(map(tuple, meta["stats"])), x.device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=8)  # a host-to-device copy from pageable memory waits for the GPU: make them once
def _normalisation(stats, device):
    return tuple(torch.tensor(s, device=device)[None, :, None, None] for s in stats)


class Crops(Dataset):
    """Photo folders, the worker half: (n_views uint8 RandomResizedCrops, label, index) per
    image. The crop boxes are drawn on the full image size first; JPEGs then decode at the
    smallest of 1, 1/2, 1/4, 1/8 scale that still gives every crop `size` pixels or more
    (PIL draft mode), and PIL crops and resizes (antialiased bilinear) in one call."""

    def __init__(self, samples, size, n_views):
        self.samples, self.size, self.n_views = samples, size, n_views

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                width, height = img.size
                boxes = crop_boxes(self.n_views, height, width)
                need = self.size / boxes[:, 2:].min().item()  # the smallest crop's side must stay >= size
                img.draft("RGB", (math.ceil(width * need), math.ceil(height * need)))
                img = img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise BadInput(f"cannot decode image {path} ({type(e).__name__}); delete or replace that file") from None
        sy, sx = img.height / height, img.width / width
        crops = [img.resize((self.size, self.size), Image.BILINEAR, box=(l * sx, t * sy, (l + w) * sx, (t + h) * sy))
                 for t, l, h, w in boxes.tolist()]
        return torch.stack([torchvision.transforms.functional.pil_to_tensor(c) for c in crops]), label, i


def train_dataset(args, n_views=2):
    # Under torchrun, local rank 0 reads (and if need be downloads) first, the others after.
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world() > 1 and not first:
        dist.barrier()
    train, _, meta = base_datasets(args)
    if world() > 1 and first:
        dist.barrier()
    keep = subset_indices(len(train), args.subset, args.seed)
    if meta["folder"]:
        return Crops([train.samples[i] for i in keep], meta["size"], n_views), meta
    return TensorDataset(*(t[keep] for t in train.tensors)), meta


def to_device(t, device):
    """Host-to-device copy that does not wait for the GPU: pinned memory, non-blocking."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def augmented_batches(train_set, meta, rows, n_views, workers, device):
    """Yields (views (n_views, b, C, S, S) float on the device, index (b,) on the device) for
    each row of `rows`, 1-D tensors of indices into train_set. Small sets: train_set is a
    TensorDataset whose uint8 images are already on the device; there are no workers. Photo
    folders: a Crops set (with its own n_views) read by `workers` DataLoader workers. The
    only host-to-device traffic per step is the uint8 crops (folders) and the parameters,
    pinned and non-blocking: no step waits for the GPU."""
    if meta["folder"]:
        source = DataLoader(train_set, batch_sampler=[r.tolist() for r in rows], num_workers=workers,
                            pin_memory=device.type == "cuda")
    else:
        images = train_set.tensors[0]
        source = ((None, None, idx) for idx in rows)
    for crops, _, idx in source:
        b, n_views = len(idx), n_views if crops is None else crops.shape[1]
        floats, jitter, lengths = sample_augmentation(n_views * b, meta, *(() if crops is not None else images.shape[2:]))
        longs, floats = to_device(torch.cat([idx] + jitter), device), to_device(floats, device)
        idx, jitter = longs[:b], longs[b:].split(lengths)
        if crops is None:  # view v of sample j is row v * b + j
            x = images[idx].repeat(n_views, 1, 1, 1)
        else:
            x = crops.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)
        yield augment(x, floats, jitter, meta, crop=crops is None).unflatten(0, (n_views, b)), idx


def eval_transform(meta, train_aug=False):
    """Evaluation: resize 256 / centre crop 224 for photo folders, the image as is for the
    small sets. train_aug=True is the linear-probe training augmentation of MoCo v3
    (RandomResizedCrop + flip), used for photo folders."""
    if not meta["folder"]:
        ops = []
    elif train_aug:
        ops = [T.RandomResizedCrop(meta["size"], antialias=True), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(meta["size"] * 8 // 7, antialias=True), T.CenterCrop(meta["size"])]
    return T.Compose([T.ToImage()] + ops + [T.ToDtype(torch.float32, scale=True), T.Normalize(*meta["stats"])])


def loader(ds, batch, workers, sampler=None, drop_last=False):
    # Workers are not persistent: each epoch's workers then draw their seeds from the
    # torch RNG at that epoch's start, which the checkpoint restores, so a resumed run
    # sees the augmentations an uninterrupted one would have.
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=torch.cuda.is_available(), drop_last=drop_last)


def shard(n):
    """This rank's contiguous share of range(n), neither padded nor dropped (DistributedSampler
    pads), so evaluation sees every sample exactly once across ranks, in rank order."""
    return range(rank() * n // world(), (rank() + 1) * n // world())


# ----------------------------------------------------------------------------- model

ARCHS = ("resnet18", "resnet34", "resnet50")


def make_model(args, meta, device):
    """backbone (torchvision ResNet, fc removed) + projector (Linear-BN-ReLU-Linear, 2048
    hidden, 128 out), as nn.Sequential(backbone=..., projector=...). Images of 64 px or
    less get the CIFAR stem of the SimCLR paper: a 3x3 stride-1 conv and no max-pool."""
    backbone = getattr(torchvision.models, args.arch)(weights=None)
    if meta["size"] <= 64:
        backbone.conv1 = nn.Conv2d(meta["channels"], 64, 3, 1, 1, bias=False)
        backbone.maxpool = nn.Identity()
    elif meta["channels"] != 3:
        backbone.conv1 = nn.Conv2d(meta["channels"], 64, 7, 2, 3, bias=False)
    dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    projector = nn.Sequential(nn.Linear(dim, 2048), nn.BatchNorm1d(2048), nn.ReLU(inplace=True), nn.Linear(2048, 128))
    backbone.feat_dim = dim
    model = nn.Sequential()
    model.add_module("backbone", backbone)
    model.add_module("projector", projector)
    if world() > 1 and device.type == "cuda":
        # Global BN across ranks, as SimCLR does: per-GPU statistics of a few dozen
        # samples are noisy and let the model cheat. SyncBatchNorm runs only on GPUs.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device, memory_format=torch.channels_last)


def forward_views(net, views, args):
    """Forward all views (V, B, C, H, W) of the batch in one pass (bf16 autocast on GPU
    unless --precision fp32, channels_last) and return one fp32 (B, dim) tensor per view.
    The loss then runs outside autocast, so the similarity maths is fp32."""
    device = next(net.parameters()).device
    x = views.flatten(0, 1).to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
        z = net(x)
    return z.float().chunk(len(views))


# ----------------------------------------------------------------------------- optimisation


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR: for weights with more than one dimension,
    add weight decay and scale the step by the trust ratio eta * ||w|| / ||g||; biases and
    BN parameters (1-D) get the plain SGD-momentum step, no decay, no trust ratio."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        # One fused (foreach) kernel per operation across all tensors, instead of ~10 small
        # launches per tensor, and no host sync: at small batches launches are the step time.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            steps = [p.grad for p in params]
            matrices = [i for i, p in enumerate(params) if p.ndim > 1]
            if matrices:
                w = [params[i] for i in matrices]
                d = torch._foreach_add([steps[i] for i in matrices], w, alpha=group["weight_decay"])
                w_norm, d_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(d))
                trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                torch._foreach_mul_(d, list(trust.unbind()))
                for i, di in zip(matrices, d):
                    steps[i] = di
            mu = [self.state[p].setdefault("mu", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(mu, group["momentum"])
            torch._foreach_add_(mu, steps)
            torch._foreach_add_(params, mu, alpha=-group["lr"])


def lr_at(step, total, warmup, base):
    """Linear warmup over `warmup` steps (reaching `base` at step warmup - 1), then
    half-cosine from base towards 0 at step `total`. A pure function of the step."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def scale_lr(args):
    """SimCLR's scaling rule (appendix B.1): lr = 0.075 * sqrt(B) or 0.3 * B / 256, where
    --lr overrides the 0.075 or 0.3 factor. B is the global batch."""
    factor = args.lr if args.lr is not None else (0.075 if args.lr_scaling == "sqrt" else 0.3)
    return factor * (math.sqrt(args.batch) if args.lr_scaling == "sqrt" else args.batch / 256)


# ----------------------------------------------------------------------------- arguments


def get_parser(doc):
    """The flags every method shares. A method adds its own under its own prefix."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", required=True, help=f"ImageFolder root with train/ and val/, or one of {', '.join(NAMED)}")
    p.add_argument("--data-root", default="./data", help="where named torchvision datasets live or are downloaded")
    p.add_argument("--subset", type=int, default=0, help="use a fixed random subset of this many training images (0: all)")
    p.add_argument("--workers", type=int, default=8, help="data loader processes per GPU")
    # model
    p.add_argument("--arch", default="resnet50", help=f"one of {', '.join(ARCHS)}")
    # optimisation
    p.add_argument("--batch", type=int, default=256, help="global batch size, split across processes")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--lr", type=float, default=None, help="lr factor: 0.075 for sqrt scaling, 0.3 for linear")
    p.add_argument("--lr-scaling", choices=("sqrt", "linear"), default="sqrt")
    p.add_argument("--wd", type=float, default=1e-6, help="LARS weight decay (not on biases and BN)")
    # batching
    p.add_argument("--batching", choices=("random", "spectral"), default="random",
                   help="spectral: hard mini-batches by spectral clustering (Cho et al. 2023)")
    p.add_argument("--sc-every", type=int, default=1, help="spectral: rebuild the batches every N epochs")
    p.add_argument("--sc-clusters", type=int, default=40, help="spectral: batches clustered together per chunk")
    # loss
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--chunk-size", type=int, default=None,
                   help="loss similarity tiles of N x N (0: dense; default: dense up to 2^26 logits, else 4096)")
    # system
    p.add_argument("--out-dir", default="./runs/default", help="checkpoint, log and weights; resumes if it holds a checkpoint")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto", help="auto: bf16 autocast on GPU, fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the model; reduce-overhead also replays forward and backward as CUDA graphs "
                        "(for small batches, where kernel launches dominate)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    # evaluation
    p.add_argument("--knn-every", type=int, default=10, help="kNN monitor (k=200, T=0.1) every N epochs (0: off)")
    p.add_argument("--lin-epochs", type=int, default=None, help="linear probe epochs (default 90 on folders, 30 on small sets)")
    p.add_argument("--lin-batch", type=int, default=None, help="linear probe global batch (default 1024 on folders, 256 on small sets)")
    p.add_argument("--lin-lr", type=float, default=0.1, help="linear probe lr per 256 images (SGD, cosine)")
    p.add_argument("--lin-wd", type=float, default=0.0)
    return p


def setup(args):
    """Validate the shared flags, join the distributed job, print the scaled lr. Every
    check runs before any file is written, so a bad flag never touches a checkpoint."""
    w = int(os.environ.get("WORLD_SIZE", 1))
    checks = [(args.batch >= 2, f"--batch {args.batch}: a contrastive batch needs at least 2 images"),
              (args.batch % w == 0,
               f"--batch {args.batch} does not divide across {w} processes; use a multiple of {w}"),
              (args.epochs >= 0, "--epochs must be >= 0"),
              (0 <= args.warmup_epochs, "--warmup-epochs must be >= 0"),
              (args.lr is None or args.lr > 0, "--lr must be > 0"),
              (args.wd >= 0, "--wd must be >= 0"),
              (args.temperature > 0, "--temperature must be > 0"),
              (args.chunk_size is None or args.chunk_size >= 0, "--chunk-size must be >= 0 (0: dense)"),
              (args.workers >= 0, "--workers must be >= 0"),
              (args.log_every > 0, "--log-every must be > 0"),
              (args.subset >= 0, "--subset must be >= 0"),
              (args.knn_every >= 0, "--knn-every must be >= 0"),
              (args.sc_every >= 1, "--sc-every must be >= 1"),
              (args.sc_clusters >= 1, "--sc-clusters must be >= 1"),
              (args.lin_epochs is None or args.lin_epochs >= 1, "--lin-epochs must be >= 1"),
              (args.lin_batch is None or (args.lin_batch > 0 and args.lin_batch % w == 0),
               f"--lin-batch {args.lin_batch} must be a positive multiple of the {w} processes"),
              (args.lin_lr > 0, "--lin-lr must be > 0"),
              (args.arch in ARCHS, f"--arch {args.arch} is not supported; choose one of {', '.join(ARCHS)}")]
    for ok, msg in checks:
        if not ok:
            raise BadInput(msg)
    if args.data not in NAMED and not os.path.isdir(args.data):
        raise BadInput(f"--data {args.data}: no such directory; give an ImageFolder root or one of {', '.join(NAMED)}")
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise BadInput(f"--out-dir {args.out_dir} is a file; give a directory")
    device = setup_distributed()
    args.bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    args.base_lr = scale_lr(args)
    torch.manual_seed(args.seed + rank())
    if rank() == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"{world()} process(es) on {device.type}; global batch {args.batch} ({args.batch // world()} per process); "
              f"lr {args.base_lr:.4g} ({args.lr_scaling} scaling)", flush=True)
    return device


def build(args, n_views=2):
    """setup + the pretraining set with n_views views per image + the model on this
    rank's device: what every method's main starts with."""
    device = setup(args)
    train_set, meta = train_dataset(args, n_views)
    args.n_views = n_views
    return make_model(args, meta, device), train_set, meta


# ----------------------------------------------------------------------------- hard mini-batches


def _kmeans(x, k, generator, iters=25):
    """Lloyd's k-means from k distinct random rows; returns the (k, D) centres."""
    centres = x[torch.randperm(len(x), generator=generator)[:k].to(x.device)]
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)[:, None]
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # an empty cluster keeps its centre
    return centres


def _equal_size_assign(dist, size):
    """Assign each row of dist (m, k), m = k * size, to a column so that every column gets
    exactly `size` rows. Deviation: the paper runs Hungarian matching onto `size` copies of
    each centre (O(m^3)); this greedy approximation is O(k m log m): in rounds, every
    unassigned row picks its nearest centre with room, and each centre keeps its nearest
    pickers up to its room (for good; full centres drop out)."""
    m, k = dist.shape
    assign = torch.full((m,), -1, dtype=torch.long, device=dist.device)
    room = torch.full((k,), size, dtype=torch.long, device=dist.device)
    dist = torch.nan_to_num(dist.float(), nan=1e30, posinf=1e30)  # full centres alone are +inf
    while True:
        free = (assign < 0).nonzero().squeeze(1)
        if len(free) == 0:
            return assign
        choice = dist[free].argmin(1)
        order = dist[free, choice].argsort()
        order = order[choice[order].argsort(stable=True)]  # by centre, nearest first
        centre = choice[order]
        rank_in = torch.arange(len(order), device=dist.device) - torch.searchsorted(centre, centre)
        take = rank_in < room[centre]
        if not take.any():
            raise RuntimeError("equal-size assignment made no progress")  # cannot happen with room == rows left
        assign[free[order[take]]] = centre[take]
        room -= torch.bincount(centre[take], minlength=k)
        dist[:, room == 0] = float("inf")


def spectral_batches(z1, z2, batch_size, temperature=0.1, clusters=40, generator=None):
    """Hard mini-batches by spectral clustering (Cho et al. 2023, "Mini-Batch Optimization of
    Contrastive Loss", their official procedure). z1, z2: (N, D) embeddings of two views of
    every training image, row i = dataset index i. Returns a list of LongTensors of exactly
    batch_size indices each, no index twice, covering all but fewer than batch_size images.

    Shuffle and cut into chunks of clusters x B. In a chunk, with u, v the normalised
    embeddings divided by sqrt(T), A_ij = log(1 + (B-1) exp(u_i.v_j - u_i.v_i)) +
    log(1 + (B-1) exp(v_i.u_j - u_i.v_i)) approximates the loss the pair adds when i and j
    share a batch; A <- A + A^T, W = exp(A). The spectral embedding of W (the `clusters`
    bottom eigenvectors of the normalised Laplacian, rows normalised) is split by k-means,
    then into clusters of exactly B (see _equal_size_assign): each cluster is a batch of
    pairs that are hard for each other. A last partial chunk gets as many clusters as it
    holds whole batches."""
    b = batch_size
    u = F.normalize(z1.float(), dim=1) / math.sqrt(temperature)
    v = F.normalize(z2.float(), dim=1) / math.sqrt(temperature)
    order = torch.randperm(len(u), generator=generator).to(u.device)
    batches = []
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
        a = a + a.T
        # No self-loops, as in the official code's Laplacian: W_ii = exp(A_ii) ~ B^4 would
        # otherwise dwarf every off-diagonal weight and make D^-1/2 W D^-1/2 ~ I.
        a.fill_diagonal_(float("-inf"))
        # D^-1/2 W D^-1/2 with W = exp(A), in the log domain (no overflow, no fp64 copies).
        # Its eigenvalues lie in [-1, 1] and its top eigenvectors are the normalised
        # Laplacian's bottom ones; subspace iteration on it + I (so in [0, 2]) finds them.
        log_d = a.logsumexp(1)
        s = torch.exp(a - log_d[:, None] / 2 - log_d[None, :] / 2)
        q = torch.randn(len(s), k, generator=generator).to(s.device)
        for _ in range(30):
            q = torch.linalg.qr(s @ q + q).Q
        emb = F.normalize(q, dim=1)  # row normalisation (Ng, Jordan and Weiss); rotation-invariant for k-means
        assign = _equal_size_assign(torch.cdist(emb, _kmeans(emb, k, generator)), b)
        batches += list(idx[assign.argsort(stable=True)].view(k, b))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def _batch_loss(z, rows, temperature):
    """Mean NT-Xent within each batch of `rows` on the embeddings z (N, 2, D)."""
    losses = []
    for r in rows.to(z.device):
        v = F.normalize(torch.cat([z[r, 0], z[r, 1]]), dim=1)
        s = (v @ v.T / temperature).fill_diagonal_(float("-inf"))
        i = torch.arange(len(v), device=v.device)
        losses.append((s.logsumexp(1) - s[i, (i + len(r)) % len(v)]).mean())
    return float(torch.stack(losses).mean())


@torch.no_grad()
def spectral_epoch(args, model, train_set, meta, epoch):
    """Embed every training image (two augmented views, model in eval mode, no grad) and
    build this epoch's global batches; rank 0 clusters and broadcasts, so every rank trains
    on the same global batches. Returns a (batches, B) LongTensor on the CPU."""
    device, mine = next(model.parameters()).device, shard(len(train_set))
    model.eval()
    z = [torch.stack(forward_views(model, views[:2], args), 1) for views, _ in augmented_batches(
        train_set, meta, torch.arange(mine.start, mine.stop).split(256), 2, args.workers, device)]
    model.train()
    z = gather_rows(torch.cat(z))  # row i = index i
    batches = torch.empty(len(train_set) // args.batch, args.batch, dtype=torch.long, device=z.device)
    if rank() == 0:
        g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        batches = torch.stack(spectral_batches(z[:, 0], z[:, 1], args.batch, args.temperature, args.sc_clusters, g))
        # Cho et al.'s measure: the mean in-batch loss of these batches and of random ones. The
        # full-batch loss is the same for both, so a higher value is a smaller gap to it.
        random = torch.randperm(len(z), generator=g)[:batches.numel()].view_as(batches)
        log_line(args, dict(epoch=epoch + 1, spectral_batch_loss=_batch_loss(z, batches, args.temperature),
                            random_batch_loss=_batch_loss(z, random, args.temperature)))
    if world() > 1:
        dist.broadcast(batches, 0)
    return batches.cpu()


# ----------------------------------------------------------------------------- training loop


def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync, rename over the old one. A crash mid-write
    leaves the previous checkpoint whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state():
    """Every rank's torch RNG (CPU and CUDA). The torch RNG drives the DataLoader's worker
    seeds, hence all augmentation; the sampler order is seed + epoch."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    if world() == 1:
        return [state]
    states = [None] * world()
    dist.all_gather_object(states, state)
    return states


def log_line(args, record):
    if rank() == 0:
        with open(os.path.join(args.out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def pretrain(args, model, train_set, train_step, buffers=None):
    """Train `model` with `train_step(net, views, index) -> loss` (or `(loss, {name:
    scalar tensor})` to log more) for args.epochs epochs.
    LARS, warmup + cosine per step, DDP when distributed, optional torch.compile. One
    rolling checkpoint (model, optimizer, step, epoch, method `buffers` module, RNG,
    args) at the end of every epoch; resumes from it automatically."""
    device = next(model.parameters()).device
    per_rank = args.batch // world()
    if len(train_set) < args.batch:
        raise BadInput(f"--batch {args.batch} is larger than the {len(train_set)} training images; lower --batch")
    meta = base_datasets(args)[2]
    if not meta["folder"]:  # small sets: the whole uint8 set moves to the device once
        train_set = TensorDataset(*(t.to(device) for t in train_set.tensors))
    # Whole global batches only: every index is used at most once per epoch and all ranks
    # take the same number of equal-size steps (gather_with_grad needs equal sizes).
    steps_per_epoch = len(train_set) // args.batch
    batches = None  # --batching spectral: this epoch's global batches
    total, warmup = steps_per_epoch * args.epochs, round(steps_per_epoch * args.warmup_epochs)
    opt = LARS(model.parameters(), lr=args.base_lr, weight_decay=args.wd)
    path = os.path.join(args.out_dir, "checkpoint.pt")
    found = torch.tensor([os.path.exists(path)], dtype=torch.float32, device=device)
    if world() > 1:
        dist.all_reduce(found)
    if 0 < found.item() < world():  # rank 0 writes; every rank must read the same file
        raise BadInput(f"only some processes see {path}; --out-dir must be on a file system shared by all nodes")
    start_epoch = 0
    if found.item():
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            if buffers is not None:
                buffers.load_state_dict(ckpt["buffers"])
        except Exception as e:
            raise BadInput(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                           f"move it away to start afresh, or use another --out-dir") from None
        if ckpt["step"] != ckpt["epoch"] * steps_per_epoch:
            raise BadInput(f"checkpoint {path} was made with {ckpt['step'] // max(1, ckpt['epoch'])} steps per epoch, "
                           f"this run has {steps_per_epoch}; use the same --batch and data, or another --out-dir")
        if len(ckpt["rng"]) == world():
            torch.set_rng_state(ckpt["rng"][rank()]["cpu"])
            if device.type == "cuda" and ckpt["rng"][rank()]["cuda"] is not None:
                torch.cuda.set_rng_state(ckpt["rng"][rank()]["cuda"])
        start_epoch, batches = ckpt["epoch"], ckpt.get("batches")
        n_batches = len(train_set) // args.batch
        if batches is not None and (batches.shape != (n_batches, args.batch) or batches.max() >= len(train_set)):
            batches = None  # made for other data or another batch size: rebuild
        if rank() == 0:
            print(f"resumed from epoch {start_epoch} (step {ckpt['step']}) of {path}", flush=True)
    step = start_epoch * steps_per_epoch
    if world() > 1:  # with SyncBatchNorm on GPUs the BN buffers already agree; no broadcast needed
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                      broadcast_buffers=device.type != "cuda")
    else:
        net = model
    torch.backends.cudnn.benchmark = True
    if args.compile:
        net = torch.compile(net, mode=args.compile)

    for epoch in range(start_epoch, args.epochs):
        if args.batching == "spectral":
            if batches is None or epoch % args.sc_every == 0:
                tick = time.time()
                batches = spectral_epoch(args, model, train_set, meta, epoch)
                log_line(args, dict(epoch=epoch + 1, spectral_seconds=time.time() - tick))
            # A fresh order of the batches each epoch, the same on every rank (with --sc-every > 1
            # the same batches come back, not in the same order).
            rows = batches[torch.randperm(len(batches), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))]
        else:  # a fresh random partition into global batches, the same on every rank
            perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch))
            rows = perm[:steps_per_epoch * args.batch].view(steps_per_epoch, args.batch)
        rows = rows[:, rank() * per_rank:(rank() + 1) * per_rank]  # this rank's share of each global batch
        data = augmented_batches(train_set, meta, rows, args.n_views, args.workers, device)
        model.train()
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        tick, seen = time.time(), 0
        with tqdm(data, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch, disable=rank() != 0,
                  dynamic_ncols=True, leave=False) as bar:
            for i, (views, index) in enumerate(bar):
                lr = lr_at(step, total, warmup, args.base_lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss = train_step(net, views, index)
                loss, extras = loss if isinstance(loss, tuple) else (loss, {})  # extras: scalars to log
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step, seen = step + 1, seen + args.batch
                nonfinite |= ~torch.isfinite(loss.detach())
                if step % args.log_every == 0 or i == steps_per_epoch - 1:
                    logged = torch.stack([loss.detach(), nonfinite.float()] + [v.float() for v in extras.values()])
                    if world() > 1:  # all ranks stop together; the logged values are means over ranks
                        dist.all_reduce(logged)
                        logged[[0] + list(range(2, len(logged)))] /= world()
                    value, *extra_values = [logged[0].item()] + logged[2:].tolist()  # synchronises: honest rate
                    if logged[1] > 0:
                        raise BadInput(f"non-finite loss by step {step} (now {value}); stopped, the last good "
                                       f"checkpoint {path} is intact; lower --lr or check the data")
                    rate, tick, seen = seen / (time.time() - tick), time.time(), 0
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                    log_line(args, dict(epoch=epoch + 1, step=step, loss=value, lr=lr, img_per_s=rate,
                                        views_per_s=rate * len(views), **dict(zip(extras, extra_values))))
        # The weights too: a last step can blow them up after a finite loss.
        nonfinite |= ~torch.stack([p.isfinite().all() for p in model.parameters()]).all()
        if world() > 1:
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        if nonfinite:
            raise BadInput(f"non-finite loss or weights in epoch {epoch + 1}; stopped, the last good checkpoint "
                           f"{path} is intact; lower --lr or check the data")
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            acc = knn_monitor(args, model.backbone)  # before the RNG snapshot: it draws from the RNG too
            log_line(args, dict(epoch=epoch + 1, knn_top1=acc))
            if rank() == 0:
                print(f"epoch {epoch + 1}: kNN top-1 {acc:.2f}%", flush=True)
        state = dict(model=model.state_dict(), optimizer=opt.state_dict(), step=step, epoch=epoch + 1,
                     buffers=buffers.state_dict() if buffers is not None else None, rng=_rng_state(), args=vars(args),
                     batches=batches)
        if rank() == 0:
            save_checkpoint(path, state)
            print(f"epoch {epoch + 1}/{args.epochs} done: step {step}, loss {value:.4f}", flush=True)
    if rank() == 0:
        torch.save(model.backbone.state_dict(), os.path.join(args.out_dir, "backbone.pt"))


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def features(args, net, ds):
    """net's fp32 outputs for every view of this rank's unpadded shard of `ds` (contiguous,
    so gather_rows puts row i at dataset index i), shape (n, views, dim), and the labels.
    net is in eval mode meanwhile: BN uses, and never updates, its running statistics."""
    was_training = net.training
    net.eval()
    out, labels = [], []
    for views, y, _ in loader(ds, 256, args.workers, sampler=shard(len(ds))):  # views: (B, V, C, H, W)
        out.append(torch.stack(forward_views(net, views.transpose(0, 1), args), 1))
        labels.append(y)
    net.train(was_training)
    return torch.cat(out), torch.cat(labels).to(out[0].device)


def chunked_topk(queries, bank, k, chunk=65536):
    """Top-k of queries @ bank.T (values, bank indices), over the bank in slices of
    `chunk` rows and merging the running top-k, so memory is O(queries x chunk) and a
    1.28M-image bank never becomes one similarity matrix."""
    top_v = queries.new_empty(len(queries), 0)
    top_i = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    for c in range(0, len(bank), chunk):
        v, i = (queries @ bank[c:c + chunk].T).topk(min(k, len(bank[c:c + chunk])), dim=1)
        v, i = torch.cat([top_v, v], 1), torch.cat([top_i, i + c], 1)
        top_v, pick = v.topk(min(k, v.shape[1]), dim=1)
        top_i = i.gather(1, pick)
    return top_v, top_i


def knn_monitor(args, backbone, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018, as in InstDisc/MoCo): cosine similarity to the whole
    training set, top-k neighbours vote with weight exp(sim / T). Top-1 in %."""
    train, val, meta = base_datasets(args)
    plain = eval_transform(meta)
    bank, bank_y = features(args, backbone, Views(subset(train, args.subset, args.seed), plain, 1))
    half = torch.float16 if bank.is_cuda else torch.float32  # a 1.28M x 2048 bank: 5 GB in fp16 on every GPU
    bank, bank_y = gather_rows(F.normalize(bank[:, 0], dim=1).to(half)), gather_rows(bank_y)
    q, qy = features(args, backbone, Views(val, plain, 1))
    q = F.normalize(q[:, 0], dim=1).to(bank.dtype)
    correct = torch.zeros((), device=q.device)
    for s in range(0, len(q), 256):
        sim, idx = chunked_topk(q[s:s + 256], bank, k)
        votes = torch.zeros(len(sim), meta["classes"], device=q.device)
        votes.scatter_add_(1, bank_y[idx], (sim.float() / temperature).exp())
        correct += (votes.argmax(1) == qy[s:s + 256]).sum()
    return _sum_over_ranks(correct, len(q), len(val))


def _sum_over_ranks(correct, n_local, n_expected):
    """Top-1 in % from per-rank counts; protocol check: every validation sample counted once."""
    stats = torch.tensor([float(correct), float(n_local)], dtype=torch.float64, device=correct.device)
    if world() > 1:
        dist.all_reduce(stats)
    if int(stats[1]) != n_expected:
        raise RuntimeError(f"evaluation saw {int(stats[1])} of {n_expected} validation samples")
    return float(100 * stats[0] / stats[1])


def linear_eval(args, backbone, meta):
    """Linear probe on the frozen backbone (MoCo v3 protocol: SGD momentum 0.9, lr
    args.lin_lr x B / 256, cosine, wd 0; 90 epochs and B 1024 on photo folders). The
    backbone is in eval mode, its features are computed under no_grad, and it is checked
    to be bit-identical after the first epoch. Photo folders train the probe on MoCo v3's
    augmented crops, forwarding the backbone every epoch. Small sets have no probe
    augmentation, so their features are computed once and cached (same result, far
    cheaper). Prints and returns validation top-1 in %, over every validation image once."""
    device = next(backbone.parameters()).device
    epochs = args.lin_epochs if args.lin_epochs is not None else (90 if meta["folder"] else 30)
    batch = args.lin_batch if args.lin_batch is not None else (1024 if meta["folder"] else 256)
    if batch % world():
        raise BadInput(f"--lin-batch {batch} does not divide across {world()} processes; set --lin-batch")
    train, val, _ = base_datasets(args)
    train = subset(train, args.subset, args.seed)
    backbone.eval()
    backbone.requires_grad_(False)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(args.seed)  # the same head initialisation and data order on every rank
    head = nn.Linear(backbone.feat_dim, meta["classes"]).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    lr = args.lin_lr * batch / 256

    if meta["folder"]:
        ds = Views(train, eval_transform(meta, train_aug=True), 1)
        sampler = DistributedSampler(ds, world(), rank(), shuffle=True, seed=args.seed, drop_last=True)
        data = loader(ds, batch // world(), args.workers, sampler=sampler, drop_last=True)
        model = DistributedDataParallel(head) if world() > 1 else head
    else:
        x_train, y_train = features(args, backbone, Views(train, eval_transform(meta), 1))
        x_train, y_train = gather_rows(x_train[:, 0]), gather_rows(y_train)
        model = head  # every rank trains the same head on the same cached features
    steps = len(data) if meta["folder"] else len(x_train) // batch
    if steps == 0:
        raise BadInput(f"--lin-batch {batch} is larger than the {len(train)} probe training images")
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=args.lin_wd)
    bar = tqdm(range(epochs), desc="linear probe", disable=rank() != 0, dynamic_ncols=True, leave=False)
    for epoch in bar:
        if meta["folder"]:
            sampler.set_epoch(epoch)
            batches = ((v, y.to(device)) for v, y, _ in data)
        else:
            perm = torch.randperm(len(x_train), device=device)[: steps * batch].view(steps, batch)
            batches = ((x_train[p], y_train[p]) for p in perm)
        for i, (x, y) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + i, epochs * steps, 0, lr)
            if meta["folder"]:
                with torch.no_grad():
                    x = forward_views(backbone, x.transpose(0, 1), args)[0]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if epoch == 0:
            # Protocol check: no BN statistic and no weight of the backbone moved.
            for k, v in backbone.state_dict().items():
                if not torch.equal(v, frozen[k]):
                    raise RuntimeError(f"linear protocol violated: backbone tensor {k} changed during the probe")
    x_val, y_val = features(args, backbone, Views(val, eval_transform(meta), 1))
    with torch.no_grad():
        correct = (head(x_val[:, 0]).argmax(1) == y_val).sum()
    acc = _sum_over_ranks(correct, len(x_val), len(val))
    log_line(args, dict(linear_top1=acc, lin_epochs=epochs, lin_batch=batch, lin_lr=lr))
    if rank() == 0:
        print(f"linear top-1: {acc:.2f}%", flush=True)  # the last line every script prints
    return acc

