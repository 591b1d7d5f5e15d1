"""sogclr.py: SogCLR (global contrastive loss, moving-average estimator), then linear evaluation.

Yuan, Wu, Qiu, Du, Zhang, Zhou, Yang. Provable Stochastic Optimization for Global
Contrastive Learning: Small Batch Does Not Harm Performance. ICML 2022.
https://arxiv.org/abs/2202.12387

    torchrun --nproc_per_node=8 sogclr.py --data /path/to/imagenet --batch 256

The global contrastive loss contrasts every image with all others of the data set, not just
the batch. SogCLR keeps for every image i a moving average u_i of the batch estimate of its
denominator, and the gradient uses u_i: the paper's batch 256 matches SimCLR at 8192. The
defaults are its recipe: ResNet-50, batch 256, LARS, lr 0.075 x sqrt(B), wd 1e-6, T 0.1,
gamma 0.9, 800 epochs (10 warmup).

The "# --- copied" sections are simclr.py's; `diff simclr.py sogclr.py` shows the rest.
"""
# --- copied: imports ---
import argparse
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
from tqdm import tqdm

import common
from common import BadInput, rank, world
# --- end copied: imports ---


class SogCLRLoss(nn.Module):
    """SogCLR's loss and its per-image state u (the paper's Algorithm 1). For anchor view k of
    image i (2B per rank), with N_i both views of the other BW - 1 images and u_i = 0 at first:
        g_i^k = mean_{z in N_i} exp(s(x_i^k, z)/T)          the batch estimate
        u_i^k = (1 - gamma) u_i + gamma g_i^k               gamma = 1 on the first visit
        grad  = mean_{i,k} [ -grad s(x_i^k, x_i^o)/T
                             + (1/u_i^k) mean_{z in N_i} exp(s(x_i^k, z)/T) grad s(x_i^k, z)/T ]
    and then u_i <- (u_i^1 + u_i^2)/2, the views' average as in the official code, for every
    image of the global batch on every rank: u stays identical everywhere.
    forward returns the surrogate mean_{i,k} [ -s(x_i^k, x_i^o)/T + g_i^k / u_i^k ], u detached,
    whose gradient is the one above, and the loss to log, mean_{i,k} [ -s(x_i^k, x_i^o)/T +
    log u_i^k ]: the estimate of the global contrastive loss, less log of the data set size.
    u holds exp-sums, as in the paper, so in fp32 it overflows for T below about 0.011.
    """

    def __init__(self, num_samples, temperature=0.1, gamma=0.9, chunk_size=None):
        super().__init__()
        self.temperature, self.gamma, self.chunk_size = temperature, gamma, chunk_size
        self.register_buffer("u", torch.zeros(num_samples, dtype=torch.float32))

    def forward(self, z1, z2, index):
        """z1, z2: (B, D) raw projections of this rank; index: (B,) data set indices."""
        b = z1.shape[0]
        _, positive, negative = common.two_view_terms(z1, z2, self.temperature, self.chunk_size)
        g = torch.exp(negative - math.log(2 * b * common.world() - 2))  # (2B,) mean over N_i
        u_old = self.u[index].repeat(2).to(g.dtype)  # (2B,) both views of image i start from u_i
        gamma = torch.full_like(u_old, self.gamma).masked_fill(u_old == 0, 1.0)
        u_new = (1 - gamma) * u_old + gamma * g.detach()
        surrogate = (-positive + g / u_new).mean()
        loss = (-positive + torch.log(u_new)).detach().mean()
        with torch.no_grad():  # (BW,) every image of the global batch
            u_all = common.gather_with_grad(u_new).view(-1, 2, b).mean(1).flatten()
            self.u[common.gather_with_grad(index)] = u_all.to(self.u.dtype)
        return surrogate, loss


# --- copied: arguments ---
def get_parser():
    """The flags every method shares; get_args below adds the method's own."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data
    p.add_argument("--data", required=True, help="ImageFolder root (train/, val/), a folder of "
                   "images, or a named set: " + ", ".join(common.NAMED))
    p.add_argument("--eval-data", help="labelled data for kNN and probe (default: --data)")
    p.add_argument("--data-root", default="./data", help="where named sets are")
    p.add_argument("--subset", type=int, default=0, help="a fixed random N training images")
    p.add_argument("--workers", type=int, default=8, help="data loader processes per GPU")
    p.add_argument("--arch", default="resnet50", help=", ".join(common.ARCHS))
    # optimisation
    p.add_argument("--batch", type=int, default=256, help="global batch, split across processes")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--lr", type=float, default=None, help="0.075 (sqrt scaling) or 0.3 (linear)")
    p.add_argument("--lr-scaling", choices=("sqrt", "linear"), default="sqrt")
    p.add_argument("--wd", type=float, default=1e-6)
    # batching: spectral hard mini-batches (Cho et al. 2023)
    p.add_argument("--batching", choices=("random", "spectral"), default="random")
    p.add_argument("--sc-every", type=int, default=1, help="new spectral batches every N epochs")
    p.add_argument("--sc-clusters", type=int, default=40, help="spectral batches made per chunk")
    # loss
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--chunk-size", type=int, default=None, help="N x N similarity tiles (0: dense)")
    # system
    p.add_argument("--out-dir", default="./runs/default", help="resumes if it holds a checkpoint")
    p.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                   help="auto: bf16 on GPUs with it, else fp16 with a GradScaler; fp32 on CPU")
    p.add_argument("--compile", nargs="?", const="default",
                   choices=("default", "reduce-overhead", "max-autotune"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=20)
    # evaluation
    p.add_argument("--knn-every", type=int, default=10, help="kNN monitor every N epochs (0: off)")
    p.add_argument("--lin-epochs", type=int, default=None, help="90 on folders, else 30")
    p.add_argument("--lin-batch", type=int, default=None, help="1024 on folders, else 256")
    p.add_argument("--lin-lr", type=float, default=0.1, help="probe lr per 256 images")
    p.add_argument("--lin-wd", type=float, default=0.0)
    return p


def check_args(args):  # before any file is written
    w = int(os.environ.get("WORLD_SIZE", 1))
    for flag, low in (("epochs", 0), ("warmup_epochs", 0), ("wd", 0), ("workers", 0),
                      ("subset", 0), ("knn_every", 0), ("log_every", 1), ("sc_every", 1),
                      ("sc_clusters", 1), ("lin_epochs", 1), ("chunk_size", 0)):
        value = getattr(args, flag)
        if value is not None and value < low:
            raise BadInput(f"--{flag.replace('_', '-')} {value} must be >= {low}")
    for ok, msg in (
        (args.batch >= 2, f"--batch {args.batch}: a contrastive batch needs at least 2 images"),
        (args.batch % w == 0,
         f"--batch {args.batch} does not divide across {w} processes; use a multiple of {w}"),
        (all(v is None or v > 0 for v in (args.lr, args.temperature, args.lin_lr)),
         "--lr, --temperature and --lin-lr must be > 0"),
        (args.lin_batch is None or (args.lin_batch > 0 and args.lin_batch % w == 0),
         f"--lin-batch {args.lin_batch} must be a positive multiple of {w}, the processes"),
        (args.arch in common.ARCHS, f"--arch {args.arch}: choose one of {', '.join(common.ARCHS)}"),
        (not os.path.isfile(args.out_dir), f"--out-dir {args.out_dir} is a file; give a directory"),
        (args.precision != "fp16" or torch.cuda.is_available(),
         "--precision fp16 is for GPUs without bf16; on the CPU use fp32"),
        (args.compile != "max-autotune" or w == 1, f"--compile max-autotune can hang with {w} "
         "processes (pytorch issue 140395); use --compile default")):
        if not ok:
            raise BadInput(msg)
# --- end copied: arguments ---


def get_args():
    p = get_parser()
    p.set_defaults(epochs=800)  # the paper's ImageNet schedule
    p.add_argument("--sogclr-gamma", type=float, default=0.9,
                   help="moving-average weight of the new batch estimate")
    args = p.parse_args()
    check_args(args)
    if not 0 < args.sogclr_gamma <= 1:
        raise BadInput(f"--sogclr-gamma {args.sogclr_gamma} must be in (0, 1]")
    args.n_views = 2
    return args


# --- copied: setup ---
def setup(args):
    """Join the torchrun job, if any; resolve --precision auto, the lr, --eval-data; the device."""
    cuda = torch.cuda.is_available()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # torchrun's --nproc_per_node
    gpus = torch.cuda.device_count()
    if cuda and per_node > gpus:  # before any rank waits in init
        raise BadInput(f"{per_node} processes per node but {gpus} GPU(s): use --nproc_per_node="
                       f"{gpus}, or CUDA_VISIBLE_DEVICES= to run on the CPU")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    if args.precision == "auto":
        args.precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    args.base_lr = scale_lr(args.lr, args.lr_scaling, args.batch)
    args.eval_data = args.eval_data or (args.data if common.has_labels(args.data) else None)
    torch.manual_seed(args.seed + rank())
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show at once in a piped log
    if rank() == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        print(f"{world()} process(es) on {device.type}; global batch {args.batch} "
              f"({args.batch // world()} per process); lr {args.base_lr:.4g}; {args.precision}")
    return device


def scale_lr(factor, scaling, batch):
    """SimCLR's appendix B.1: lr = 0.075 x sqrt(B) or 0.3 x B / 256 (--lr replaces the factor)."""
    if factor is None:
        factor = 0.075 if scaling == "sqrt" else 0.3
    return factor * (math.sqrt(batch) if scaling == "sqrt" else batch / 256)


def lr_at(step, total, warmup, base):
    """Linear warmup to `base` at step warmup - 1, then half-cosine to 0 at step `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as SimCLR uses it: weights (ndim > 1) get weight decay and the trust
    ratio eta ||w|| / ||g + wd w||; biases and BN parameters plain SGD momentum. Foreach kernels
    and no host sync: at small batches launches are the step time."""

    def __init__(self, params, lr, weight_decay=0.0, momentum=0.9, eta=0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            mu = [self.state[p]["mu"] for p in params]
            torch._foreach_mul_(mu, group["momentum"])
            w = [p for p in params if p.ndim > 1]
            if w:
                d = torch._foreach_add([p.grad for p in w], w, alpha=group["weight_decay"])
                w_norm, d_norm = (torch.stack(torch._foreach_norm(t)) for t in (w, d))
                trust = group["eta"] * w_norm / d_norm
                trust = torch.where((w_norm > 0) & (d_norm > 0), trust, 1.0)
                torch._foreach_addcmul_([self.state[p]["mu"] for p in w], list(trust.unbind()), d)
            b = [p for p in params if p.ndim <= 1]
            if b:
                torch._foreach_add_([self.state[p]["mu"] for p in b], [p.grad for p in b])
            torch._foreach_add_(params, mu, alpha=-group["lr"])
# --- end copied: setup ---


def make_criterion(args, num_samples, device):
    return SogCLRLoss(num_samples, args.temperature, args.sogclr_gamma, args.chunk_size).to(device)


def train_step(net, views, index, criterion, args):
    """This rank's views (2, B, C, H, W) of images `index`: (what to differentiate, what to log)."""
    z1, z2 = common.forward_views(net, views, args.precision)  # autocast forward, fp32 outputs
    surrogate, loss = criterion(z1, z2, index)
    # 2T: the official surrogate (sogclr/builder.py) takes cosines without 1/T and sums the two
    # views' terms; the paper's LARS recipe was tuned with that gradient (on biases and BN).
    return 2 * args.temperature * surrogate, {"loss": loss}


# --- copied: training loop ---
def save_checkpoint(path, state):  # atomic: a crash mid-write leaves the last one whole
    with open(path + ".tmp", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def rng_states():  # every rank's CPU RNG: it draws the augmentations and the workers' seeds
    states = [torch.get_rng_state()] * world()
    if world() > 1:
        dist.all_gather_object(states, states[0])
    return states


def log_line(out_dir, record):
    if rank() == 0:
        with open(os.path.join(out_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def fixed_flags(args, images):  # what a run cannot change and continue (--epochs it can)
    data = args.data if args.data in common.NAMED else f"<a folder of {images} images>"
    return dict(arch=args.arch, batch=args.batch, subset=args.subset, data=data,
                pv_views=getattr(args, "pv_views", None))


def resume(path, model, opt, scaler, criterion, images, args):
    """(epoch to start at, spectral batches or None) from the rolling checkpoint, if any; one that
    this run cannot continue ends it with one line, untouched."""
    found = torch.tensor(float(os.path.exists(path)), device=next(model.parameters()).device)
    if world() > 1:
        dist.all_reduce(found)
    if found == 0:
        return 0, None
    if found < world():
        raise BadInput(f"only some processes see {path}; --out-dir must be on a shared file system")
    fix = "move it away to start afresh, or use another --out-dir"
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message for a cut-off file hides the cause
        raise BadInput(f"checkpoint {path} is damaged or truncated ({type(e).__name__}); {fix}")
    script = os.path.basename(__file__)
    writer = ckpt.get("script") if "fixed" in ckpt else "an older version of this code"
    if writer != script:
        raise BadInput(f"checkpoint {path} was written by {writer}, this is {script}; {fix}")
    for flag, now in fixed_flags(args, images).items():
        then, name = ckpt["fixed"][flag], "--" + flag.replace("_", "-")
        if now != then:
            raise BadInput(f"checkpoint {path} was made with {name} {then}, this run has {name} "
                           f"{now}; use {name} {then} to continue it, or another --out-dir")
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler.is_enabled() and ckpt["scaler"]:  # not when resuming an fp32 or bf16 run
            scaler.load_state_dict(ckpt["scaler"])
        if criterion is not None:
            criterion.load_state_dict(ckpt["criterion"])
    except Exception as e:
        raise BadInput(f"checkpoint {path} does not fit this model ({e!r:.100}); {fix}")
    if len(ckpt["rng"]) == world():  # as many processes: every rank continues its own stream
        torch.set_rng_state(ckpt["rng"][rank()])
    if rank() == 0:
        print(f"resumed from epoch {ckpt['epoch']} (step {ckpt['step']}) of {path}")
    return ckpt["epoch"], ckpt["batches"]


def pretrain(args, model, train_set, meta, criterion):
    """train_step with LARS, warmup + cosine and DDP; after every epoch a rolling checkpoint, from
    which a rerun continues exactly."""
    device = next(model.parameters()).device
    if len(train_set) < args.batch:
        raise BadInput(f"--batch {args.batch} is larger than the {len(train_set)} training images")
    # Whole global batches only: every rank takes as many equal steps (gather_with_grad needs
    # equal sizes), and an image is seen at most once an epoch.
    steps_per_epoch = len(train_set) // args.batch
    total, warmup = steps_per_epoch * args.epochs, round(steps_per_epoch * args.warmup_epochs)
    opt = LARS(model.parameters(), lr=args.base_lr, weight_decay=args.wd)
    # fp16 only: the loss is scaled so that small gradients survive; a step that overflowed is
    # skipped, and the schedule moves on as an unbroken run's.
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    path = os.path.join(args.out_dir, "checkpoint.pt")
    stop = f"stopped, the last good checkpoint {path} is intact; lower --lr or check the data"
    start_epoch, batches = resume(path, model, opt, scaler, criterion, len(train_set), args)
    step, net = start_epoch * steps_per_epoch, model
    if world() > 1:
        net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        net.broadcast_buffers = False  # global BN keeps BN buffers equal: no broadcast per forward
    torch.backends.cudnn.benchmark = True
    if args.compile:
        net = torch.compile(net, mode=args.compile)

    for epoch in range(start_epoch, args.epochs):
        if args.batching == "spectral" and (batches is None or epoch % args.sc_every == 0):
            # Hard mini-batches (Cho et al. 2023) from the current model.
            batches, stats = common.spectral_epoch(
                model, train_set, meta, args.batch, args.temperature, args.sc_clusters, args.seed,
                epoch, args.precision, args.workers)
            log_line(args.out_dir, dict(epoch=epoch + 1, **stats))
        spectral = batches if args.batching == "spectral" else None
        rows = common.epoch_rows(len(train_set), args.batch, args.seed, epoch, spectral)
        data = common.augmented_batches(train_set, meta, rows, args.n_views, args.workers, device)
        model.train()
        nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        tick, seen = time.time(), 0
        bar = tqdm(data, f"epoch {epoch + 1}", steps_per_epoch, disable=rank() != 0, leave=False)
        for i, (views, index) in enumerate(bar):
            lr = lr_at(step, total, warmup, args.base_lr)
            for group in opt.param_groups:
                group["lr"] = lr
            objective, logs = train_step(net, views, index, criterion, args)
            opt.zero_grad(set_to_none=True)
            scaler.scale(objective).backward()
            scaler.step(opt)
            scaler.update()
            step, seen = step + 1, seen + args.batch
            nonfinite |= ~torch.isfinite(objective.detach())  # checked at log steps: no host sync
            if step % args.log_every == 0 or i == steps_per_epoch - 1:
                logged = torch.stack([nonfinite.float(), *logs.values()])
                if world() > 1:  # all ranks stop together; the logs are means over ranks
                    dist.all_reduce(logged)
                bad, *values = (logged / world()).tolist()  # a host sync: an honest rate
                logs = dict(zip(logs, values))
                if bad > 0:
                    raise BadInput(f"non-finite loss by step {step}; {stop}")
                rate, tick, seen = seen / (time.time() - tick), time.time(), 0
                bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{lr:.4g}", img_s=f"{rate:.0f}")
                log_line(args.out_dir, dict(epoch=epoch + 1, step=step, **logs, lr=lr,
                                            img_per_s=rate))
        bar.close()
        # The weights too: a last step can blow them up after a finite loss.
        nonfinite |= ~torch.stack([p.isfinite().all() for p in model.parameters()]).all()
        if world() > 1:
            dist.all_reduce(nonfinite, op=dist.ReduceOp.MAX)
        if nonfinite:
            raise BadInput(f"non-finite loss or weights in epoch {epoch + 1}; {stop}")
        if args.eval_data and args.knn_every and ((epoch + 1) % args.knn_every == 0
                                                  or epoch + 1 == args.epochs):
            # Before the RNG snapshot: the kNN monitor draws from the RNG too.
            acc = common.knn_top1(model.backbone, args.eval_data, args.data_root, args.subset,
                                  args.seed, args.workers, args.precision)
            log_line(args.out_dir, dict(epoch=epoch + 1, knn_top1=acc))
            if rank() == 0:
                print(f"epoch {epoch + 1}: kNN top-1 {acc:.2f}%")
        ckpt = dict(model=model.state_dict(), optimizer=opt.state_dict(),
                    scaler=scaler.state_dict(),
                    criterion=criterion.state_dict() if criterion is not None else None,
                    step=step, epoch=epoch + 1, rng=rng_states(), batches=batches, args=vars(args),
                    fixed=fixed_flags(args, len(train_set)), script=os.path.basename(__file__))
        if rank() == 0:
            save_checkpoint(path, ckpt)
            print(f"epoch {epoch + 1}/{args.epochs} done: step {step}, loss {logs['loss']:.4f}")
    if rank() == 0:
        torch.save(model.backbone.state_dict(), os.path.join(args.out_dir, "backbone.pt"))
# --- end copied: training loop ---


# --- copied: evaluation ---
def linear_eval(args, backbone):
    """Linear probe on the frozen backbone, MoCo v3's protocol: SGD momentum 0.9, lr --lin-lr x
    B / 256, cosine, wd 0; on photo folders 90 epochs at B 1024 of new augmented crops each epoch
    (small sets: no probe augmentation, features computed once). Top-1 in % over all of val."""
    train, val, meta = common.base_datasets(args.eval_data, args.data_root)
    train = common.subset(train, args.subset, args.seed)
    device, folder = next(backbone.parameters()).device, meta["folder"]
    epochs = args.lin_epochs or (90 if folder else 30)
    batch = args.lin_batch or (1024 if folder else 256)
    steps = len(train) // batch
    if batch % world() or steps == 0:
        raise BadInput(f"--lin-batch {batch} must divide across {world()} processes and be at "
                       f"most the {len(train)} probe training images")
    crops = common.eval_transform(meta, train_aug=folder)
    backbone.requires_grad_(False)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    torch.manual_seed(args.seed)  # the same head on every rank
    head = nn.Linear(backbone.feat_dim, meta["classes"]).to(device)
    nn.init.normal_(head.weight, std=0.01)
    nn.init.zeros_(head.bias)
    model = DistributedDataParallel(head) if world() > 1 else head  # averages the ranks' grads
    lr = args.lin_lr * batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=args.lin_wd)
    for epoch in tqdm(range(epochs), desc="linear probe", disable=rank() != 0, leave=False):
        if folder or epoch == 0:  # this rank's shard of the training set
            x, y = common.features(backbone, train, crops, args.workers, args.precision,
                                   meta["stats"])
        # This rank's share of each global batch, a fresh shuffle of its shard.
        perm = torch.randperm(len(x), device=device)[:steps * batch // world()].view(steps, -1)
        for i, rows in enumerate(perm):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + i, epochs * steps, 0, lr)
            loss = F.cross_entropy(model(x[rows]), y[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch == 0:  # protocol check: no weight and no BN statistic of the backbone moved
            for k, v in backbone.state_dict().items():
                if not torch.equal(v, frozen[k]):
                    raise RuntimeError(f"linear protocol violated: backbone's {k} changed")
    x, y = common.features(backbone, val, common.eval_transform(meta), args.workers,
                           args.precision, meta["stats"])
    with torch.no_grad():
        correct = (head(x).argmax(1) == y).sum()
    acc = common.top1_over_ranks(correct, len(x), len(val))
    log_line(args.out_dir, dict(linear_top1=acc, lin_epochs=epochs, lin_batch=batch, lin_lr=lr))
    if rank() == 0:
        print(f"linear top-1: {acc:.2f}%")  # the last line every script prints
    return acc
# --- end copied: evaluation ---


# --- copied: main ---
def main():
    args = get_args()
    device = setup(args)
    train_set, meta = common.train_dataset(args.data, args.data_root, args.subset, args.seed,
                                           args.n_views, device, args.eval_data)
    model = common.make_model(args.arch, meta["size"], meta["channels"], device)
    criterion = make_criterion(args, len(train_set), device)
    pretrain(args, model, train_set, meta, criterion)
    if args.eval_data:
        linear_eval(args, model.backbone)
    elif rank() == 0:
        print(f"no labels, no evaluation (see --eval-data); backbone: {args.out_dir}/backbone.pt")


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:  # one line, no traceback, exit status 2
        # One raised in a DataLoader worker arrives inside the worker's traceback text.
        print("error: " + str(e).strip().splitlines()[-1].split("BadInput: ")[-1], file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
# --- end copied: main ---
