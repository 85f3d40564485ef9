"""Wall time of one small ablation sweep with sharing (classifier and NT teacher once, AT
teacher and AEs once per eps) against the naive sweep, in which every trial trains its own
classifier and teachers. Both run on the same Ray (embedded unless --address), one after
the other, from empty output dirs. Prints JSON (and writes it with --json).

    python benchmarks/sweep_sharing.py --data-dir ../shared/data/cifar10-subset --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdp.presets import build_config  # noqa: E402
from kdp.config import Runtime  # noqa: E402
from kdp.distributed.config import ScaleConfig, connect  # noqa: E402
from kdp.sweep import sweep_from_dict  # noqa: E402

# the smoke preset, a little smaller: 1024 training images, 100 test images, two attacks
SETS = ["data.n_train=1024", "data.n_test=100", "classifier.epochs=5", "eval.attacks=fgsm+pgd8",
        "eval.adaptive_attacks=", "eval.batch_size=50"]


def time_sweep(space: dict, share: bool, data_dir: str, out: Path, scale: ScaleConfig) -> dict:
    from kdp.distributed.sweep import run_sweep
    from kdp.results import load

    name = "shared" if share else "naive"
    sweep = sweep_from_dict(space, name=name, share=share)
    base = build_config("smoke", data_dir, name, SETS)
    t0 = time.perf_counter()
    path = run_sweep(sweep, base, out, scale, Runtime(progress=False), log=lambda *_: None)
    seconds = time.perf_counter() - t0
    df = load(path)
    return {"seconds": round(seconds, 1), "trials": int(df.trial_id.nunique()), "rows": len(df),
            "classifiers_trained": len(list((out / name).rglob("classifier-*/model.pt"))),
            "at_teachers_trained": len(list((out / name).rglob("teacher_at-*/model.pt")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--address", help="Ray address (default: start a local Ray)")
    p.add_argument("--variants", default="at_teacher,kd_at,kd_nt,kd_at_nt")
    p.add_argument("--beta", default="0.25,0.5")
    p.add_argument("--eps", default="8/255")
    p.add_argument("--out", help="output root (default: a temp dir)")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args()
    connect(args.address)
    import ray

    space = {"variants": args.variants, "beta": args.beta, "eps": args.eps}
    out = Path(args.out or tempfile.mkdtemp(prefix="kdp-sweep-bench-"))
    scale = ScaleConfig(eval_shard_size=100)
    res = {"sweep": space, "base": "smoke + " + " ".join(SETS), "cpus": ray.cluster_resources().get("CPU"),
           "shared": time_sweep(space, True, args.data_dir, out, scale),
           "naive": time_sweep(space, False, args.data_dir, out, scale)}
    res["naive_over_shared"] = round(res["naive"]["seconds"] / res["shared"]["seconds"], 2)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
