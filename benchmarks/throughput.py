"""Throughput of the method's hot loops on this machine; prints one JSON object.

    python benchmarks/throughput.py                       # CPU or the default GPU, fp32
    python benchmarks/throughput.py --bf16 --channels-last  # GPU: bf16 autocast, NHWC

Measures training img/s of the paper CAE (15+15 blocks, width 64; Adam, MSE, batch 128),
of the AT-teacher step (CAE + frozen ResNet-56 in the loss), of ResNet-56 (SGD, CE), and
PGD-20 img/s (torchattacks, eps 8/255) against ResNet-56. Random inputs: speed only.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from kdp.attacks import build_attack
from kdp.losses import at_loss
from kdp.models import ConvAutoencoder, build_model, freeze
from kdp.provenance import device_name
from kdp.train import autocast, resolve_device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, n_images, device, warmup, iters) -> float:
    """img/s of fn() that processes n_images, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return n_images * iters / (time.perf_counter() - t0)


def bench(args) -> dict:
    device = resolve_device(args.device)
    fmt = torch.channels_last if args.channels_last and device.type == "cuda" else torch.contiguous_format
    bs = args.batch_size
    x = torch.rand(bs, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (bs,), device=device)
    cae = ConvAutoencoder().to(device, memory_format=fmt)
    resnet = build_model("classifier", "resnet56").to(device, memory_format=fmt)
    frozen = freeze(build_model("classifier", "resnet56").to(device, memory_format=fmt))
    adam, sgd = torch.optim.Adam(cae.parameters(), lr=0.01), torch.optim.SGD(resnet.parameters(), lr=0.1, momentum=0.9)

    def step(opt, loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def cae_step():
        with autocast(device, args.bf16):
            out = cae(x).float()
        step(adam, F.mse_loss(out, x))

    def at_step():
        with autocast(device, args.bf16):
            out = cae(x)
            with torch.no_grad():
                logits_adv = frozen(x)
            loss = at_loss(out.float(), x, frozen(out).float(), logits_adv.float(), y)["loss"]
        step(adam, loss)

    def resnet_step():
        with autocast(device, args.bf16):
            logits = resnet(x).float()
        step(sgd, F.cross_entropy(logits, y))

    pgd = build_attack("pgd8", frozen)
    w, it = args.warmup, args.iters
    return {
        "device": device_name(args.device), "torch": torch.__version__, "host": platform.node(),
        "threads": torch.get_num_threads(), "batch_size": bs, "bf16": args.bf16 and device.type == "cuda",
        "channels_last": fmt is torch.channels_last,
        "cae_train_img_s": round(timed(cae_step, bs, device, w, it), 1),
        "at_teacher_train_img_s": round(timed(at_step, bs, device, w, it), 1),
        "resnet56_train_img_s": round(timed(resnet_step, bs, device, w, it), 1),
        "pgd20_resnet56_img_s": round(timed(lambda: pgd(x, y), bs, device, 1, max(1, it // 4)), 1),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default: 128, the paper's)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (default: 10)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (CUDA only)")
    print(json.dumps(bench(p.parse_args(argv)), indent=2))


if __name__ == "__main__":
    main()
