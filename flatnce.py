"""flatnce.py: FlatNCE pretraining, then linear evaluation.

Chen, Gan, Dai, Chen, Li, Carin, Zhang. Simpler, Faster, Stronger: Breaking the log-K Curse
on Contrastive Learners with FlatNCE. 2021. https://arxiv.org/abs/2107.01152

    torchrun --nproc_per_node=8 flatnce.py --data /path/to/imagenet --batch 256

At small batch InfoNCE's softmax puts most of its mass on the positive, so the gradient,
scaled by 1 - p+, vanishes in floating point. FlatNCE keeps the contrast between negatives
and positive without that factor. The returned value is InfoNCE's, for comparable logs; the
gradient is FlatNCE's, which equals DCL's. The log also records p+, the mean positive
probability of the InfoNCE softmax. Defaults follow simclr.py (ResNet-50, LARS,
lr 0.075 x sqrt(B), wd 1e-6, T 0.1, 10 warmup epochs, 100 epochs, batch 256).
"""
import torch

import common

# ----------------------------------------------------------------------------- loss


def flatnce_loss(z1, z2, temperature=0.1, chunk_size=None, with_p_pos=False):
    """FlatNCE, averaged over this rank's 2B anchors:

        v_i  = log sum_{z in N_i} exp((s(x_i^k, z) - s(x_i^k, x_i^o)) / T)
        loss = mean_i exp(v_i - detach(v_i)) - 1 + detach(InfoNCE)

    exp(v - detach(v)) is 1 in value and has the gradient of v, so the value is InfoNCE's
    and the gradient is mean_i grad v_i, which is DCL's gradient. N_i: both views of every
    other image of the global batch (the positive excluded).
    z1, z2: (B, D) raw projections of this rank, fp32 or fp64.
    with_p_pos: also return p+, the mean InfoNCE softmax probability of the positive.
    chunk_size: None computes the logits densely while they are small and in exact tiles
    beyond (common.similarity_logsumexp); 0 forces dense, n > 0 tiles of n x n.
    """
    _, positive, negative = common.two_view_terms(z1, z2, temperature, chunk_size)  # (2B,) each
    v = negative - positive
    info_nce = torch.logaddexp(negative, positive) - positive  # per anchor, -log p+
    loss = torch.exp(v - v.detach()).mean() - 1 + info_nce.mean().detach()
    return (loss, torch.exp(-info_nce).mean().detach()) if with_p_pos else loss


# ----------------------------------------------------------------------------- arguments


def get_args():
    # FlatNCE has no flags beyond the shared ones (--temperature, --chunk-size among them).
    return common.get_parser(__doc__).parse_args()


# ----------------------------------------------------------------------------- model
# common.make_model: ResNet backbone + Linear-BN-ReLU-Linear projector (2048 -> 128).

# ----------------------------------------------------------------------------- train step


def train_step(net, views, index, args):
    z1, z2 = common.forward_views(net, views, args)  # bf16 forward, fp32 outputs
    loss, p_pos = flatnce_loss(z1, z2, args.temperature, args.chunk_size, with_p_pos=True)
    return loss, {"p_pos": p_pos}  # p+ goes to log.jsonl


# ----------------------------------------------------------------------------- main


def main():
    args = get_args()
    model, train_set, meta = common.build(args, n_views=2)
    common.pretrain(args, model, train_set, lambda net, views, index: train_step(net, views, index, args))
    common.linear_eval(args, model.backbone, meta)  # prints `linear top-1: XX.XX%`, the last line


if __name__ == "__main__":
    common.run(main)
