"""polyview.py: Poly-View contrastive pretraining (M views per sample), then linear evaluation.

Shidani, Hjelm, Ramapuram, Webb, Dhekane, Busbridge. Poly-View Contrastive Learning.
ICLR 2024. https://arxiv.org/abs/2403.05490

    torchrun --nproc_per_node=8 polyview.py --data /path/to/imagenet --batch 256

Every sample gets M augmented views (--pv-views) and one loss contrasts all of them
(--pv-objective): geometric or arithmetic poly-view contrastive (PVC), sufficient statistics,
or the multi-crop baseline (the mean of pairwise NT-Xent losses). --batch counts samples, so
a step forwards M x batch images. The paper's point: at a fixed budget fewer samples with more
views win (batch 256 for 128 epochs beats SimCLR at 4096 for 1024). Defaults follow simclr.py,
with the SimCLR augmentation for every view. Deviations: 100 epochs (the headline: 128), and
M = 4 is this repository's choice, not the paper's.

The "# --- copied" sections are simclr.py's; `diff simclr.py polyview.py` shows the rest.
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


OBJECTIVES = ("geometric", "arithmetic", "sufficient", "multicrop")


def polyview_loss(z, temperature=0.1, objective="geometric", chunk_size=None):
    """Poly-view losses, averaged over this rank's M x B anchors (sample i, view a).

    With s the cosine similarity and k, c running over the M views of all B x W samples of
    the global batch, the probability of target view b != a of the anchor's own sample is

        p_iab = exp(s(i^a, i^b)/T)
                / ( exp(s(i^a, i^b)/T) + sum_{k != i} sum_c exp(s(i^a, k^c)/T) )

    The anchor's other views are not candidates: each target b is one positive against
    every view of the other samples. Per anchor (i, a):
      geometric:  -1/(M-1) sum_{b != a} log p_iab   (GPVC: -log of the geometric mean)
      arithmetic: -log 1/(M-1) sum_{b != a} p_iab   (APVC: -log of the arithmetic mean;
                  never above geometric, by Jensen). The reading its name states, unchecked
                  against the paper: pakoromilas/Multi-View-CL's PVCLoss (models/losses.py)
                  computes log mean_b(1/p_iab) + const, -log of the harmonic mean, which
                  weights the hardest target where this one weights the easiest.
      multicrop:  the baseline: mean over b != a of NT-Xent on views a and b alone, whose
                  candidates also hold the anchor's own view a of the other samples;
      sufficient: -log softmax_k( s(i^a, t_k^a)/T ) at k = i, with t_k^a the normalised
                  mean of sample k's views other than a (the sample's sufficient-statistic
                  estimate; excluding view a keeps the positive from containing the anchor).
                  Also unchecked against the paper: the anchor is one view, the target and the
                  candidates are leave-one-out means.
    With M = 2 the first three are NT-Xent (simclr.info_nce_loss); sufficient is not.
    z: (M, B, D) raw projections of this rank, fp32 or fp64.
    chunk_size: None computes the logits densely while they are small and in exact tiles
    beyond (common.similarity_logsumexp); 0 forces dense, n > 0 tiles of n x n.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    m, b = z.shape[:2]
    if m < 2:
        raise ValueError(f"poly-view losses need at least 2 views per sample, got {m}")
    z = F.normalize(z, dim=-1)  # (M, B, D)

    # Sample-major rows so that gather_with_grad (dim 0) keeps each sample's views together;
    # rank r's samples are rows Br .. B(r+1)-1.
    cands = common.gather_with_grad(z.transpose(0, 1).contiguous())  # (BW, M, D)
    own = common.rank() * b + torch.arange(b, device=z.device)  # each local sample's row in cands

    def lse(anchors, targets, exclude):  # log-sum of exp(s/T) per anchor row, dense or tiled
        return common.similarity_logsumexp(anchors, targets, temperature, exclude, chunk_size)

    if objective == "sufficient":
        # t_k^a from the other views only: (sum of all views - view a), normalised (the
        # 1/(M-1) of the mean cancels in the normalisation).
        t = F.normalize(cands.sum(1, keepdim=True) - cands, dim=-1)  # (BW, M, D): t[k, a]
        denominator = torch.stack([lse(z[a], t[:, a], None) for a in range(m)])  # (M, B)
        positive = (z * t[own].transpose(0, 1)).sum(-1) / temperature  # s(i^a, t_i^a)/T
        return (denominator - positive).mean()

    # others[c, a, i] = log sum_{k != i} exp(s(i^a, k^c)/T): view c of every other sample.
    anchors, exclude = z.reshape(m * b, -1), own.repeat(m)[:, None]
    others = torch.stack([lse(anchors, cands[:, c], exclude) for c in range(m)]).view(m, m, b)
    pos = torch.einsum("aid,bid->aib", z, z) / temperature  # (M, B, M): s(i^a, i^b)/T
    if objective == "multicrop":
        # Candidates of pair (a, b): view a of every other sample, view b of every sample.
        own_view = others.diagonal(dim1=0, dim2=1).T[..., None]  # (M, B, 1): others[a, a, i]
        log_p = pos - torch.logaddexp(own_view, torch.logaddexp(others.permute(1, 2, 0), pos))
    else:
        log_p = pos - torch.logaddexp(pos, others.logsumexp(0)[..., None])  # (M, B, M): log p_iab
    # Drop target view b == anchor view a with an integer index made on the device: row a of
    # `targets` is 0..M-1 without a. (A boolean mask would make the host wait for the GPU.)
    j = torch.arange(m - 1, device=z.device)
    targets = j + (j >= torch.arange(m, device=z.device)[:, None])  # (M, M-1)
    # (M, M-1, B): [anchor view, target view, sample]
    log_p = log_p.transpose(1, 2).gather(1, targets[..., None].expand(m, m - 1, b))
    if objective == "arithmetic":
        return -(torch.logsumexp(log_p, dim=1) - math.log(m - 1)).mean()
    return -log_p.mean()  # geometric and multicrop: every (i, a, b) pair has the same weight


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
    # Poly-View
    p.add_argument("--pv-views", type=int, default=4,
                   help="M, augmented views per sample (>= 2); a step forwards M x --batch images")
    p.add_argument("--pv-objective", choices=OBJECTIVES, default="geometric",
                   help="how the M views are contrasted (see polyview_loss)")
    args = p.parse_args()
    check_args(args)
    if args.pv_views < 2:
        raise BadInput(f"--pv-views {args.pv_views}: poly-view needs at least 2 views per sample")
    args.n_views = args.pv_views
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
    return None  # a loss module with per-image state; Poly-View's loss has none


def train_step(net, views, index, criterion, args):
    """This rank's views (M, B, C, H, W) of images `index`: (what to differentiate, what to log)."""
    z = torch.stack(common.forward_views(net, views, args.precision))  # (M, B, 128), fp32
    loss = polyview_loss(z, args.temperature, args.pv_objective, args.chunk_size)
    # No official Poly-View code trains with LARS, so SimCLR's gradient scale (see simclr.py),
    # the sum of the batch means of the anchor views: M x the mean.
    return len(z) * loss, {"loss": loss.detach()}


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
