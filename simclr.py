"""simclr.py: SimCLR pretraining with the NT-Xent (InfoNCE) loss, then linear evaluation.

Chen, Kornblith, Norouzi, Hinton. A Simple Framework for Contrastive Learning of Visual
Representations. ICML 2020. https://arxiv.org/abs/2002.05709

    torchrun --nproc_per_node=8 simclr.py --data /path/to/imagenet --batch 256

Defaults are the paper's ImageNet recipe: ResNet-50, LARS with lr 0.075 x sqrt(B)
(--lr-scaling sqrt; linear is 0.3 x B/256), weight decay 1e-6, T 0.1, 10 warmup epochs,
100 epochs. Deviation: the default global batch is 256, the small-batch setting this
repository is about (the paper's headline runs use 4096).
"""
import torch

import common

# ----------------------------------------------------------------------------- loss


def info_nce_loss(z1, z2, temperature=0.1, chunk_size=None):
    """NT-Xent, the paper's eq. (1), averaged over this rank's 2B anchors:

        l(i) = -log( exp(s(i, p(i))/T) / sum_{k != i} exp(s(i, k)/T) )

    s is the cosine similarity, p(i) the other view of the same image, and k runs over
    all 2B x W views of the global batch except i itself (the positive included).
    z1, z2: (B, D) raw projections of the two views on this rank, fp32 or fp64.
    chunk_size: None computes the logits densely while they are small and in exact tiles
    beyond (common.similarity_logsumexp); 0 forces dense, n > 0 tiles of n x n.
    """
    _, positive, negative = common.two_view_terms(z1, z2, temperature, chunk_size)  # (2B,) each
    # The denominator sums the positive and the negatives: logaddexp(negative, positive).
    return (torch.logaddexp(negative, positive) - positive).mean()


# ----------------------------------------------------------------------------- arguments


def get_args():
    # SimCLR has no flags beyond the shared ones (--temperature, --chunk-size among them).
    return common.get_parser(__doc__).parse_args()


# ----------------------------------------------------------------------------- model
# common.make_model: ResNet backbone + Linear-BN-ReLU-Linear projector (2048 -> 128).

# ----------------------------------------------------------------------------- train step


def train_step(net, views, index, args):
    z1, z2 = common.forward_views(net, views, args)  # bf16 forward, fp32 outputs
    return info_nce_loss(z1, z2, args.temperature, args.chunk_size)


# ----------------------------------------------------------------------------- main


def main():
    args = get_args()
    model, train_set, meta = common.build(args, n_views=2)
    common.pretrain(args, model, train_set, lambda net, views, index: train_step(net, views, index, args))
    common.linear_eval(args, model.backbone, meta)  # prints `linear top-1: XX.XX%`, the last line


if __name__ == "__main__":
    common.run(main)
