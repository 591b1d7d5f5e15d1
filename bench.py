"""bench.py: speed and memory of the project's paths next to their baselines, in one run.

    python bench.py loss                                  # GPU if present, else CPU sizes
    python bench.py loss --device cpu --views 2048,4096,8192
    python bench.py spectral                              # 1.28M x 128 on GPU, 50k on CPU
    python bench.py spectral-toy                          # the paper's synthetic experiment

`loss`: InfoNCE forward + backward on `views` random 128-d projections (views / 2 images,
every view an anchor against all views, as on one GPU): the dense path (the baseline: the
whole logit matrix, its two excluded columns per row masked, torch.logsumexp) against the
exact tiled path of common.similarity_logsumexp. It prints time per step,
peak extra memory, the ratios tiled / dense, and the achieved TFLOP/s of the tiled path
counted as the 3 matmuls of N x N x D that forward + backward need at least (the tiled
backward does a 4th, the recompute). "OOM" where dense does not fit.
On GPU both run in this process: peak memory is torch.cuda.max_memory_allocated above the
inputs. On CPU every (mode, size) runs in a fresh process (`loss-one`): peak memory is the peak RSS
above the RSS before the first step, time is that of a second step. A configuration whose
process dies prints its error and shows as "failed".
`spectral`: seconds for common.spectral_batches to build one epoch of batches (B 256, 40
clusters per chunk) from random 128-d embeddings: 1.28M (ImageNet) on GPU, 50k (CIFAR) on
CPU. The embedding pass is a forward of every training image and is reported by the
training log (`spectral_seconds` includes it).
`spectral-toy`: Cho et al.'s synthetic experiment: N trainable pairs (u_i, v_i) in d = 2N,
batches of B = 2, SGD; the full-batch loss after the same number of steps with random and
with spectral batches, over three seeds.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

import common
from simclr import info_nce_loss


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_step(views, mode, device, chunk, dim=128, repeats=3):
    """One configuration: seconds per forward + backward and peak extra bytes."""
    torch.manual_seed(0)
    z1 = torch.randn(views // 2, dim, device=device, requires_grad=True)
    z2 = torch.randn(views // 2, dim, device=device, requires_grad=True)
    chunk_size = 0 if mode == "dense" else chunk

    def step():
        info_nce_loss(z1, z2, 0.1, chunk_size=chunk_size).backward()
        z1.grad = z2.grad = None

    if device == "cuda":
        step()  # warm-up: kernels, allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() - base
    base = _rss()
    step()  # the first step sets the peak
    peak = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
    start = time.perf_counter()
    step()  # the second is timed: pages are mapped, kernels warm
    return time.perf_counter() - start, peak


def measure(views, mode, device, chunk):
    if device == "cpu":  # a fresh process, so that the peak RSS is this configuration's
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "loss-one", "--views", str(views),
                              "--mode", mode, "--device", "cpu", "--chunk", str(chunk)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{mode} at {views} views failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            return "failed"
        r = json.loads(out.stdout.strip().splitlines()[-1])
        return r["seconds"], r["peak_extra_bytes"]
    try:
        return loss_step(views, mode, device, chunk)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "OOM"


def bench_loss(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    default = "8192,16384,32768,65536,131072,262144" if device == "cuda" else "1024,2048,4096,8192"
    sizes = [int(v) for v in (args.views or default).split(",")]
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"InfoNCE forward + backward, D=128, fp32, {name}, torch {torch.__version__}, tile {args.chunk}")
    print(f"{'views':>8} {'dense ms':>10} {'dense MiB':>10} {'tiled ms':>10} {'tiled MiB':>10} "
          f"{'time x':>7} {'mem x':>7} {'tiled TFLOP/s':>14}")
    for n in sizes:
        dense, tiled = measure(n, "dense", device, args.chunk), measure(n, "chunked", device, args.chunk)
        ok = not isinstance(dense, str) and not isinstance(tiled, str)
        d_ms, d_mib = (dense, dense) if isinstance(dense, str) else (f"{dense[0] * 1e3:.1f}", f"{dense[1] / 2**20:.0f}")
        t_ms, t_mib = (tiled, tiled) if isinstance(tiled, str) else (f"{tiled[0] * 1e3:.1f}", f"{tiled[1] / 2**20:.0f}")
        ratio_t = f"{tiled[0] / dense[0]:.2f}" if ok else "-"
        ratio_m = f"{tiled[1] / max(dense[1], 1):.3f}" if ok else "-"
        tflops = "-" if isinstance(tiled, str) else f"{3 * 2 * n * n * 128 / tiled[0] / 1e12:.2f}"
        print(f"{n:>8} {d_ms:>10} {d_mib:>10} {t_ms:>10} {t_mib:>10} {ratio_t:>7} {ratio_m:>7} {tflops:>14}", flush=True)


def bench_spectral(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    n = int(args.views or (1_281_167 if device == "cuda" else 50_000))
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(n, 128, generator=g).to(device)
    z2 = z1 + 0.5 * torch.randn(n, 128, generator=g).to(device)
    common.spectral_batches(z1[:20480], z2[:20480], 256, generator=torch.Generator().manual_seed(1))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    batches = common.spectral_batches(z1, z2, 256, 0.1, 40, torch.Generator().manual_seed(2))
    if device == "cuda":
        torch.cuda.synchronize()
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"spectral_batches: {n} x 128 embeddings, B 256, 40 clusters per chunk, {name}, torch {torch.__version__}: "
          f"{time.perf_counter() - start:.1f} s for {len(batches)} batches")


def toy_run(mode, seed, n=32, epochs=30, lr=0.5, temperature=0.1):
    """One run of the synthetic experiment; returns the full-batch loss at the end."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, 2 * n, generator=g).requires_grad_()
    v = torch.randn(n, 2 * n, generator=g).requires_grad_()
    opt = torch.optim.SGD([u, v], lr=lr)
    for _ in range(epochs):  # n / 2 steps per epoch in both modes
        if mode == "random":
            batches = torch.randperm(n, generator=g).view(-1, 2)
        else:
            batches = common.spectral_batches(u.detach(), v.detach(), 2, temperature, n // 2, g)
        for b in batches:
            opt.zero_grad()
            info_nce_loss(u[b], v[b], temperature).backward()
            opt.step()
    with torch.no_grad():
        return info_nce_loss(u, v, temperature).item()


def bench_spectral_toy(args):
    print("N 32 pairs, d 64, B 2, T 0.1, SGD lr 0.5, 30 epochs of 16 steps; full-batch InfoNCE at the end")
    for mode in ("random", "spectral"):
        losses = [toy_run(mode, seed) for seed in range(3)]
        print(f"{mode:>9}: " + "  ".join(f"{x:.3f}" for x in losses) + f"   mean {sum(losses) / 3:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("loss", "loss-one", "spectral", "spectral-toy"))
    p.add_argument("--views", default=None, help="comma-separated view counts (loss-one: one number)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("--chunk", type=int, default=4096, help="tile size of the chunked path")
    p.add_argument("--mode", choices=("dense", "chunked"), default="chunked", help="loss-one only")
    args = p.parse_args()
    if args.what == "loss":
        bench_loss(args)
    elif args.what == "spectral":
        bench_spectral(args)
    elif args.what == "spectral-toy":
        bench_spectral_toy(args)
    else:
        seconds, peak = loss_step(int(args.views), args.mode, args.device or "cpu", args.chunk)
        print(json.dumps(dict(views=int(args.views), mode=args.mode, seconds=seconds, peak_extra_bytes=peak)))


if __name__ == "__main__":
    main()
