"""common.py: what the method scripts share that is not training: data, backbone, similarity, hard
mini-batches and the evaluation helpers (kNN monitor and feature extraction). The training itself
is written out in each method file. Functions take plain values, never a script's args."""
import collections
import functools
import gzip
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision.transforms import v2 as T

class BadInput(Exception):
    """A mistake the user can fix (path, flag, file): the scripts print one line, no traceback."""

# ----------------------------------------------------------------------------- distributed
def rank():
    return dist.get_rank() if dist.is_initialized() else 0

def world():
    return dist.get_world_size() if dist.is_initialized() else 1

class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward all_reduces the gradient and keeps this rank's slice: the slice
    alone would drop the terms where these rows are other ranks' negatives (SogCLR's issue #1)."""

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
    """(n, ...) local rows -> (n * world, ...) rows of all ranks in rank order, gradient to each."""
    return x if world() == 1 else _GatherWithGrad.apply(x)

def gather_rows(x):
    """All ranks' rows in rank order, no gradient; lengths may differ (padded to the longest)."""
    if world() == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world())]
    dist.all_gather(sizes, n)
    pad = torch.cat([x, x.new_zeros((int(max(sizes)) - len(x),) + x.shape[1:])])
    parts = [torch.empty_like(pad) for _ in range(world())]
    dist.all_gather(parts, pad)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])

def shard(n):
    """This rank's contiguous share of range(n): every sample once (DistributedSampler pads)."""
    return range(rank() * n // world(), (rank() + 1) * n // world())

# ----------------------------------------------------------------------------- similarity
DENSE_LIMIT = 2 ** 26  # dense logits up to this many (256 MiB in fp32; the peak is a few)
AUTO_CHUNK = 4096

def _tiles(anchors, candidates, temperature, exclude, chunk):
    """(rows, columns, logits <anchor/T, candidate>) per chunk x chunk tile; excluded ones -inf."""
    for r in range(0, len(anchors), chunk):
        scaled = anchors[r:r + chunk] / temperature
        for c in range(0, len(candidates), chunk):
            logits = scaled @ candidates[c:c + chunk].T
            if exclude is not None:
                n, cols = logits.shape[1], exclude[r:r + chunk] - c
                # amin with +inf leaves a column unchanged: columns outside this tile are no-ops.
                fill = torch.where((cols >= 0) & (cols < n), -math.inf, math.inf).to(logits.dtype)
                logits.scatter_reduce_(1, cols.clamp(0, n - 1), fill, "amin")
            yield slice(r, r + chunk), slice(c, c + chunk), logits

class _ChunkedLogSumExp(torch.autograd.Function):
    """Exact logsumexp by chunk x chunk tiles, never the whole matrix (Inf-CL's idea): an online
    max-shifted logsumexp per row; backward recomputes tiles, d lse_a / d logit_ac = softmax_ac."""

    @staticmethod
    def forward(ctx, anchors, candidates, temperature, exclude, chunk):
        top = torch.full((len(anchors),), float("-inf"), dtype=anchors.dtype, device=anchors.device)
        total = torch.zeros_like(top)
        for rows, _, logits in _tiles(anchors, candidates, temperature, exclude, chunk):
            new_top = torch.maximum(top[rows], logits.amax(1))
            shift = new_top.masked_fill(new_top == float("-inf"), 0.0)  # rows with nothing yet
            total[rows] = (total[rows] * torch.exp(top[rows] - shift)
                           + logits.sub_(shift[:, None]).exp_().sum(1))
            top[rows] = new_top
        lse = top + torch.log(total)
        ctx.save_for_backward(anchors, candidates, exclude, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return lse

    @staticmethod
    def backward(ctx, grad):
        anchors, candidates, exclude, lse = ctx.saved_tensors
        # A row with every column excluded (lse -inf) passes no gradient, as in the dense path: zero
        # its incoming gradient (maybe nan), and lse +inf makes its weights exp(-inf) = 0, not nan.
        empty = lse == float("-inf")
        g = grad.masked_fill(empty, 0.0)[:, None] / ctx.temperature
        lse = lse.masked_fill(empty, float("inf"))
        grad_a, grad_c = torch.zeros_like(anchors), torch.zeros_like(candidates)
        for rows, cols, logits in _tiles(anchors, candidates, ctx.temperature, exclude, ctx.chunk):
            weight = logits.sub_(lse[rows, None]).exp_().mul_(g[rows])
            grad_a[rows].addmm_(weight, candidates[cols])
            grad_c[cols].addmm_(weight.T, anchors[rows])
        return grad_a, grad_c, None, None, None

def similarity_logsumexp(anchors, candidates, temperature, exclude=None, chunk_size=None):
    """lse_a = log sum_{c not in exclude[a]} exp(<anchor_a, candidate_c> / T), (A,), at least fp32;
    anchors (A, D), candidates (N, D), exclude (A, E) indices or None. chunk_size None: dense up to
    DENSE_LIMIT logits, else AUTO_CHUNK; 0: dense; n: exact n x n tiles (same values, gradients)."""
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
        # A row may exclude every candidate (a batch of one image): its lse is -inf, and logsumexp's
        # backward would give nan, exp(-inf - -inf), instead of no gradient.
        empty = (logits == float("-inf")).all(1)
        lse = torch.logsumexp(logits.masked_fill(empty[:, None], 0.0), dim=1)
        return lse.masked_fill(empty, float("-inf"))
    return _ChunkedLogSumExp.apply(anchors, candidates, temperature, exclude, chunk_size)

def two_view_terms(z1, z2, temperature, chunk_size=None):
    """Every two-view loss's terms for this rank's 2B anchors z (2B, D), normalised z1 then z2 rows,
    against all ranks' views, with gradient: positive (2B,) s(x_i^k, x_i^o) / T, the other view;
    negative (2B,) log sum_{z in N_i} exp(s(x_i^k, z) / T), N_i both views of the BW - 1 others."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    candidates = gather_with_grad(z)  # (2BW, D): rank r's views at rows 2Br .. 2B(r+1)-1
    rows = torch.arange(2 * b, device=z.device)
    partner = (rows + b) % (2 * b)
    exclude = rank() * 2 * b + torch.stack([rows, partner], dim=1)  # itself and its positive
    positive = (z * z[partner]).sum(1) / temperature
    return z, positive, similarity_logsumexp(z, candidates, temperature, exclude, chunk_size)

def chunked_topk(queries, bank, k, chunk=65536):
    """Top-k of queries @ bank.T (values, bank indices) over slices of `chunk` bank rows, merging
    the running top-k: memory O(queries x chunk), never a 1.28M-image similarity matrix."""
    top_v = queries.new_empty(len(queries), 0)
    top_i = torch.empty(len(queries), 0, dtype=torch.long, device=queries.device)
    for c in range(0, len(bank), chunk):
        v, i = (queries @ bank[c:c + chunk].T).topk(min(k, len(bank[c:c + chunk])), dim=1)
        v, i = torch.cat([top_v, v], 1), torch.cat([top_i, i + c], 1)
        top_v, pick = v.topk(min(k, v.shape[1]), dim=1)
        top_i = i.gather(1, pick)
    return top_v, top_i

# ----------------------------------------------------------------------------- data
NAMED = ("cifar10", "cifar100", "stl10", "fashion-mnist", "synthetic")
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PHOTOS = dict(size=224, channels=3, stats=IMAGENET_STATS, folder=True)  # the meta of folders

def load_image(path):
    """PIL loader that names the broken file instead of failing deep inside PIL."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"cannot decode image {path} ({type(e).__name__}); "
                       "delete or replace that file") from None

def _read_idx(path):
    """An idx file (MNIST format, gzip): uint8 payload after a big-endian shape header."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]  # raw[3]: ndim
    return torch.frombuffer(bytearray(raw[4 + 4 * raw[3]:]), dtype=torch.uint8).reshape(shape)

def _synthetic(train):
    """384 train / 128 val images of 32 px in 10 classes, each a fixed coarse 4x4 colour layout plus
    noise: augmentations keep enough of it that kNN and linear accuracy rise far above chance."""
    protos = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(384 if train else 128) % 10
    x = F.interpolate(protos[labels], size=32, mode="bilinear", align_corners=False)
    x = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1 if train else 2))
    return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels

def _stl10(root, splits):
    """STL-10's binary files (torchvision's layout) as uint8 images (N, 3, 96, 96) and labels 0-9,
    -1 for `unlabeled`, read straight into one tensor: one copy in memory."""
    path = os.path.join(root, "stl10_binary", "{}_{}.bin").format
    if not all(os.path.exists(path(s, "X")) for s in splits):  # the whole archive, 2.6 GB
        stl = torchvision.datasets.STL10
        torchvision.datasets.utils.download_and_extract_archive(stl.url, root, md5=stl.tgz_md5)
    sizes = [os.path.getsize(path(s, "X")) // (3 * 96 * 96) for s in splits]
    x = torch.empty(sum(sizes), 3, 96, 96, dtype=torch.uint8)
    for s, part in zip(splits, x.split(sizes)):
        with open(path(s, "X"), "rb") as f:
            f.readinto(part.numpy())
    y = [torch.tensor(list(open(path(s, "y"), "rb").read())) - 1 if s != "unlabeled"
         else torch.full((n,), -1) for s, n in zip(splits, sizes)]
    return x.transpose(2, 3), torch.cat(y)  # each channel is stored column by column

def _torchvision_set(name, root, split):
    """(uint8 images (N, C, H, W), labels) of split train, test or (STL-10) train+unlabeled, read
    from root, downloaded there first if absent."""
    try:
        if name == "stl10":
            return _stl10(root, split.split("+"))
        if name in ("cifar10", "cifar100"):
            ds = getattr(torchvision.datasets, name.upper())(root, split == "train", download=True)
            return torch.from_numpy(ds.data).movedim(3, 1).contiguous(), torch.tensor(ds.targets)
        ds = torchvision.datasets.FashionMNIST(root, split == "train", download=True)
        return ds.data.unsqueeze(1), ds.targets
    except Exception as e:  # offline machines fail here with a long urllib chain
        raise BadInput(f"{name} is not under --data-root {root} and could not be downloaded "
                       f"({type(e).__name__}); download it there on a machine with "
                       "internet") from None

@functools.lru_cache(maxsize=2)  # the kNN monitor and the probe ask again; folder scans are slow
def base_datasets(name, root):
    """(train, val, meta): (image, label) datasets; meta: size, channels, classes, stats, folder."""
    if name not in NAMED:
        folders = [os.path.join(name, s) for s in ("train", "val")]
        for missing in [d for d in folders if not os.path.isdir(d)][:1]:
            raise BadInput(f"{name}: no folder {missing}; give an ImageFolder root holding "
                           f"train/ and val/, or one of {', '.join(NAMED)}")
        try:
            train, val = (torchvision.datasets.ImageFolder(d, loader=load_image) for d in folders)
        except (FileNotFoundError, RuntimeError) as e:
            raise BadInput(f"{name}: {e}") from None
        return train, val, dict(PHOTOS, classes=len(train.classes))
    if name == "synthetic":
        (xt, yt), (xv, yv) = _synthetic(True), _synthetic(False)
    elif name == "fashion-mnist" and os.path.isdir(DEBIAN_FMNIST):
        files = [os.path.join(DEBIAN_FMNIST, f"{p}-{k}-idx{d}-ubyte.gz")
                 for p in ("train", "t10k") for k, d in (("images", 3), ("labels", 1))]
        xt, yt, xv, yv = (_read_idx(f) for f in files)
        xt, xv, yt, yv = xt.unsqueeze(1), xv.unsqueeze(1), yt.long(), yv.long()
    else:
        (xt, yt), (xv, yv) = (_torchvision_set(name, root, s) for s in ("train", "test"))
    stats = {"cifar10": ((0.491, 0.482, 0.447), (0.247, 0.243, 0.262)),
             "cifar100": ((0.507, 0.487, 0.441), (0.267, 0.256, 0.276)),
             "fashion-mnist": ((0.286,), (0.353,)),
             "stl10": IMAGENET_STATS}.get(name, ((0.5,) * 3, (0.25,) * 3))
    meta = dict(size=xt.shape[-1], channels=xt.shape[1], classes=int(yt.max()) + 1, stats=stats,
                folder=False)
    return TensorDataset(xt, yt), TensorDataset(xv, yv), meta  # uint8 (N, C, H, W) images in memory

def subset(ds, n, seed):
    """A fixed random n of the samples of ds (n = 0: all), the same on every rank."""
    keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return torch.utils.data.Subset(ds, keep) if 0 < n < len(ds) else ds

# ----------------------------------------------------------------------------- augmentation
# SimCLR's recipe (appendix A) with torchvision's distributions, drawn from the CPU RNG. Workers
# crop folders' photos to uint8 (`Crops`); `augment` does the rest on the device, in batches.
# Deviations: colour operations on floats (torchvision rounds uint8 after each); no solarize.
def recipe(meta):
    """Photos (> 64 px): colour jitter strength 1.0, blur p 0.5, kernel 10% of the side. Small
    images: strength 0.5, no blur, as the paper's CIFAR-10 runs. Grayscale: no colour operations."""
    large = meta["size"] > 64
    return dict(colour=meta["channels"] == 3, strength=1.0 if large else 0.5,
                blur=int(0.1 * meta["size"]) // 2 * 2 + 1 if large else 0)

def crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params for n crops at once, (n, 4) floats (top, left, h,
    w): of 10 tries the first that fits, else a centre crop of clamped aspect ratio."""
    area = height * width * torch.empty(n, 10).uniform_(*scale)
    r = torch.empty(n, 10).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w, h = (area * r).sqrt().round(), (area / r).sqrt().round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    aspect = min(max(width / height, ratio[0]), ratio[1])  # the centre-crop fallback: ratio clamped
    fw, fh = ((width, round(width / aspect)) if width / height <= aspect
              else (round(height * aspect), height))
    w, h = torch.where(found, w, float(fw)), torch.where(found, h, float(fh))
    top = torch.where(found, (torch.rand(n) * (height - h + 1)).floor(), ((height - h) // 2))
    left = torch.where(found, (torch.rand(n) * (width - w + 1)).floor(), ((width - w) // 2))
    return torch.stack([top, left, h, w], 1)

def sample_augmentation(n, meta, height=None, width=None):
    """Random parameters for n views, on the CPU: (floats, jitter, lengths). floats (n, 11): crop
    box (top, left, h, w; zeros without height and width), flip, gray, brightness, contrast,
    saturation, hue, blur sigma (0: none); jitter: 16 index lists, per (position, operation)."""
    rec = recipe(meta)
    s = rec["strength"]
    box = crop_boxes(n, height, width) if height else torch.zeros(n, 4)
    flip = (torch.rand(n) < 0.5).float()
    factors = torch.stack([torch.empty(n).uniform_(max(0, 1 - 0.8 * s), 1 + 0.8 * s)
                           for _ in range(3)] + [torch.empty(n).uniform_(-0.2 * s, 0.2 * s)], 1)
    jittered, order = torch.rand(n) < 0.8, torch.rand(n, 4).argsort(1)  # a uniform permutation
    gray = (torch.rand(n) < 0.2).float()
    sigma = torch.empty(n).uniform_(0.1, 2.0) * (torch.rand(n) < 0.5)
    if not rec["colour"]:
        jittered, gray = torch.zeros(n, dtype=torch.bool), torch.zeros(n)
    if not rec["blur"]:
        sigma = torch.zeros(n)
    jitter = [(jittered & (order[:, k] == op)).nonzero()[:, 0] for k in range(4) for op in range(4)]
    floats = torch.cat([box, flip[:, None], gray[:, None], factors, sigma[:, None]], 1)
    return floats, jitter, [len(j) for j in jitter]

def _gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # ITU-R 601-2

def _hue(x, shift):
    """torchvision's adjust_hue (RGB -> HSV, h + shift mod 1, -> RGB) in closed form:
    channel c = v - (v - min) * clamp(min(k, 4 - k), 0, 1), k = (n_c + 6h) mod 6, n = 5, 3, 1."""
    (r, g, b), v = x.unbind(1), x.amax(1)
    delta = v - x.amin(1)
    d = torch.where(delta > 0, delta, 1)
    h = torch.where(v == r, (g - b) / d, torch.where(v == g, (b - r) / d + 2, (r - g) / d + 4))
    h = (h / 6 + shift[:, None, None]) % 1
    n = torch.arange(5.0, 0.0, -2.0, device=x.device)  # made on the device: no copy
    k = (n[None, :, None, None] + 6 * h[:, None]) % 6
    return v[:, None] - delta[:, None] * torch.minimum(k, 4 - k).clamp(0, 1)

_JITTER = (lambda x, f: x * f[:, None, None, None],  # brightness, contrast, saturation: blends
           lambda x, f: (f[:, None, None, None] * x
                         + (1 - f[:, None, None, None]) * _gray(x).mean((2, 3), keepdim=True)),
           lambda x, f: f[:, None, None, None] * x + (1 - f[:, None, None, None]) * _gray(x),
           _hue)

def augment(x, floats, jitter, meta, crop):
    """The device half of the recipe: normalised float32 channels_last views of a uint8 batch x
    (n, C, H, W), sample_augmentation's parameters on its device. With `crop`, crop and flip are one
    bilinear resample (coordinates clamped to the box, as resizing the crop); else x is crops."""
    size, rec = meta["size"], recipe(meta)
    top, left, h, w, flip, gray = floats[:, :6].unbind(1)
    if crop:
        o = (torch.arange(size, device=x.device) + 0.5) / size
        top, left, h, w = top[:, None], left[:, None], h[:, None], w[:, None]
        ys = torch.minimum(torch.maximum(top + o * h - 0.5, top), top + h - 1)
        xs = torch.minimum(torch.maximum(left + o * w - 0.5, left), left + w - 1)
        xs = torch.where(flip[:, None] > 0, xs.flip(1), xs)
        grid = torch.stack(torch.broadcast_tensors(((2 * xs + 1) / x.shape[3] - 1)[:, None, :],
                                                   ((2 * ys + 1) / x.shape[2] - 1)[:, :, None]), 3)
        x = F.grid_sample(x.float() / 255, grid, padding_mode="border", align_corners=False)
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
        # Per-sample Gaussian kernels as torchvision's (a delta where sigma is 0), separable.
        sigma, k = floats[:, 10], rec["blur"]
        t = torch.arange(k, device=x.device) - k // 2
        pdf = torch.exp(-0.5 * (t / torch.where(sigma > 0, sigma, 1)[:, None]) ** 2)
        kern = torch.where(sigma[:, None] > 0, pdf / pdf.sum(1, keepdim=True), (t == 0).float())
        kern = kern.repeat_interleave(x.shape[1], 0)[:, None]  # (n * C, 1, k)
        y = F.pad(x, [k // 2] * 4, mode="reflect").view(1, -1, size + k - 1, size + k - 1)
        y = F.conv2d(y, kern[..., None, :], groups=len(kern))
        x = F.conv2d(y, kern[..., None], groups=len(kern)).view(x.shape)
    mean, std = _normalisation(tuple(map(tuple, meta["stats"])), x.device)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)

@functools.lru_cache(maxsize=8)  # a host-to-device copy from pageable memory waits for the GPU
def _normalisation(stats, device):
    return tuple(torch.tensor(s, device=device)[None, :, None, None] for s in stats)

class Crops(Dataset):
    """Photo folders, the worker half: (n_views uint8 RandomResizedCrops, label, index) per image.
    JPEGs decode at the smallest of 1, 1/2, 1/4, 1/8 scale that keeps every crop >= `size` px."""

    def __init__(self, samples, size, n_views):
        self.samples, self.size, self.n_views = samples, size, n_views

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f)
                width, height = img.size
                boxes = crop_boxes(self.n_views, height, width)
                need = self.size / boxes[:, 2:].min().item()  # the smallest crop stays >= size
                img.draft("RGB", (math.ceil(width * need), math.ceil(height * need)))
                img = img.convert("RGB")
        except (OSError, SyntaxError, ValueError) as e:
            raise BadInput(f"cannot decode image {path} ({type(e).__name__}); "
                           "delete or replace that file") from None
        sy, sx = img.height / height, img.width / width
        crops = [img.resize((self.size, self.size), Image.BILINEAR,
                            box=(left * sx, top * sy, (left + w) * sx, (top + h) * sy))
                 for top, left, h, w in boxes.tolist()]
        return torch.stack([T.functional.pil_to_tensor(c) for c in crops]), label, i

def has_labels(name):
    """Whether --data `name` has labels to evaluate on: a named set or a folder with train/."""
    return name in NAMED or os.path.isdir(os.path.join(name, "train"))

def _unlabelled(folder):
    """(path, -1) for every image file under `folder`, recursively: a folder without labels."""
    kinds = torchvision.datasets.folder.IMG_EXTENSIONS
    found = [(os.path.join(d, f), -1) for d, _, files in sorted(os.walk(folder, followlinks=True))
             for f in sorted(files) if f.lower().endswith(kinds)]
    if not found:
        raise BadInput(f"--data {folder}: no image files ({' '.join(kinds)}) under it; give a "
                       "folder of images, an ImageFolder root (train/, val/) or one of "
                       + ", ".join(NAMED))
    return found

def train_dataset(name, root, n, seed, n_views, device="cpu", eval_data=None):
    """(pretraining set, meta): n random training images (0: all). Photo folders: Crops of train/,
    or of every image under `name` if it has no train/ (no labels). STL-10: train + unlabeled, as
    its papers pretrain. Small sets: uint8 images whole on `device`. Reads `eval_data` too: a
    mistake there stops the run now, not after pretraining."""
    # Under torchrun, local rank 0 reads (and if need be downloads) first, the others after.
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world() > 1 and not first:
        dist.barrier()
    if has_labels(name):
        train, _, meta = base_datasets(name, root)
        samples = train.samples if meta["folder"] else None
    else:
        samples, meta = _unlabelled(name), dict(PHOTOS, classes=0)
    if name == "stl10":
        train = TensorDataset(*_torchvision_set(name, root, "train+unlabeled"))
    evaluation = base_datasets(eval_data, root) if eval_data else None
    if world() > 1 and first:
        dist.barrier()
    if evaluation and evaluation[2]["channels"] != meta["channels"]:
        raise BadInput(f"--eval-data {eval_data} has {evaluation[2]['channels']} channel(s), "
                       f"--data {name} {meta['channels']}; evaluate on images like those")
    keep = list(subset(range(len(samples or train)), n, seed))
    if rank() == 0:  # the images each stage uses
        print(f"pretraining on {len(keep)} images" + (
            f"; evaluating on {len(subset(evaluation[0], n, seed))} training, "
            f"{len(evaluation[1])} validation images of {eval_data}" if evaluation else ""))
    if samples:
        return Crops([samples[i] for i in keep], meta["size"], n_views), meta
    return TensorDataset(*((t[keep] if n else t).to(device) for t in train.tensors)), meta

def augmented_batches(train_set, meta, rows, n_views, workers, device):
    """(views (n_views, b, C, S, S), index (b,)) per row of `rows`, on the device: small sets live
    there, folders use `workers` workers; only uint8 crops and parameters cross, non-blocking."""
    def to_device(t):
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
    if meta["folder"]:
        source = DataLoader(train_set, batch_sampler=[r.tolist() for r in rows],
                            num_workers=workers, pin_memory=device.type == "cuda")
    else:
        images = train_set.tensors[0]
        source = ((None, None, idx) for idx in rows)
    for crops, _, idx in source:
        b, n_views = len(idx), n_views if crops is None else crops.shape[1]
        box_from = images.shape[2:] if crops is None else ()  # (height, width): crop on the device
        floats, jitter, lengths = sample_augmentation(n_views * b, meta, *box_from)
        longs, floats = to_device(torch.cat([idx] + jitter)), to_device(floats)
        idx, jitter = longs[:b], longs[b:].split(lengths)
        if crops is None:  # view v of sample j is row v * b + j
            x = images[idx].repeat(n_views, 1, 1, 1)
        else:
            x = crops.to(device, non_blocking=True).transpose(0, 1).flatten(0, 1)
        yield augment(x, floats, jitter, meta, crop=crops is None).unflatten(0, (n_views, b)), idx

def eval_transform(meta, train_aug=False):
    """Photo folders: resize 256, centre crop 224 (train_aug: MoCo v3's probe RandomResizedCrop +
    flip). uint8 out, normalised on the device: float32 would be 154 MB of shm per 256 at 224 px."""
    if not meta["folder"]:
        ops = []
    elif train_aug:
        ops = [T.RandomResizedCrop(meta["size"], antialias=True), T.RandomHorizontalFlip()]
    else:
        ops = [T.Resize(meta["size"] * 8 // 7, antialias=True), T.CenterCrop(meta["size"])]
    return T.Compose([T.ToImage()] + ops)

# ----------------------------------------------------------------------------- backbone
class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d / 2d, statistics over all ranks' rows (as many on each) by a gather_with_grad of
    (sum x, sum x^2) per layer: any backend, no host sync (SyncBatchNorm: GPUs only, host syncs)."""

    def forward(self, x):
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        dims, shape = [0, *range(2, x.dim())], (1, -1) + (1,) * (x.dim() - 2)
        n = x.numel() // x.shape[1] * world()
        xf = x.to(self.weight.dtype)  # bf16 under autocast: the statistics in fp32
        sums = torch.stack([xf.sum(dims), xf.square().sum(dims)])
        mean, sq = gather_with_grad(sums[None]).sum(0) / n
        var = (sq - mean.square()).clamp_min(0)  # E[x^2] - E[x]^2, as SimCLR's cross-replica BN
        with torch.no_grad():  # the same on every rank: no buffer broadcast; running_var unbiased
            self.num_batches_tracked += 1
            torch._foreach_lerp_([self.running_mean, self.running_var], [mean, var * n / (n - 1)],
                                 self.momentum)
        scale = self.weight * (var + self.eps).rsqrt()
        return (xf * scale.view(shape) + (self.bias - mean * scale).view(shape)).to(x.dtype)

def global_batchnorm(module):
    """module, each BatchNorm a GlobalBatchNorm when distributed: per-GPU statistics are noisy."""
    for parent in list(module.modules()) if world() > 1 else []:
        for name, bn in parent.named_children():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                new = GlobalBatchNorm(bn.num_features, bn.eps, bn.momentum).to(bn.weight)
                new.load_state_dict(bn.state_dict())
                setattr(parent, name, new)
    return module

ARCHS = ("resnet18", "resnet34", "resnet50")

def make_model(arch, size, channels, device):
    """nn.Sequential(backbone=torchvision ResNet without fc, projector=Linear-BN-ReLU-Linear
    2048-128); images of 64 px or less get SimCLR's CIFAR stem (3x3 conv, no pool)."""
    backbone = getattr(torchvision.models, arch)(weights=None)
    if size <= 64:
        backbone.conv1 = nn.Conv2d(channels, 64, 3, 1, 1, bias=False)
        backbone.maxpool = nn.Identity()
    elif channels != 3:
        backbone.conv1 = nn.Conv2d(channels, 64, 7, 2, 3, bias=False)
    backbone.feat_dim = backbone.fc.in_features
    backbone.fc = nn.Identity()
    projector = nn.Sequential(nn.Linear(backbone.feat_dim, 2048), nn.BatchNorm1d(2048),
                              nn.ReLU(inplace=True), nn.Linear(2048, 128))
    model = nn.Sequential(collections.OrderedDict(backbone=backbone, projector=projector))
    return global_batchnorm(model).to(device, memory_format=torch.channels_last)

def forward_views(net, views, precision="fp32"):
    """All views (V, B, C, H, W) in one pass, channels_last, under autocast for precision bf16 or
    fp16: an fp32 (B, dim) tensor per view. The loss runs outside autocast: its maths is fp32."""
    device = next(net.parameters()).device
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    x = views.flatten(0, 1).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        z = net(x.contiguous(memory_format=torch.channels_last))
    return z.float().chunk(len(views))

# ----------------------------------------------------------------------------- hard mini-batches
def _kmeans(x, k, generator, restarts=10, iters=25):
    """(k, D) centres: the lowest-inertia of `restarts` runs of k-means++ then Lloyd, as sklearn's
    KMeans in the official code (n_init 10). D^2 sampling by Gumbel-max: no host sync."""
    best, best_inertia = x[:k], torch.full((), math.inf, dtype=x.dtype, device=x.device)
    for _ in range(restarts):
        gumbel = -(-torch.rand(k, len(x), generator=generator).to(x.device).log()).log()
        centres = x[gumbel[0].argmax()[None]]  # a 1-d index: a 0-d one would sync the host
        for j in range(1, k):
            d2 = torch.cdist(x, centres).amin(1).square()
            centres = torch.cat([centres, x[(d2.log() - gumbel[j]).argmax()[None]]])
        for _ in range(iters):
            assign = torch.cdist(x, centres).argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k)[:, None]
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)  # empty: kept
        inertia = torch.cdist(x, centres).amin(1).square().sum()
        best = torch.where(inertia < best_inertia, centres, best)  # not `if`: no host sync
        best_inertia = torch.minimum(inertia, best_inertia)
    return best

def _equal_size_assign(dist, size):
    """Each row of dist (m, k), m = k * size, to a column, `size` rows each. Deviation: the paper's
    Hungarian matching onto `size` copies of each centre is O(m^3); this greedy one O(k m log m): in
    rounds, every free row picks its nearest centre with room, which keeps its nearest pickers."""
    m, k = dist.shape
    assign = torch.full((m,), -1, dtype=torch.long, device=dist.device)
    room = torch.full((k,), size, dtype=torch.long, device=dist.device)
    dist = torch.nan_to_num(dist.float(), nan=1e30, posinf=1e30)  # full centres alone are +inf
    while (assign < 0).any():  # progress every round: a centre with room takes its nearest
        free = (assign < 0).nonzero().squeeze(1)
        choice = dist[free].argmin(1)
        order = dist[free, choice].argsort()
        order = order[choice[order].argsort(stable=True)]  # by centre, nearest first
        centre = choice[order]
        rank_in = torch.arange(len(order), device=dist.device) - torch.searchsorted(centre, centre)
        take = rank_in < room[centre]
        assign[free[order[take]]] = centre[take]
        room -= torch.bincount(centre[take], minlength=k)
        dist[:, room == 0] = float("inf")
    return assign

EIG_TOL = 1e-4

def _top_eigenvectors(s, k, generator, degree=10, max_matvecs=400):
    """The top k eigenvectors of a symmetric s (n, n) with spectrum in [-1, 1] and the largest Ritz
    residual |s x - theta x|, by Chebyshev-filtered subspace iteration (Zhou and Saad 2007): 50-100
    products to EIG_TOL, where plain subspace iteration on a flat spectrum needs thousands."""
    block = min(len(s), k + max(k // 2, 8))  # oversampling: convergence runs on the gap to k + p
    q = torch.linalg.qr(torch.randn(len(s), block, generator=generator).to(s.device)).Q
    matvecs = 0
    while True:
        sq = s @ q
        theta, y = torch.linalg.eigh(q.T @ sq)  # Rayleigh-Ritz, ascending
        q, sq, theta = q @ y.flip(1), sq @ y.flip(1), theta.flip(0)
        residual = (sq[:, :k] - q[:, :k] * theta[:k]).norm(dim=0).max().item()
        matvecs += degree  # the filter's first product is sq
        if residual <= EIG_TOL or matvecs > max_matvecs:
            return q[:, :k], residual
        # Chebyshev filter on [a, c] = [-1, theta_min], scaled so that the top eigenvalue stays O(1)
        e, centre = (theta[-1].item() + 1) / 2, (theta[-1].item() - 1) / 2
        sigma = e / (1 - centre)
        x, q = q, (sq - centre * q) * (sigma / e)
        for _ in range(degree - 1):
            sigma_next = 1 / (2 / sigma - sigma)
            x, q = q, (s @ q - centre * q) * (2 * sigma_next / e) - (sigma * sigma_next) * x
            sigma = sigma_next
        q = torch.linalg.qr(q).Q

def spectral_batches(z1, z2, batch_size, temperature=0.1, clusters=40, generator=None):
    """Hard mini-batches by spectral clustering (Cho et al. 2023) from z1, z2 (N, D), embeddings of
    two views of every image. Per shuffled chunk of clusters x B, with u, v the normalised
    embeddings over sqrt(T), A_ij = log(1 + (B-1) exp(u_i.v_j - u_i.v_i)) + log(1 + (B-1)
    exp(v_i.u_j - u_i.v_i)) approximates the loss i and j add in one batch; W = exp(A + A^T).
    k-means on the `clusters` bottom eigenvectors of W's normalised Laplacian, then clusters of
    exactly B; a last partial chunk gets as many as it holds batches. Returns (LongTensors of B
    indices, none twice; the largest eigen-residual). Deviations from krafton-ai/mini-batch-cl, by
    `bench.py spectral-deviations`: no ARPACK; eval-mode embeddings; row norms; greedy matching."""
    b = batch_size
    u, v = (F.normalize(z.float(), dim=1) / math.sqrt(temperature) for z in (z1, z2))
    order = torch.randperm(len(u), generator=generator).to(u.device)
    batches, residual = [], 0.0
    for start in range(0, len(u) - b + 1, clusters * b):
        idx = order[start:start + clusters * b]
        k = len(idx) // b
        idx = idx[:k * b]
        if k == 1:
            batches.append(idx)
            continue
        uc, vc = u[idx], v[idx]
        pos, log_b = (uc * vc).sum(1, keepdim=True), math.log(b - 1)
        a = F.softplus(uc @ vc.T - pos + log_b) + F.softplus(vc @ uc.T - pos + log_b)
        a = a + a.T
        # No self-loops, as in the official Laplacian: W_ii = exp(A_ii) ~ B^4 would make the
        # normalised W ~ I. D^-1/2 W D^-1/2 in the log domain (no overflow): its eigenvalues lie
        # in [-1, 1], its top eigenvectors are the Laplacian's bottom ones.
        a.fill_diagonal_(float("-inf"))
        log_d = a.logsumexp(1)
        s = torch.exp(a - log_d[:, None] / 2 - log_d[None, :] / 2)
        q, res = _top_eigenvectors(s, k, generator)
        residual = max(residual, res)
        # Row normalisation (Ng, Jordan and Weiss; a deviation, above): rotation-invariant k-means
        emb = F.normalize(q, dim=1)
        assign = _equal_size_assign(torch.cdist(emb, _kmeans(emb, k, generator)), b)
        batches += list(idx[assign.argsort(stable=True)].view(k, b))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)], residual

@torch.no_grad()
def spectral_epoch(model, train_set, meta, batch, temperature, clusters, seed, epoch, precision,
                   workers):
    """Hard mini-batches from the current model: rank 0 clusters eval-mode embeddings of two views
    of every image and broadcasts them, returned as (n, batch) on the CPU. Stats on rank 0: Cho et
    al.'s measure, the in-batch InfoNCE of these and of random batches (higher: closer to full)."""
    tick, device, mine = time.time(), next(model.parameters()).device, shard(len(train_set))
    model.eval()
    rows = torch.arange(mine.start, mine.stop).split(256)
    z = [torch.stack(forward_views(model, views[:2], precision), 1)
         for views, _ in augmented_batches(train_set, meta, rows, 2, workers, device)]
    model.train()
    z = gather_rows(torch.cat(z))  # (N, 2, 128), row i = image i
    batches = torch.empty(len(train_set) // batch, batch, dtype=torch.long, device=z.device)
    stats = {}
    if rank() == 0:
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        found, residual = spectral_batches(z[:, 0], z[:, 1], batch, temperature, clusters, g)
        batches = torch.stack(found)
        random = torch.randperm(len(z), generator=g)[:batches.numel()].view_as(batches)
        stats = dict(spectral_batch_loss=in_batch_loss(z, batches, temperature),
                     random_batch_loss=in_batch_loss(z, random, temperature),
                     spectral_eig_residual=residual, spectral_seconds=time.time() - tick)
        if residual > EIG_TOL:
            print(f"warning: spectral eigenvectors not converged (residual {residual:.1e} > "
                  f"{EIG_TOL:g}); the batches are from the best subspace found", flush=True)
    if world() > 1:
        dist.broadcast(batches, 0)
    return batches.cpu(), stats

def epoch_rows(n, batch, seed, epoch, batches=None):
    """This rank's share of each of an epoch's global batches, the same on every rank: `batches`
    (spectral) in a fresh order, or a fresh random partition of range(n) into batches."""
    if batches is None:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        batches = perm[:n // batch * batch].view(-1, batch)
    else:
        order = torch.Generator().manual_seed(seed * 100003 + epoch)  # as spectral_epoch's
        batches = batches[torch.randperm(len(batches), generator=order)]
    return batches[:, rank() * batch // world():(rank() + 1) * batch // world()]

def in_batch_loss(z, rows, temperature):
    """The mean NT-Xent within each batch (a row of indices) of `rows` on z (N, 2, D)."""
    losses = []
    for r in rows.to(z.device):
        v = F.normalize(torch.cat([z[r, 0], z[r, 1]]), dim=1)
        s = (v @ v.T / temperature).fill_diagonal_(float("-inf"))
        i = torch.arange(len(v), device=v.device)
        losses.append((s.logsumexp(1) - s[i, (i + len(r)) % len(v)]).mean())
    return float(torch.stack(losses).mean())

# ----------------------------------------------------------------------------- evaluation
def _collate(transform, batch):  # in the workers: (images through transform, labels)
    return torch.stack([transform(x) for x, _ in batch]), torch.tensor([int(y) for _, y in batch])

@torch.no_grad()
def features(net, ds, transform, workers, precision, stats):
    """net's fp32 outputs (n, dim) and labels for this rank's shard of `ds`'s images through
    `transform` (uint8 out, normalised with `stats` here), in eval mode: BN uses its statistics."""
    device = next(net.parameters()).device
    net.eval()  # the training loop sets train mode again at each epoch's start
    mean, std = _normalisation(tuple(map(tuple, stats)), device)
    out, labels = [], []
    for x, y in DataLoader(ds, 256, sampler=shard(len(ds)), num_workers=workers,
                           collate_fn=functools.partial(_collate, transform),
                           pin_memory=device.type == "cuda"):
        x = (x.to(device, non_blocking=True).float() / 255 - mean) / std
        out.append(forward_views(net, x[None], precision)[0])
        labels.append(y)
    return torch.cat(out), torch.cat(labels).to(device)

def top1_over_ranks(correct, n_local, n_expected):
    """Top-1 in % from per-rank counts; protocol check: every validation image counted once."""
    stats = correct.new_tensor([float(correct), float(n_local)], dtype=torch.double)
    if world() > 1:
        dist.all_reduce(stats)
    if int(stats[1]) != n_expected:
        raise RuntimeError(f"evaluation saw {int(stats[1])} of {n_expected} validation images")
    return float(100 * stats[0] / stats[1])

def knn_top1(backbone, data, root, n, seed, workers, precision, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018, as InstDisc and MoCo): each validation image's top-k of the n
    training images (subset) by cosine similarity vote with weight exp(sim / T). Top-1 in %."""
    train, val, meta = base_datasets(data, root)
    train, plain = subset(train, n, seed), eval_transform(meta)
    bank, bank_y = features(backbone, train, plain, workers, precision, meta["stats"])
    half = torch.float16 if bank.is_cuda else torch.float32  # ImageNet's bank: 5 GB in fp16
    bank, bank_y = gather_rows(F.normalize(bank, dim=1).to(half)), gather_rows(bank_y)
    q, qy = features(backbone, val, plain, workers, precision, meta["stats"])
    q = F.normalize(q, dim=1).to(bank.dtype)
    correct = torch.zeros((), device=q.device)
    for s in range(0, len(q), 256):
        sim, idx = chunked_topk(q[s:s + 256], bank, k)
        votes = torch.zeros(len(sim), meta["classes"], device=q.device)
        votes.scatter_add_(1, bank_y[idx], (sim.float() / temperature).exp())
        correct += (votes.argmax(1) == qy[s:s + 256]).sum()
    return top1_over_ranks(correct, len(q), len(val))
