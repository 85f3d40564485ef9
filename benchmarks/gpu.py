"""Throughput of every stage of the paper preset at paper size, reference path beside the fast
paths, with % of the chip's peak and a projection of the paper preset's wall time. One
process, no Ray; writes the JSON after each measurement, so a run cut short keeps what it had.

    python benchmarks/gpu.py --out docs/runs/gpu-h200.json              # a GPU: paper size
    python benchmarks/gpu.py --smoke --device cpu --out /tmp/gpu.json   # the script itself, tiny

Each stage is timed through the library's own recipe (`kdp.stages.drivers.RECIPES`) and step, as a run
trains it: paper-size models, the paper's batch sizes, synthetic images (or `--data`, e.g. the
kdp.datapack pack). Variants: `ref` (fp32, NCHW, eager, no cuDNN autotuning: the reference
path), `fast` (bf16 + channels_last + cuDNN autotuning, eager), `compile` (fast + torch.compile,
as `--compile auto` runs on CUDA), `graphs` (fast + compile mode reduce-overhead: CUDA graphs),
and `fast` at 8x the batch (`fast-x8`: what larger batches would give; not the paper's
recipe). FLOPs per image are counted on the reference step (torch.utils.flop_counter);
% of peak is against the bf16 matrix rate measured at the start (8192^3 products).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kdp.accel import Accel  # noqa: E402
from kdp.attacks import build_attack, describe  # noqa: E402
from kdp.checkpoint import save_checkpoint  # noqa: E402
from kdp.config import Runtime  # noqa: E402
from kdp.configio import flatten  # noqa: E402
from kdp.data import Cifar, load_cifar, to_float  # noqa: E402
from kdp.stages.drivers import RECIPES  # noqa: E402
from kdp.models import Purified, build_model, freeze  # noqa: E402
from kdp.presets import get_preset  # noqa: E402
from kdp.provenance import git_sha  # noqa: E402

VARIANTS = {"ref": dict(bf16="off", channels_last="off", compile="off"),
            "fast": dict(bf16="on", channels_last="on", compile="off"),
            "compile": dict(bf16="on", channels_last="on", compile="default"),
            "graphs": dict(bf16="on", channels_last="on", compile="reduce-overhead")}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_tflops(device, n: int) -> float | None:
    """Measured bf16 matrix rate: the mean of 10 n^3 products after 3 warm-ups (None on CPU)."""
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * n ** 3 * 10 / (time.perf_counter() - t0) / 1e12


def inputs(cfg, data: Cifar, device, root: Path) -> dict:
    """Stand-ins for a stage's inputs at the preset's sizes: random classifier and teacher
    checkpoints and an AE cache entry of random images (speed does not depend on them)."""
    clf = save_checkpoint(root / "classifier", build_model("classifier", cfg.classifier.arch, width=cfg.classifier.width),
                          {"kind": "classifier", "name": cfg.classifier.arch, "kwargs": {"width": cfg.classifier.width}},
                          flatten(cfg.classifier))
    cae = {"kind": "purifier", "name": "cae", "kwargs": {"depth": cfg.at_teacher.depth, "width": cfg.at_teacher.width,
                                                         "head": cfg.at_teacher.head}}
    teachers = {f"teacher_{k}": save_checkpoint(root / f"teacher_{k}", build_model("purifier", "cae", **cae["kwargs"]),
                                                cae, flatten(cfg.at_teacher)) for k in ("at", "nt")}
    aes = root / "aes"
    aes.mkdir(exist_ok=True)
    np.save(aes / "x_adv.npy", to_float(data.train_x).numpy(), allow_pickle=False)
    (aes / "meta.json").write_text("{}")
    return {"classifier": clf, "aes": aes, **teachers}


def stages(cfg) -> dict:
    """stage -> (recipe name, its config): what the paper preset trains."""
    return {"classifier": ("classifier", cfg.classifier), "teacher_at": ("teacher", cfg.at_teacher),
            "teacher_nt": ("teacher", cfg.nt_teacher), "student_kd_at_nt": ("student", cfg.students[-1]),
            "soap": ("soap", cfg.soap), "nrp": ("nrp", cfg.nrp)}


def time_steps(step_once, batch: int, device, budget_s: float, warmup: int = 3) -> dict:
    """img/s of step_once() after `warmup` calls (their time, compile included, is reported)."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step_once()
    sync(device)
    warm = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while n < 3 or (time.perf_counter() - t0 < budget_s and n < 200):
        step_once()
        n += 1
        if n % 5 == 0:
            sync(device)
    sync(device)
    return {"img_s": batch * n / (time.perf_counter() - t0), "warmup_s": warm, "steps": n}


def training_step(recipe, rt, batch: int, n: int, device):
    """One optimizer step of the recipe's own step function, as kdp.train.train_epoch runs it."""
    acc = Accel.of(rt, device)  # as kdp.stages.common.train_recipe resolves it
    step = recipe.make_step(acc.compiled(recipe.model) if recipe.ddp else recipe.model)
    recipe.model.train()
    gen = torch.Generator().manual_seed(0)

    def once():
        out = step(torch.randint(0, n, (batch,), generator=gen))
        recipe.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        recipe.optimizer.step()
    return once


def flops_per_image(once, batch: int) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False) as fc:
            once()
        return fc.get_total_flops() / batch
    except Exception:  # noqa: BLE001 - a count is a nicety; the timing stands without it
        return None


def measure_training(name, recipe_name, scfg, data, ins, device, variant, scale, budget_s) -> dict:
    rt = Runtime(device=str(device), progress=False, **VARIANTS[variant])
    torch.backends.cudnn.benchmark = variant != "ref"
    batch = scfg.batch_size * scale
    recipe = RECIPES[recipe_name](scfg, ins, data, device, rt)
    once = training_step(recipe, rt, batch, len(data.train_y), device)
    row = time_steps(once, batch, device, budget_s)
    if variant == "ref" and scale == 1:
        row["flops_per_img"] = flops_per_image(once, batch)
    return {"stage": name, "variant": variant + (f"-x{scale}" if scale > 1 else ""), "batch": batch,
            "accel": Accel.of(rt, device).describe(), **row}


def measure_attack(name, model, x, y, device, variant, budget_s) -> dict:
    """img/s of one attack batch (fp32 always, kdp.accel); `fast`: channels_last + cuDNN autotuning."""
    torch.backends.cudnn.benchmark = variant != "ref"
    fmt = torch.channels_last if variant != "ref" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    attack = build_attack(name, model)
    row = time_steps(lambda: attack(x, y), len(x), device, budget_s, warmup=1)
    if variant == "ref":  # the counter cannot follow torch.autograd.grad: steps x (forward + input gradient)
        with torch.no_grad():
            forward = flops_per_image(lambda: model(x), len(x))
        row["flops_per_img"] = forward and 2 * forward * describe(attack)["attack.steps"]
        row["flops_note"] = "estimated: steps x 2 x forward FLOPs"
    return {"stage": f"attack {name}", "variant": variant, "batch": len(x), "accel": "fp32", **row}


def projection(cfg, rows: list[dict]) -> dict:
    """Paper-preset seconds per training stage at the best measured paper-batch variant."""
    best = {}
    for r in rows:
        if "img_s" in r and "-x" not in r["variant"] and not r["stage"].startswith("attack"):
            best[r["stage"]] = max(best.get(r["stage"], 0), r["img_s"])
    n = cfg.data.n_train or 50_000
    epochs = {"classifier": cfg.classifier.epochs, "teacher_at": cfg.at_teacher.epochs,
              "teacher_nt": cfg.nt_teacher.epochs, "student_kd_at_nt": sum(s.epochs for s in cfg.students),
              "soap": cfg.soap.epochs, "nrp": cfg.nrp.epochs}
    out = {s: epochs[s] * n / best[s] for s in epochs if s in best}
    if "classifier" in out:
        out["surrogate"] = cfg.surrogate.epochs * n / best["classifier"]
    pgd = [r["img_s"] for r in rows if r["stage"] == "attack pgd8" and "img_s" in r]
    if pgd:
        out["training_aes"] = n / max(pgd)
    out["total_training"] = sum(out.values())
    return {k: round(v, 1) for k, v in out.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write (rewritten after each measurement)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--data", help="CIFAR-10 (any kdp layout, e.g. .gpu/cifar10.kdpjpeg; default: synthetic)")
    p.add_argument("--budget", type=float, default=240, help="seconds of measuring; later ones are skipped")
    p.add_argument("--per-variant", type=float, default=2.0, help="timed seconds per measurement")
    p.add_argument("--variants", default="ref,fast,compile,graphs,fast-x8", help="which variants, in order")
    p.add_argument("--smoke", action="store_true", help="tiny models and data: check the script anywhere")
    a = p.parse_args(argv)
    from kdp.accel import resolve_device

    device = resolve_device(a.device)
    cfg = get_preset("tiny" if a.smoke else "paper")
    n = 512 if a.smoke else 50_000
    data = load_cifar(a.data, n, 1000) if a.data else Cifar(
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (n,)),
        torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 10, (1000,)), "synthetic")
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "git_sha": git_sha(), "host": platform.node(), "preset": cfg.preset,
              "data": data.source, "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "peak_bf16_tflops": peak_tflops(device, 8192), "rows": []}
    out, t_start = Path(a.out), time.perf_counter()
    wanted, flops = a.variants.split(","), {}

    def record(fn, *args):
        if time.perf_counter() - t_start > a.budget:
            report["rows"].append({"stage": args[0], "skipped": "over --budget"})
            return
        try:
            row = fn(*args)
        except Exception as e:  # noqa: BLE001 - recorded; the other measurements go on
            row = {"stage": args[0], "variant": args[-2] if len(args) > 2 else "", "error": f"{type(e).__name__}: {e}"[:400]}
        if row.get("flops_per_img"):
            flops[row["stage"]] = row["flops_per_img"]
        f, peak = flops.get(row["stage"]), report["peak_bf16_tflops"]
        if f and peak and "img_s" in row:  # the reference step's FLOPs: the work, whatever the variant
            row["pct_of_peak"] = 100 * f * row["img_s"] / (peak * 1e12)
        report["rows"].append(row)
        print(json.dumps(row), flush=True)
        report["projection_s"] = projection(cfg, report["rows"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        ins = inputs(cfg, data, device, Path(tmp))
        for name, (recipe, scfg) in stages(cfg).items():
            for v in wanted:
                variant, _, scale = v.partition("-x")
                if recipe in ("soap", "nrp") and variant in ("compile", "graphs"):
                    continue  # their steps call submodules directly: never compiled (kdp.stages.common)
                record(measure_training, name, recipe, scfg, data, ins, device, variant, int(scale or 1), a.per_variant)
        clf = freeze(build_model("classifier", cfg.classifier.arch, width=cfg.classifier.width)).to(device)
        cae = freeze(build_model("purifier", "cae", depth=cfg.at_teacher.depth, width=cfg.at_teacher.width)).to(device)
        x = to_float(data.test_x[:cfg.eval.batch_size]).to(device)
        y = data.test_y[:cfg.eval.batch_size].to(device)
        for attack in ("pgd8", "fgsm", "cw"):
            for v in ("ref", "fast"):
                record(measure_attack, attack, clf, x, y, device, v, a.per_variant)
        for v in ("ref", "fast"):  # the full threat model: PGD-100 through purifier and classifier
            record(measure_attack, "pgd100", Purified(cae, clf), x, y, device, v, a.per_variant)
    report["seconds"] = time.perf_counter() - t_start
    out.write_text(json.dumps(report, indent=2))
    print(f"\n{'stage':<20} {'variant':<10} {'batch':>6} {'img/s':>10} {'% peak':>7} {'warm s':>7}")
    for r in report["rows"]:
        if "img_s" in r:
            pct = f"{r['pct_of_peak']:.1f}" if r.get("pct_of_peak") else "-"
            print(f"{r['stage']:<20} {r['variant']:<10} {r['batch']:>6} {r['img_s']:>10.0f} {pct:>7} {r['warmup_s']:>7.1f}")
        else:
            print(f"{r['stage']:<20} {r.get('variant', ''):<10} {r.get('error') or r.get('skipped')}")
    print("projected paper-preset training seconds:", json.dumps(report.get("projection_s", {})))


if __name__ == "__main__":
    main()
