"""An 8-trial sweep with ASHA (`scheduler: asha`) against the same grid without it: wall time,
trials stopped, and whether both pick the same best trial. The base is the smoke preset, a
little smaller (as benchmarks/sweep_sharing.py), with students of 4 epochs so that ASHA has
rungs at epochs 1 and 2. Both sweeps run on the same Ray (embedded unless --address), the
grid first, each from its own empty sweep directory (its own shared classifier and teachers).
Prints JSON (and writes it with --json).

    python benchmarks/asha_smoke.py --data-dir ../shared/data/cifar10-subset --json out.json
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
from kdp.sweep import sweep_from_dict, sweep_metric  # noqa: E402

SETS = ["data.n_train=1024", "data.n_test=100", "classifier.epochs=5", "eval.attacks=fgsm+pgd8",
        "eval.adaptive_attacks=", "eval.batch_size=50", "students.epochs=4"]


def run(space: dict, scheduler: str, data_dir: str, out: Path, scale: ScaleConfig) -> dict:
    from kdp.distributed.sweep import run_sweep
    from kdp.results import load

    sweep = sweep_from_dict(space, name=scheduler, scheduler=scheduler)
    base = build_config("smoke", data_dir, scheduler, SETS)
    metric = sweep_metric(sweep, base)  # acc/pgd8: the attack column pgd8, classifier threat model
    t0 = time.perf_counter()
    df = load(run_sweep(sweep, base, out, scale, Runtime(progress=False), log=lambda *_: None))
    seconds = time.perf_counter() - t0
    stopped = df[df.stopped_epoch.notna()].groupby("trial_id").stopped_epoch.first()
    ranked = df[(df.attack == metric.split("/")[1]) & (df.threat_model == "classifier")]
    best = ranked.loc[ranked.accuracy.idxmax()]
    return {"seconds": round(seconds, 1), "trials": int(df.trial_id.nunique()), "stopped": len(stopped),
            "stopped_at_epoch": sorted(int(e) for e in stopped), "metric": metric,
            "best": {"beta": float(best["sweep.beta"]), "gamma": float(best["sweep.gamma"]),
                     "accuracy": float(best.accuracy)},
            "evaluated": {f"beta={r['sweep.beta']:g} gamma={r['sweep.gamma']:g}": round(float(r.accuracy), 4)
                          for _, r in ranked.sort_values(["sweep.beta", "sweep.gamma"]).iterrows()}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--address", help="Ray address (default: start a local Ray)")
    p.add_argument("--out", help="output root (default: a temp dir)")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args()
    connect(args.address)
    import ray

    space = {"variants": "kd_at_nt", "beta": "0.25,0.5,1,2", "gamma": "0.5,1"}
    out = Path(args.out or tempfile.mkdtemp(prefix="kdp-asha-bench-"))
    scale = ScaleConfig(eval_shard_size=100)
    res = {"sweep": space, "base": "smoke + " + " ".join(SETS), "cpus": ray.cluster_resources().get("CPU"),
           "none": run(space, "none", args.data_dir, out, scale), "asha": run(space, "asha", args.data_dir, out, scale)}
    res["asha_over_none"] = round(res["asha"]["seconds"] / res["none"]["seconds"], 2)
    res["same_best"] = res["asha"]["best"] == res["none"]["best"]
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
