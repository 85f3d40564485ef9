"""A sweep's evaluation time with the evaluation AE cache against without it: the same small
ablation sweep runs twice on the same Ray (embedded unless --address), from empty output
dirs, once crafting every trial's classifier-threat AEs itself (Runtime.eval_cache=False)
and once reusing them (the default). Evaluation seconds are the `evaluate` stages' own
times, summed over trials, from the trials' events. Prints JSON (and writes it with --json).

    python benchmarks/eval_cache.py --data-dir ../shared/data/cifar10-subset --json out.json
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
from kdp.events import read_events  # noqa: E402
from kdp.sweep import sweep_from_dict  # noqa: E402

# the smoke preset, smaller: 1024 training images, 100 test images, the paper's attack suite
SETS = ["data.n_train=1024", "data.n_test=100", "classifier.epochs=5", "eval.threat_models=classifier",
        "eval.attacks=pgd8+pgd16+fgsm+bim+cw+autoattack", "eval.batch_size=50"]


def eval_seconds(sweep_dir: Path) -> list[float]:
    return [e["seconds"] for t in sorted((sweep_dir / "trials").iterdir()) for e in read_events(t)
            if e["stage"] == "evaluate" and e["status"] == "finished"]


def time_sweep(space: dict, cache: bool, data_dir: str, out: Path, scale: ScaleConfig) -> dict:
    from kdp.distributed.sweep import run_sweep

    name = "cached" if cache else "uncached"
    base = build_config("smoke", data_dir, name, SETS)
    t0 = time.perf_counter()
    run_sweep(sweep_from_dict(space, name=name), base, out, scale, Runtime(progress=False, eval_cache=cache),
              log=lambda *_: None)
    wall = time.perf_counter() - t0
    per_trial = eval_seconds(out / name)
    return {"sweep_seconds": round(wall, 1), "eval_seconds": round(sum(per_trial), 1),
            "eval_seconds_per_trial": [round(s, 1) for s in per_trial],
            "cache_entries": len(list((out / name / "shared" / "eval_aes").glob("*/x_adv.npy")))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--address", help="Ray address (default: start a local Ray)")
    p.add_argument("--variants", default="at_teacher,kd_at,kd_nt,kd_at_nt")
    p.add_argument("--beta", default="0.25,0.5")
    p.add_argument("--out", help="output root (default: a temp dir)")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args()
    connect(args.address)
    import ray

    space = {"variants": args.variants, "beta": args.beta}
    out = Path(args.out or tempfile.mkdtemp(prefix="kdp-evalcache-bench-"))
    scale = ScaleConfig(eval_shard_size=100)
    res = {"sweep": space, "base": "smoke + " + " ".join(SETS), "cpus": ray.cluster_resources().get("CPU"),
           "uncached": time_sweep(space, False, args.data_dir, out, scale),
           "cached": time_sweep(space, True, args.data_dir, out, scale)}
    res["eval_speedup"] = round(res["uncached"]["eval_seconds"] / res["cached"]["eval_seconds"], 2)
    print(json.dumps(res, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
