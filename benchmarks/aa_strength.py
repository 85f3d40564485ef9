"""AutoAttack at torchattacks' 10-step default (`autoattack`) against AutoAttack at the
original strengths (`aa-standard`), side by side on the same models and images: accuracy
left and img/s, against the undefended classifier and end to end against a purified one.
Prints JSON (and writes it with --json).

    python benchmarks/aa_strength.py --run runs/smoke-seed0 --n 100 --json out.json

--run is a finished pipeline run: its classifier/ and student_<variant>/ are attacked on the
first --n test images of its data (data_dir from its config.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdp.attacks import attack_batches, build_attack, describe  # noqa: E402
from kdp.checkpoint import load_frozen  # noqa: E402
from kdp.files import read_json
from kdp.data import load_cifar, to_float  # noqa: E402
from kdp.models import Purified  # noqa: E402
from kdp.provenance import device_name  # noqa: E402
from kdp.accel import resolve_device  # noqa: E402

ATTACKS = ("autoattack", "aa-standard")


def measure(name: str, model, x, y, batch_size: int, device, eps: float) -> dict:
    """Accuracy (%) of `model` on the AEs of attack `name` (L-inf radius eps) crafted on it, and img/s."""
    attack = build_attack(name, model, eps=eps)
    t0 = time.perf_counter()
    x_adv = torch.cat([b.cpu() for b in attack_batches(attack, x, y, batch_size, 0, 0, device)])
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        correct = sum(int((model(x_adv[i:i + batch_size].to(device)).argmax(1).cpu() == y[i:i + batch_size]).sum())
                      for i in range(0, len(y), batch_size))
    return {"accuracy": round(100 * correct / len(y), 2), "seconds": round(seconds, 1),
            "img_per_s": round(len(y) / seconds, 2), "settings": describe(attack)["attack.settings"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a finished pipeline run directory")
    p.add_argument("--variant", default="kd_at_nt", help="the student attacked end to end (default: kd_at_nt)")
    p.add_argument("--n", type=int, default=100, help="test images (default: 100)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--device", default="auto")
    p.add_argument("--eps", default="8/255", help="L-inf radius of both attacks (default: 8/255); a smaller "
                   "one shows their difference on a model that 8/255 already breaks")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args()
    run, device = Path(args.run), resolve_device(args.device)
    num, _, den = args.eps.partition("/")
    eps = float(num) / float(den or 1)
    cfg = read_json(run / "config.json", "config.json")
    data = load_cifar(cfg["data"]["data_dir"], n_train=0, n_test=args.n)
    x, y = to_float(data.test_x), data.test_y
    classifier = load_frozen(run / "classifier", device)
    student = load_frozen(run / f"student_{args.variant}", device)
    models = {"undefended": classifier, f"purified ({args.variant}, full)": Purified(student, classifier)}
    with torch.no_grad():
        clean = {k: round(100 * float((m(x.to(device)).argmax(1).cpu() == y).float().mean()), 2)
                 for k, m in models.items()}
    res = {"run": str(run), "n": len(y), "eps": args.eps, "device": device_name(str(device)), "threads": torch.get_num_threads(),
           "clean_accuracy": clean,
           "results": {k: {a: measure(a, m, x, y, args.batch_size, device, eps) for a in ATTACKS}
                       for k, m in models.items()}}
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
