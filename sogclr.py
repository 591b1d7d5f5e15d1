"""sogclr.py: SogCLR pretraining (global contrastive loss with a moving-average estimator),
then linear evaluation.

Yuan, Wu, Qiu, Du, Zhang, Zhou, Yang. Provable Stochastic Optimization for Global
Contrastive Learning: Small Batch Does Not Harm Performance. ICML 2022.
https://arxiv.org/abs/2202.12387

    torchrun --nproc_per_node=8 sogclr.py --data /path/to/imagenet --batch 256

The global contrastive loss contrasts every image with all other images of the data set,
not just the batch. SogCLR keeps, for every training image i, a moving average u_i of
the batch estimate of its denominator; the gradient uses u_i instead of the noisy batch
estimate, which is what lets batch 256 match SimCLR at batch 8192. Paper recipe, the
defaults here: ResNet-50, batch 256, LARS with lr 0.075 x sqrt(B), wd 1e-6, T 0.1,
gamma 0.9, 800 epochs (10 warmup).
"""
import math

import torch
import torch.nn as nn

import common

# ----------------------------------------------------------------------------- loss


class SogCLRLoss(nn.Module):
    """SogCLR's loss with its per-image state u (the paper's Algorithm 1, SogCLR).

    For anchor view k of image i (2B per rank), with N_i both views of every other image
    of the global batch (2(BW - 1) entries):
        g_i^k = mean_{z in N_i} exp(s(x_i^k, z)/T)                the batch estimate
        u_i^k = (1 - gamma_i) u_i + gamma_i g_i^k                 gamma_i = 1 on the first visit (u_i = 0)
        grad  = mean_{i,k} [ -grad s(x_i^k, x_i^o)/T + (1/u_i^k) mean_{z in N_i} exp(s(x_i^k, z)/T) grad s(x_i^k, z)/T ]
    and then u_i <- (u_i^1 + u_i^2)/2, the average of the two views as in the official
    code, written for every image of the global batch on every rank so that u stays
    identical everywhere. The returned value is mean_{i,k} [ -s(x_i^k, x_i^o)/T + log u_i^k ],
    the moving-average estimate of the global contrastive loss (minus the constant log of
    the data set size); its gradient is the one above.
    u holds exp-sums directly, as in the paper, so in fp32 it overflows for T below about 0.011.
    """

    def __init__(self, num_samples, temperature=0.1, gamma=0.9, chunk_size=None):
        super().__init__()
        self.temperature, self.gamma, self.chunk_size = temperature, gamma, chunk_size  # chunk_size: as simclr.py
        self.register_buffer("u", torch.zeros(num_samples, dtype=torch.float32))

    def forward(self, z1, z2, index):
        """z1, z2: (B, D) raw projections of this rank; index: (B,) dataset indices."""
        _, positive, negative = common.two_view_terms(z1, z2, self.temperature, self.chunk_size)  # (2B,) each
        g = torch.exp(negative - math.log(2 * z1.shape[0] * common.world() - 2))  # (2B,) mean over N_i
        u_old = self.u[index].repeat(2).to(g.dtype)  # (2B,) both views of image i start from u_i
        gamma = torch.full_like(u_old, self.gamma).masked_fill(u_old == 0, 1.0)  # first visit: take g
        u_new = (1 - gamma) * u_old + gamma * g.detach()
        surrogate = (-positive + g / u_new).mean()  # u_new is detached: its gradient is the one above
        value = (-positive.detach() + torch.log(u_new)).mean()
        with torch.no_grad():
            b = z1.shape[0]
            u_all = common.gather_with_grad(u_new).view(-1, 2, b).mean(1).flatten()  # (BW,) view average
            self.u[common.gather_with_grad(index)] = u_all.to(self.u.dtype)
        return value + surrogate - surrogate.detach()


# ----------------------------------------------------------------------------- arguments


def get_args():
    parser = common.get_parser(__doc__)
    parser.set_defaults(epochs=800)  # the paper's ImageNet schedule
    # SogCLR
    parser.add_argument("--sogclr-gamma", type=float, default=0.9, help="moving-average weight of the new batch estimate")
    args = parser.parse_args()
    if not 0 < args.sogclr_gamma <= 1:
        raise common.BadInput(f"--sogclr-gamma {args.sogclr_gamma} must be in (0, 1] (the paper uses 0.9)")
    return args


# ----------------------------------------------------------------------------- model
# common.make_model: ResNet backbone + Linear-BN-ReLU-Linear projector (2048 -> 128).

# ----------------------------------------------------------------------------- train step


def train_step(net, views, index, loss_fn, args):
    z1, z2 = common.forward_views(net, views, args)  # bf16 forward, fp32 outputs
    return loss_fn(z1, z2, index)


# ----------------------------------------------------------------------------- main


def main():
    args = get_args()
    model, train_set, meta = common.build(args, n_views=2)
    # u has one entry per training image; the sampler drops the last partial batch, so an
    # index is used at most once per epoch. u is saved in the checkpoint and restored.
    loss_fn = SogCLRLoss(len(train_set), args.temperature, args.sogclr_gamma, args.chunk_size)
    loss_fn.to(next(model.parameters()).device)
    common.pretrain(args, model, train_set, lambda net, views, index: train_step(net, views, index, loss_fn, args),
                    buffers=loss_fn)
    common.linear_eval(args, model.backbone, meta)  # prints `linear top-1: XX.XX%`, the last line


if __name__ == "__main__":
    common.run(main)
