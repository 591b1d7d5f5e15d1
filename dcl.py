"""dcl.py: DCL and DCLW pretraining (decoupled contrastive loss), then linear evaluation.

Yeh, Hong, Hsu, Liu, Chen, LeCun. Decoupled Contrastive Learning. ECCV 2022.
https://arxiv.org/abs/2110.06848

    torchrun --nproc_per_node=8 dcl.py --data /path/to/imagenet --batch 256                   # DCL
    torchrun --nproc_per_node=8 dcl.py --data /path/to/imagenet --batch 256 --dcl-sigma 0.5   # DCLW

DCL removes the positive from InfoNCE's denominator, which removes the negative-positive
coupling factor that makes InfoNCE's gradient shrink at small batch. DCLW also weights the
positive term by how hard the pair is (von Mises-Fisher weighting). Defaults: T 0.1;
--dcl-sigma off (DCL), 0.5 when given as in the paper. Everything else follows simclr.py
(ResNet-50, LARS, lr 0.075 x sqrt(B), wd 1e-6, 10 warmup epochs, 100 epochs, batch 256).
"""
import math

import torch

import common

# ----------------------------------------------------------------------------- loss


def dcl_loss(z1, z2, temperature=0.1, sigma=None, chunk_size=None):
    """The decoupled contrastive loss L_DC of the paper (and DCLW, its weighted form):

        l(i, k) = -w_i s(x_i^k, x_i^o)/T + log sum_{z in N_i} exp(s(x_i^k, z)/T)

    averaged over this rank's 2B anchors (image i, view k, other view o). N_i is both
    views of every other image of the global batch, 2(BW - 1) entries: unlike InfoNCE the
    positive is not in the denominator. w = 1 for DCL. DCLW (sigma a number):
    w_i = 2 - exp(s(x_i^1, x_i^2)/sigma) / mean_j exp(s(x_j^1, x_j^2)/sigma), the mean over
    the global batch, detached (a weight, not a path for the gradient).
    z1, z2: (B, D) raw projections of this rank, fp32 or fp64.
    chunk_size: None computes the logits densely while they are small and in exact tiles
    beyond (common.similarity_logsumexp); 0 forces dense, n > 0 tiles of n x n.
    """
    # The decoupling: `negative` is the log-sum over N_i alone, without the positive.
    z, positive, negative = common.two_view_terms(z1, z2, temperature, chunk_size)  # (2B,) each
    weight = 1.0
    if sigma is not None:
        b = z1.shape[0]
        s_pos = (z[:b] * z[b:]).sum(1).detach()  # s(x_i^1, x_i^2) of this rank's images
        s_all = common.gather_with_grad(s_pos)  # ... and of the global batch, for the mean
        # exp(s/sigma) / mean_j exp(s_j/sigma), in log space so that a small sigma cannot overflow
        log_mean = torch.logsumexp(s_all / sigma, dim=0) - math.log(len(s_all))
        weight = (2 - torch.exp(s_pos / sigma - log_mean)).repeat(2)  # both views of image i share w_i
    return (-weight * positive + negative).mean()


# ----------------------------------------------------------------------------- arguments


def get_args():
    parser = common.get_parser(__doc__)
    # DCL
    parser.add_argument("--dcl-sigma", type=float, default=None, help="DCLW's sigma (the paper uses 0.5); unset: DCL")
    args = parser.parse_args()
    if args.dcl_sigma is not None and args.dcl_sigma <= 0:
        raise common.BadInput(f"--dcl-sigma {args.dcl_sigma} must be > 0 (the paper uses 0.5)")
    return args


# ----------------------------------------------------------------------------- model
# common.make_model: ResNet backbone + Linear-BN-ReLU-Linear projector (2048 -> 128).

# ----------------------------------------------------------------------------- train step


def train_step(net, views, index, args):
    z1, z2 = common.forward_views(net, views, args)  # bf16 forward, fp32 outputs
    return dcl_loss(z1, z2, args.temperature, args.dcl_sigma, args.chunk_size)


# ----------------------------------------------------------------------------- main


def main():
    args = get_args()
    model, train_set, meta = common.build(args, n_views=2)
    common.pretrain(args, model, train_set, lambda net, views, index: train_step(net, views, index, args))
    common.linear_eval(args, model.backbone, meta)  # prints `linear top-1: XX.XX%`, the last line


if __name__ == "__main__":
    common.run(main)
