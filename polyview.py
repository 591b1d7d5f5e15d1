"""polyview.py: Poly-View contrastive pretraining (M views per sample), then linear evaluation.

Shidani, Hjelm, Ramapuram, Webb, Dhekane, Busbridge. Poly-View Contrastive Learning.
ICLR 2024. https://arxiv.org/abs/2403.05490

    torchrun --nproc_per_node=8 polyview.py --data /path/to/imagenet --batch 256

Every sample gets M augmented views (--pv-views, default 4) and one loss contrasts all of
them (--pv-objective): geometric or arithmetic poly-view contrastive (PVC), sufficient
statistics, or the multi-crop baseline (the mean of pairwise NT-Xent losses). --batch counts
unique samples, so a step forwards M x batch images; the paper's point is that at a fixed
budget fewer samples with more views win (its headline: batch 256, 128 epochs, beating
SimCLR at batch 4096 for 1024 epochs). Defaults follow simclr.py: ResNet-50, LARS with lr
0.075 x sqrt(B), weight decay 1e-6, T 0.1, the SimCLR augmentation for every view, 10
warmup epochs. Deviations: 100 epochs by default (the headline uses 128), and M = 4 is this
repository's choice, not a number taken from the paper; set --epochs and --pv-views for a
run that compares with it.
"""
import math

import torch
import torch.nn.functional as F

import common

OBJECTIVES = ("geometric", "arithmetic", "sufficient", "multicrop")

# ----------------------------------------------------------------------------- loss


def polyview_loss(z, temperature=0.1, objective="geometric", chunk_size=None):
    """Poly-view losses, averaged over this rank's M x B anchors (sample i, view a).

    With s the cosine similarity and k, c running over the M views of all B x W samples of
    the global batch, the probability of target view b != a of the anchor's own sample is

        p_iab = exp(s(i^a, i^b)/T) / ( exp(s(i^a, i^b)/T) + sum_{k != i} sum_c exp(s(i^a, k^c)/T) )

    The anchor's other views are not candidates: each target b is one positive against
    every view of the other samples. Per anchor (i, a):
      geometric:  -1/(M-1) sum_{b != a} log p_iab   (GPVC: -log of the geometric mean)
      arithmetic: -log 1/(M-1) sum_{b != a} p_iab   (APVC: -log of the arithmetic mean;
                  never above geometric, by Jensen)
      multicrop:  the baseline: mean over b != a of NT-Xent on views a and b alone, whose
                  candidates also hold the anchor's own view a of the other samples;
      sufficient: -log softmax_k( s(i^a, t_k^a)/T ) at k = i, with t_k^a the normalised
                  mean of sample k's views other than a (the sample's sufficient-statistic
                  estimate; excluding view a keeps the positive from containing the anchor).
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
    pos = torch.einsum("aid,bid->aib", z, z) / temperature  # (M, B, M): s(i^a, i^b)/T, b = a dropped below
    if objective == "multicrop":
        # Candidates of pair (a, b): view a of every other sample, view b of every sample.
        own_view = others.diagonal(dim1=0, dim2=1).T[..., None]  # (M, B, 1): others[a, a, i]
        log_p = pos - torch.logaddexp(own_view, torch.logaddexp(others.permute(1, 2, 0), pos))
    else:
        log_p = pos - torch.logaddexp(pos, others.logsumexp(0)[..., None])  # (M, B, M): log p_iab
    off_diag = ~torch.eye(m, dtype=torch.bool, device=z.device)
    log_p = log_p.transpose(1, 2)[off_diag].view(m, m - 1, b)  # [anchor view, target view != it, sample]
    if objective == "arithmetic":
        return -(torch.logsumexp(log_p, dim=1) - math.log(m - 1)).mean()
    return -log_p.mean()  # geometric and multicrop: every (i, a, b) pair has the same weight


# ----------------------------------------------------------------------------- arguments


def get_args():
    p = common.get_parser(__doc__)
    # poly-view
    p.add_argument("--pv-views", type=int, default=4,
                   help="M, augmented views per sample (>= 2); a step forwards M x --batch images")
    p.add_argument("--pv-objective", choices=OBJECTIVES, default="geometric",
                   help="how the M views are contrasted (see polyview_loss)")
    args = p.parse_args()
    if args.pv_views < 2:
        raise common.BadInput(f"--pv-views {args.pv_views}: poly-view needs at least 2 views per sample")
    return args


# ----------------------------------------------------------------------------- model
# common.make_model: ResNet backbone + Linear-BN-ReLU-Linear projector (2048 -> 128).

# ----------------------------------------------------------------------------- train step


def train_step(net, views, index, args):
    z = torch.stack(common.forward_views(net, views, args))  # (M, B, 128): bf16 forward, fp32 outputs
    return polyview_loss(z, args.temperature, args.pv_objective, args.chunk_size)


# ----------------------------------------------------------------------------- main


def main():
    args = get_args()
    model, train_set, meta = common.build(args, n_views=args.pv_views)
    common.pretrain(args, model, train_set, lambda net, views, index: train_step(net, views, index, args))
    common.linear_eval(args, model.backbone, meta)  # prints `linear top-1: XX.XX%`, the last line


if __name__ == "__main__":
    common.run(main)
