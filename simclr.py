"""simclr.py: SimCLR pretraining with the NT-Xent (InfoNCE) loss, then linear evaluation.

Chen, Kornblith, Norouzi, Hinton. A Simple Framework for Contrastive Learning of Visual
Representations. ICML 2020. https://arxiv.org/abs/2002.05709

    torchrun --nproc_per_node=8 simclr.py --data /path/to/imagenet --batch 256
    python simclr.py --data fashion-mnist --arch resnet18 --batch 256 --epochs 2   # one process, CPU or GPU

Defaults are the paper's ImageNet recipe: ResNet-50, LARS with lr 0.075 x sqrt(B)
(--lr-scaling sqrt; linear is 0.3 x B/256), weight decay 1e-6, T 0.1, 10 warmup epochs,
100 epochs. Deviation: the default global batch is 256, the small-batch setting this
repository is about (the paper's headline runs use 4096).

The whole method in one file; common.py holds only data, backbone and similarity code. The
sections marked "copied section" recur verbatim in every method file, checked by a test
(README: How the code is laid out).
"""
# --- copied section "imports": identical in every method file; simclr.py's is the original ---
import argparse
import inspect
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

import common
from common import BadInput, rank, world
# --- end of copied section "imports" ---

# ----------------------------------------------------------------------------- loss


def info_nce_loss(z1, z2, temperature=0.1, chunk_size=None):
    """NT-Xent, the paper's eq. (1), averaged over this rank's 2B anchors (the value; its gradient is 2x, below):

        l(i) = -log( exp(s(i, p(i))/T) / sum_{k != i} exp(s(i, k)/T) )

    s is the cosine similarity, p(i) the other view of the same image, and k runs over
    all 2B x W views of the global batch except i itself (the positive included).
    z1, z2: (B, D) raw projections of the two views on this rank, fp32 or fp64.
    chunk_size: None computes the logits densely while they are small and in exact tiles
    beyond (common.similarity_logsumexp); 0 forces dense, n > 0 tiles of n x n.
    """
    _, positive, negative = common.two_view_terms(z1, z2, temperature, chunk_size)  # (2B,) each
    # The denominator sums the positive and the negatives: logaddexp(negative, positive).
    loss = (torch.logaddexp(negative, positive) - positive).mean()
    # Gradient scale: google-research/simclr's objective is the sum of the two directions' batch means, 2x this
    # mean, and its LARS recipe was tuned with that gradient (LARS's trust ratio hides a constant factor from the
    # weights, but biases and BN parameters take plain momentum steps proportional to it). So: the value is the
    # mean (comparable logs), the gradient that of 2x the mean.
    return 2 * loss - loss.detach()


# ----------------------------------------------------------------------------- arguments
# --- copied section "arguments": identical in every method file; simclr.py's is the original ---


def get_parser():
    """The flags every method shares; get_args below adds the method's own."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", required=True, help=f"ImageFolder root with train/ and val/, or one of {', '.join(common.NAMED)}")
    p.add_argument("--data-root", default="./data", help="where named torchvision datasets live or are downloaded")
    p.add_argument("--subset", type=int, default=0, help="use a fixed random subset of this many training images (0: all)")
    p.add_argument("--workers", type=int, default=8, help="data loader processes per GPU")
    # model
    p.add_argument("--arch", default="resnet50", help=f"one of {', '.join(common.ARCHS)}")
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
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="forward autocast; auto: bf16 on GPUs with it, else fp16 with a GradScaler; fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default", choices=("default", "reduce-overhead", "max-autotune"),
                   help="torch.compile the model; reduce-overhead adds CUDA graphs (small batches: launches dominate); "
                        "max-autotune: one process only (it can hang under DDP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20, help="steps between log lines")
    # evaluation
    p.add_argument("--knn-every", type=int, default=10, help="kNN monitor (k=200, T=0.1) every N epochs (0: off)")
    p.add_argument("--lin-epochs", type=int, default=None, help="linear probe epochs (default 90 on folders, 30 on small sets)")
    p.add_argument("--lin-batch", type=int, default=None, help="linear probe global batch (default 1024 on folders, 256 on small sets)")
    p.add_argument("--lin-lr", type=float, default=0.1, help="linear probe lr per 256 images (SGD, cosine)")
    p.add_argument("--lin-wd", type=float, default=0.0)
    return p


def check_args(args):
    """Every shared flag is checked before any file is written, so a bad one never touches a checkpoint."""
    w = int(os.environ.get("WORLD_SIZE", 1))
    for flag, low in (("epochs", 0), ("warmup_epochs", 0), ("wd", 0), ("workers", 0), ("subset", 0), ("knn_every", 0),
                      ("log_every", 1), ("sc_every", 1), ("sc_clusters", 1), ("lin_epochs", 1), ("chunk_size", 0)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            raise BadInput(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= {low}")
    checks = [(args.batch >= 2, f"--batch {args.batch}: a contrastive batch needs at least 2 images"),
              (args.batch % w == 0, f"--batch {args.batch} does not divide across {w} processes; use a multiple of {w}"),
              (args.lr is None or args.lr > 0, "--lr must be > 0"), (args.temperature > 0, "--temperature must be > 0"),
              (args.lin_lr > 0, "--lin-lr must be > 0"),
              (args.lin_batch is None or (args.lin_batch > 0 and args.lin_batch % w == 0),
               f"--lin-batch {args.lin_batch} must be a positive multiple of the {w} processes"),
              (args.arch in common.ARCHS, f"--arch {args.arch} is not supported; choose one of {', '.join(common.ARCHS)}"),
              (args.data in common.NAMED or os.path.isdir(args.data),
               f"--data {args.data}: no such directory; give an ImageFolder root or one of {', '.join(common.NAMED)}"),
              (not os.path.isfile(args.out_dir), f"--out-dir {args.out_dir} is a file; give a directory"),
              # pytorch issue 140395: under DDP, max-autotune's CUDA-graph re-recording can keep compiling for ever
              (args.compile != "max-autotune" or w == 1,
               f"--compile max-autotune can hang with {w} processes (pytorch issue 140395); use --compile default")]
    for ok, msg in checks:
        if not ok:
            raise BadInput(msg)


# --- end of copied section "arguments" ---


def get_args():
    # SimCLR has no flags beyond the shared ones (--temperature, --chunk-size among them).
    args = get_parser().parse_args()
    check_args(args)
    args.n_views = 2
    return args


# ----------------------------------------------------------------------------- setup, model, optimizer
# --- copied section "setup": identical in every method file; simclr.py's is the original ---


def setup(args):
    """Join the torchrun job if there is one (WORLD_SIZE > 1), else run as one process: nccl on GPUs, gloo
    on the CPU. Resolves --precision auto (as nanoGPT: bf16 where the GPU has it, else fp16; fp32 on the
    CPU) and the lr. Returns this rank's device."""
    cuda = torch.cuda.is_available()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's --nproc_per_node
    if cuda and per_node > torch.cuda.device_count():  # every rank stops here, before any rank waits in init
        raise BadInput(f"{per_node} processes per node but {torch.cuda.device_count()} GPU(s): use "
                       f"--nproc_per_node={torch.cuda.device_count()}, or CUDA_VISIBLE_DEVICES= to run on the CPU")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if args.precision == "auto":
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    args.base_lr = scale_lr(args.lr, args.lr_scaling, args.batch)
    torch.manual_seed(args.seed + rank())
    if rank() == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"{world()} process(es) on {device.type}; global batch {args.batch} ({args.batch // world()} per process); "
              f"lr {args.base_lr:.4g} ({args.lr_scaling} scaling); {args.precision}", flush=True)
    return device


def scale_lr(factor, scaling, batch):
    """SimCLR's scaling rule (appendix B.1): lr = 0.075 x sqrt(B) or 0.3 x B / 256, B the global
    batch; --lr overrides the 0.075 or 0.3 factor."""
    if factor is None:
        factor = 0.075 if scaling == "sqrt" else 0.3
    return factor * (math.sqrt(batch) if scaling == "sqrt" else batch / 256)


def lr_at(step, total, warmup, base):
    """Linear warmup over `warmup` steps (reaching `base` at step warmup - 1), then half-cosine
    from base towards 0 at step `total`. A pure function of the step, so resume is exact."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as used by SimCLR: for weights with more than one dimension,
    add weight decay and scale the step by the trust ratio eta * ||w|| / ||g + wd w||; biases and
    BN parameters (1-D) get the plain SGD-momentum step, no decay, no trust ratio."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        # One fused (foreach) kernel per operation across all tensors, instead of ~10 small
        # launches per tensor, and no host sync: at small batches launches are the step time.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:  # once: setdefault would build (and fill) a new zeros_like every step
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            mu = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mu, group["momentum"])
            matrices = [i for i, p in enumerate(params) if p.ndim > 1]
            vectors = [i for i, p in enumerate(params) if p.ndim <= 1]
            if matrices:
                w = [params[i] for i in matrices]
                d = torch._foreach_add([w_i.grad for w_i in w], w, alpha=group["weight_decay"])
                w_norm, d_norm = torch.stack(torch._foreach_norm(w)), torch.stack(torch._foreach_norm(d))
                trust = torch.where((w_norm > 0) & (d_norm > 0), group["eta"] * w_norm / d_norm, 1.0)
                # mu += trust_i d_i as addcmul with 0-d tensors as its first factor: on CUDA one fused kernel where
                # torch has that fast path (PointwiseOpScalar0dTensorFunctor, in torch 2.14.1), else one per tensor.
                torch._foreach_addcmul_([mu[i] for i in matrices], list(trust.unbind()), d)
            if vectors:
                torch._foreach_add_([mu[i] for i in vectors], [params[i].grad for i in vectors])
            torch._foreach_add_(params, mu, alpha=-group["lr"])


# --- end of copied section "setup" ---
# ----------------------------------------------------------------------------- train step


def make_state(args, num_samples, device):
    """Per-image state of the method, saved in the checkpoint as "buffers": SimCLR has none."""
    return None


def train_step(net, views, index, state, args):
    """One step's loss on this rank's views (2, B, C, H, W) of images `index`, and scalars to log."""
    z1, z2 = common.forward_views(net, views, args.precision)  # autocast forward, fp32 outputs
    return info_nce_loss(z1, z2, args.temperature, args.chunk_size), {}


# ----------------------------------------------------------------------------- training loop
# --- copied section "training loop": identical in every method file; simclr.py's is the original ---


def save_checkpoint(path, state):
    """Atomic: write a temporary file, fsync, rename over the old one; a crash mid-write leaves the old one whole."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_states():
    """Every rank's torch RNG (CPU and CUDA): it draws the augmentations and the workers' seeds."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    states = [state] * world()
    if world() > 1:
        dist.all_gather_object(states, state)
    return states


def log_line(out_dir, record):
    if rank() == 0:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def resume(path, model, opt, scaler, state, steps_per_epoch, args):
    """Load the rolling checkpoint if there is one; returns (epoch to start at, saved spectral batches or
    None). Every rank reads the same file, so it must be on a shared file system. A checkpoint that this
    run cannot continue ends it with one line naming the cause; the file is never touched."""
    device = next(model.parameters()).device
    found = torch.tensor([os.path.exists(path)], dtype=torch.float32, device=device)
    if world() > 1:
        dist.all_reduce(found)
    if 0 < found.item() < world():
        raise BadInput(f"only some processes see {path}; --out-dir must be on a file system shared by all nodes")
    if not found.item():
        return 0, None
    fix = "move it away to start afresh, or use another --out-dir"
    try:  # torch.load's own message for a cut-off file ("Weights only load failed...") hides the cause
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BadInput(f"checkpoint {path} is damaged or truncated ({type(e).__name__}); {fix}") from None
    saved, this = ckpt.get("args") or {}, os.path.basename(__file__)
    other = sorted((set(saved) ^ set(vars(args))) - {"bf16"})  # flags that only one of the two scripts has
    if ckpt.get("script", this) != this or other:
        flags = ", ".join("--" + f.replace("_", "-") for f in other)
        writer = ckpt.get("script") or f"another method script (flags {flags})"
        raise BadInput(f"checkpoint {path} was written by {writer}, this is {this}; {fix}")
    for flag in ("arch", "batch", "subset", "pv_views", "data"):  # what makes a checkpoint unusable; --epochs may change
        now, then = getattr(args, flag, None), saved.get(flag)
        moved = flag == "data" and now not in common.NAMED and then not in common.NAMED  # a folder may move
        if then is not None and now != then and not moved:
            name = "--" + flag.replace("_", "-")
            raise BadInput(f"checkpoint {path} was made with {name} {then}, this run has {name} {now}; "
                           f"use {name} {then} to continue it, or another --out-dir")
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if state is not None:
            state.load_state_dict(ckpt["buffers"])
    except Exception as e:
        raise BadInput(f"checkpoint {path} does not fit this model ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                       f"{fix}") from None
    if scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ckpt["step"] != ckpt["epoch"] * steps_per_epoch:
        raise BadInput(f"checkpoint {path} was made with {ckpt['step'] // max(1, ckpt['epoch'])} steps per epoch, "
                       f"this run has {steps_per_epoch}; use the same --batch and data, or another --out-dir")
    if len(ckpt["rng"]) == world():  # the same number of processes: every rank continues its own stream
        torch.set_rng_state(ckpt["rng"][rank()]["cpu"])
        if device.type == "cuda" and ckpt["rng"][rank()]["cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng"][rank()]["cuda"])
    if rank() == 0:
        print(f"resumed from epoch {ckpt['epoch']} (step {ckpt['step']}) of {path}", flush=True)
    return ckpt["epoch"], ckpt.get("batches")


def pretrain(args, model, train_set, meta, state):
    """train_step on global batches of --batch images with LARS, warmup + cosine per step and
    DDP. After every epoch one rolling checkpoint (model, optimizer, step, epoch, the method's
    state, every rank's RNG, args, spectral batches), from which a rerun continues exactly."""
    device, per_rank = next(model.parameters()).device, args.batch // world()
    if len(train_set) < args.batch:
        raise BadInput(f"--batch {args.batch} is larger than the {len(train_set)} training images; lower --batch")
    if not meta["folder"]:  # small sets: the whole uint8 set moves to the device once
        train_set = torch.utils.data.TensorDataset(*(t.to(device) for t in train_set.tensors))
    # Whole global batches only: every index is used at most once per epoch and all ranks
    # take the same number of equal-size steps (gather_with_grad needs equal sizes).
    steps_per_epoch = len(train_set) // args.batch
    total, warmup = steps_per_epoch * args.epochs, round(steps_per_epoch * args.warmup_epochs)
    opt = LARS(model.parameters(), lr=args.base_lr, weight_decay=args.wd)
    # fp16 only: the loss is scaled so that small gradients survive fp16, and a step whose gradients
    # overflowed is skipped; the schedule moves on by one step all the same, as an uninterrupted run's.
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    path = os.path.join(args.out_dir, "checkpoint.pt")
    start_epoch, batches = resume(path, model, opt, scaler, state, steps_per_epoch, args)
    if batches is not None and (batches.shape != (steps_per_epoch, args.batch) or batches.max() >= len(train_set)):
        batches = None  # spectral batches made for other data or another batch size: rebuild
    step = start_epoch * steps_per_epoch
    net = model
    if world() > 1:
        # Global BN (common.make_model) keeps the BN buffers equal on every rank: no broadcast before each forward.
        # torch 2.14 has forward_sync_buffers for this and warns at broadcast_buffers; older torch has only the latter.
        name = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters \
            else "broadcast_buffers"
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **{name: False})
    torch.backends.cudnn.benchmark = True
    if args.compile:
        net = torch.compile(net, mode=args.compile)

    for epoch in range(start_epoch, args.epochs):
        if args.batching == "spectral":  # hard mini-batches (Cho et al. 2023) from the current model
            if batches is None or epoch % args.sc_every == 0:
                batches = spectral_epoch(model, train_set, meta, epoch, args)
            # A fresh order of the batches each epoch, the same on every rank (with --sc-every > 1
            # the same batches come back, not in the same order).
            rows = batches[torch.randperm(len(batches), generator=torch.Generator().manual_seed(args.seed * 100003 + epoch))]
        else:  # a fresh random partition into global batches, the same on every rank
            perm = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed + epoch))
            rows = perm[:steps_per_epoch * args.batch].view(steps_per_epoch, args.batch)
        rows = rows[:, rank() * per_rank:(rank() + 1) * per_rank]  # this rank's share of each global batch
        data = common.augmented_batches(train_set, meta, rows, args.n_views, args.workers, device)
        model.train()
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        tick, seen = time.time(), 0
        with tqdm(data, desc=f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch, disable=rank() != 0,
                  dynamic_ncols=True, leave=False) as bar:
            for i, (views, index) in enumerate(bar):
                lr = lr_at(step, total, warmup, args.base_lr)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss, extras = train_step(net, views, index, state, args)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)  # fp16: unscales the gradients, skips the step if one overflowed
                scaler.update()
                step, seen = step + 1, seen + args.batch
                nonfinite |= ~torch.isfinite(loss.detach())  # no host sync: checked at log steps
                if step % args.log_every == 0 or i == steps_per_epoch - 1:
                    logged = torch.stack([loss.detach(), nonfinite.float()] + [v.float() for v in extras.values()])
                    if world() > 1:  # all ranks stop together; the logged values are means over ranks
                        dist.all_reduce(logged)
                    value, bad, *extra_values = (logged / world()).tolist()  # synchronises: an honest rate
                    if bad > 0:
                        raise BadInput(f"non-finite loss by step {step} (now {value}); stopped, the last good "
                                       f"checkpoint {path} is intact; lower --lr or check the data")
                    rate, tick, seen = seen / (time.time() - tick), time.time(), 0
                    bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                    log_line(args.out_dir, dict(epoch=epoch + 1, step=step, loss=value, lr=lr, img_per_s=rate,
                                                views_per_s=rate * len(views), **dict(zip(extras, extra_values))))
        # The weights too: a last step can blow them up after a finite loss.
        nonfinite |= ~torch.stack([p.isfinite().all() for p in model.parameters()]).all()
        if world() > 1:
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        if nonfinite:
            raise BadInput(f"non-finite loss or weights in epoch {epoch + 1}; stopped, the last good checkpoint "
                           f"{path} is intact; lower --lr or check the data")
        if args.knn_every and ((epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs):
            acc = knn_monitor(model.backbone, args)  # before the RNG snapshot: it draws from the RNG too
            log_line(args.out_dir, dict(epoch=epoch + 1, knn_top1=acc))
            if rank() == 0:
                print(f"epoch {epoch + 1}: kNN top-1 {acc:.2f}%", flush=True)
        ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step,
                    epoch=epoch + 1, buffers=state.state_dict() if state is not None else None, rng=rng_states(),
                    args=vars(args), batches=batches, script=os.path.basename(__file__))
        if rank() == 0:
            save_checkpoint(path, ckpt)
            print(f"epoch {epoch + 1}/{args.epochs} done: step {step}, loss {value:.4f}", flush=True)
    if rank() == 0:
        torch.save(model.backbone.state_dict(), os.path.join(args.out_dir, "backbone.pt"))


@torch.no_grad()
def spectral_epoch(model, train_set, meta, epoch, args):
    """Hard mini-batches from the current model (Cho et al. 2023): embed two augmented views of every
    training image in eval mode, rank 0 clusters them into global batches (common.spectral_batches)
    and broadcasts them, so every rank trains on the same ones. Logs Cho et al.'s measure: the mean
    in-batch InfoNCE of these batches and of random ones on the same embeddings (the full-batch loss
    is the same for both, so a higher value is a smaller gap to it). A (batches, B) tensor on the CPU."""
    tick, device, mine = time.time(), next(model.parameters()).device, common.shard(len(train_set))
    model.eval()
    z = [torch.stack(common.forward_views(model, views[:2], args.precision), 1) for views, _ in common.augmented_batches(
        train_set, meta, torch.arange(mine.start, mine.stop).split(256), 2, args.workers, device)]
    model.train()
    z = common.gather_rows(torch.cat(z))  # (N, 2, 128), row i = index i
    batches = torch.empty(len(train_set) // args.batch, args.batch, dtype=torch.long, device=z.device)
    if rank() == 0:
        g = torch.Generator().manual_seed(args.seed * 100003 + epoch)
        batches, residual = common.spectral_batches(z[:, 0], z[:, 1], args.batch, args.temperature, args.sc_clusters, g)
        batches = torch.stack(batches)
        random = torch.randperm(len(z), generator=g)[:batches.numel()].view_as(batches)
        log_line(args.out_dir, dict(epoch=epoch + 1, spectral_batch_loss=in_batch_loss(z, batches, args.temperature),
                                    random_batch_loss=in_batch_loss(z, random, args.temperature),
                                    spectral_eig_residual=residual, spectral_seconds=time.time() - tick))
        if residual > common.EIG_TOL:
            print(f"warning: spectral eigenvectors not converged (residual {residual:.1e} > {common.EIG_TOL:g}); "
                  "the batches are from the best subspace found")
    if world() > 1:
        dist.broadcast(batches, 0)
    return batches.cpu()


def in_batch_loss(z, rows, temperature):
    """The mean NT-Xent within each batch (row of indices) of `rows` on the embeddings z (N, 2, D)."""
    losses = []
    for r in rows.to(z.device):
        v = F.normalize(torch.cat([z[r, 0], z[r, 1]]), dim=1)
        s = (v @ v.T / temperature).fill_diagonal_(float("-inf"))
        i = torch.arange(len(v), device=v.device)
        losses.append((s.logsumexp(1) - s[i, (i + len(r)) % len(v)]).mean())
    return float(torch.stack(losses).mean())


# --- end of copied section "training loop" ---
# ----------------------------------------------------------------------------- evaluation
# --- copied section "evaluation": identical in every method file; simclr.py's is the original ---


def loader(ds, batch, workers, sampler=None, drop_last=False):
    # Workers are not persistent: each epoch's draw their seeds from the torch RNG at its start, which
    # the checkpoint restores, so a resumed run sees the augmentations an uninterrupted one would.
    return torch.utils.data.DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=drop_last)


@torch.no_grad()
def features(net, ds, workers, precision, stats):
    """net's fp32 outputs (n, views, dim) and the labels for this rank's shard of `ds` (contiguous: after
    gather_rows row i is index i), in eval mode: BN uses, never updates, its running statistics. The
    workers send uint8 images (see common.eval_transform); they are normalised with `stats` on the device."""
    was_training = net.training
    net.eval()
    out, labels = [], []
    mean, std = (torch.tensor(s, device=next(net.parameters()).device).view(-1, 1, 1) for s in stats)
    for views, y, _ in loader(ds, 256, workers, sampler=common.shard(len(ds))):  # views: (B, V, C, H, W)
        x = (views.to(mean.device, non_blocking=True).float() / 255 - mean) / std
        out.append(torch.stack(common.forward_views(net, x.transpose(0, 1), precision), 1))
        labels.append(y)
    net.train(was_training)
    return torch.cat(out), torch.cat(labels).to(out[0].device)


def knn_monitor(backbone, args, k=200, temperature=0.1):
    """Weighted kNN (Wu et al. 2018, as in InstDisc/MoCo): cosine similarity to the whole
    training set, top-k neighbours vote with weight exp(sim / T). Top-1 in %."""
    train, val, meta = common.base_datasets(args.data, args.data_root)
    plain = common.eval_transform(meta)
    bank_set = common.Views(common.subset(train, args.subset, args.seed), plain, 1)
    bank, bank_y = features(backbone, bank_set, args.workers, args.precision, meta["stats"])
    half = torch.float16 if bank.is_cuda else torch.float32  # a 1.28M x 2048 bank: 5 GB in fp16 on every GPU
    bank, bank_y = common.gather_rows(F.normalize(bank[:, 0], dim=1).to(half)), common.gather_rows(bank_y)
    q, qy = features(backbone, common.Views(val, plain, 1), args.workers, args.precision, meta["stats"])
    q = F.normalize(q[:, 0], dim=1).to(bank.dtype)
    correct = torch.zeros((), device=q.device)
    for s in range(0, len(q), 256):
        sim, idx = common.chunked_topk(q[s:s + 256], bank, k)
        votes = torch.zeros(len(sim), meta["classes"], device=q.device)
        votes.scatter_add_(1, bank_y[idx], (sim.float() / temperature).exp())
        correct += (votes.argmax(1) == qy[s:s + 256]).sum()
    return top1_over_ranks(correct, len(q), len(val))


def top1_over_ranks(correct, n_local, n_expected):
    """Top-1 in % from per-rank counts; protocol check: every validation sample counted once."""
    stats = torch.tensor([float(correct), float(n_local)], dtype=torch.float64, device=correct.device)
    if world() > 1:
        dist.all_reduce(stats)
    if int(stats[1]) != n_expected:
        raise RuntimeError(f"evaluation saw {int(stats[1])} of {n_expected} validation samples")
    return float(100 * stats[0] / stats[1])


def linear_eval(args, backbone, meta):
    """Linear probe on the frozen backbone (MoCo v3 protocol: SGD momentum 0.9, lr --lin-lr x B / 256,
    cosine, wd 0; 90 epochs and B 1024 on photo folders). The backbone is in eval mode under no_grad,
    checked bit-identical after the first epoch. Photo folders train on MoCo v3's augmented crops,
    forwarding the backbone every epoch; small sets have no probe augmentation, so their features
    are computed once (same result, far cheaper). Prints and returns top-1 in % over all of val."""
    device = next(backbone.parameters()).device
    epochs = args.lin_epochs if args.lin_epochs is not None else (90 if meta["folder"] else 30)
    batch = args.lin_batch if args.lin_batch is not None else (1024 if meta["folder"] else 256)
    if batch % world():
        raise BadInput(f"--lin-batch {batch} does not divide across {world()} processes; set --lin-batch")
    train, val, _ = common.base_datasets(args.data, args.data_root)
    train, plain = common.subset(train, args.subset, args.seed), common.eval_transform(meta)
    backbone.eval()
    backbone.requires_grad_(False)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(args.seed)  # the same head initialisation and data order on every rank
    head = nn.Linear(backbone.feat_dim, meta["classes"]).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    lr = args.lin_lr * batch / 256
    if meta["folder"]:
        ds = common.Views(train, common.eval_transform(meta, train_aug=True), 1)
        sampler = DistributedSampler(ds, world(), rank(), shuffle=True, seed=args.seed, drop_last=True)
        data = loader(ds, batch // world(), args.workers, sampler=sampler, drop_last=True)
        model = DistributedDataParallel(head) if world() > 1 else head
        steps = len(data)
        mean, std = (torch.tensor(s, device=device).view(-1, 1, 1) for s in meta["stats"])  # the workers send uint8
    else:
        x_train, y_train = features(backbone, common.Views(train, plain, 1), args.workers, args.precision, meta["stats"])
        x_train, y_train = common.gather_rows(x_train[:, 0]), common.gather_rows(y_train)
        model = head  # every rank trains the same head on the same cached features
        steps = len(x_train) // batch
    if steps == 0:
        raise BadInput(f"--lin-batch {batch} is larger than the {len(train)} probe training images")
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=args.lin_wd)
    bar = tqdm(range(epochs), desc="linear probe", disable=rank() != 0, dynamic_ncols=True, leave=False)
    for epoch in bar:
        if meta["folder"]:
            sampler.set_epoch(epoch)
            batches = ((v, y.to(device, non_blocking=True)) for v, y, _ in data)  # pinned: no host wait
        else:
            perm = torch.randperm(len(x_train), device=device)[: steps * batch].view(steps, batch)
            batches = ((x_train[p], y_train[p]) for p in perm)
        for i, (x, y) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + i, epochs * steps, 0, lr)
            if meta["folder"]:
                with torch.no_grad():
                    x = (x.to(device, non_blocking=True).float() / 255 - mean) / std
                    x = common.forward_views(backbone, x.transpose(0, 1), args.precision)[0]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if epoch == 0:  # protocol check: no BN statistic and no weight of the backbone moved
            for k, v in backbone.state_dict().items():
                if not torch.equal(v, frozen[k]):
                    raise RuntimeError(f"linear protocol violated: backbone tensor {k} changed during the probe")
    x_val, y_val = features(backbone, common.Views(val, plain, 1), args.workers, args.precision, meta["stats"])
    with torch.no_grad():
        correct = (head(x_val[:, 0]).argmax(1) == y_val).sum()
    acc = top1_over_ranks(correct, len(x_val), len(val))
    log_line(args.out_dir, dict(linear_top1=acc, lin_epochs=epochs, lin_batch=batch, lin_lr=lr))
    if rank() == 0:
        print(f"linear top-1: {acc:.2f}%", flush=True)  # the last line every script prints
    return acc


# --- end of copied section "evaluation" ---
# ----------------------------------------------------------------------------- main
# --- copied section "main": identical in every method file; simclr.py's is the original ---


def main():
    args = get_args()
    device = setup(args)
    train_set, meta = common.train_dataset(args.data, args.data_root, args.subset, args.seed, args.n_views)
    model = common.make_model(args.arch, meta["size"], meta["channels"], device)
    state = make_state(args, len(train_set), device)
    pretrain(args, model, train_set, meta, state)
    linear_eval(args, model.backbone, meta)  # prints `linear top-1: XX.XX%`, the last line


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:  # a mistake the user can fix: one line `error: ...`, no traceback, exit status 2
        # An error raised in a DataLoader worker comes back inside the worker's traceback text; its last line is ours.
        print("error: " + str(e).strip().splitlines()[-1].split("BadInput: ")[-1], file=sys.stderr, flush=True)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
# --- end of copied section "main" ---
