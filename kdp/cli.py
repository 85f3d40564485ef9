"""The `kdp` command: run the pipeline in one process, show presets, print result tables."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from kdp.presets import PRESETS


def build_config(preset: str, data_dir: str | None = None, name: str | None = None, sets=()):
    """Preset + data dir + run name + 'key=value' overrides -> a validated PipelineConfig."""
    from kdp.config import override
    from kdp.presets import get_preset

    cfg = get_preset(preset)
    if data_dir is not None:
        if not Path(data_dir).expanduser().exists():
            raise ValueError(f"--data-dir {data_dir}: no such file or directory")
        # absolute: Ray workers and resumed runs do not share this process's cwd
        cfg = override(cfg, f"data.data_dir={Path(data_dir).expanduser().resolve()}")
    if name is not None:
        cfg = override(cfg, f"name={name}")
    for s in sets:
        cfg = override(cfg, s)
    return cfg


def _run(args) -> None:
    from kdp.config import Runtime
    from kdp.pipeline import run_pipeline
    from kdp.results import load_results, table1

    from kdp.train import resolve_device

    cfg = build_config(args.preset, args.data_dir, args.name, args.set)
    resolve_device(args.device)
    rt = Runtime(device=args.device, bf16=args.bf16, channels_last=args.channels_last,
                 progress=not args.quiet)
    path = run_pipeline(cfg, args.out, rt, classifier_dir=args.classifier)
    print(f"results: {path}")
    print(table1(load_results(path)).round(2).to_string())


def _show(args) -> None:
    cfg = build_config(args.preset, sets=args.set)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))


def _results(args) -> None:
    from kdp.results import load_results, table1

    df = load_results(args.path)
    print(table1(df, args.threat_model).round(2).to_string())


def add_run_args(r: argparse.ArgumentParser) -> None:
    """Arguments shared by `kdp run` and the Ray job (jobs/pipeline.py)."""
    r.add_argument("--preset", default="smoke", help=f"one of: {', '.join(PRESETS)} (default: smoke)")
    r.add_argument("--data-dir", help="cifar-10-batches-py dir, ImageFolder dir or .zip (default: download)")
    r.add_argument("--out", default="runs", help="output root (default: ./runs)")
    r.add_argument("--name", help="run name (default: the preset's); re-running a name resumes it")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. ae.eps=4/255 or students.beta=0.3 (repeatable)")
    r.add_argument("--classifier", help="use this classifier checkpoint dir instead of training one")
    r.add_argument("--bf16", action="store_true", help="bf16 autocast for training on CUDA")
    r.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def run_errors():
    """The exceptions that mean bad input: reported as one line, exit code 2."""
    from kdp.checkpoint import CheckpointError
    from kdp.data import DataError

    return (ValueError, DataError, CheckpointError, FileNotFoundError)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdp", description="Distillation-based adversarial purification "
                                "(Koo, Chae, Lee 2023): train a classifier, AT/NT teachers and students, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the whole pipeline in this process",
                       description="Run every stage; re-running the same --name resumes.")
    add_run_args(r)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    r.set_defaults(fn=_run)
    s = sub.add_parser("show", help="print a preset's full config as JSON")
    s.add_argument("--preset", default="smoke", help=f"one of: {', '.join(PRESETS)}")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    s.set_defaults(fn=_show)
    t = sub.add_parser("results", help="print the Table 1 layout of a results file or directory")
    t.add_argument("path", help="a results .parquet file or a directory of them")
    t.add_argument("--threat-model", default="blind", choices=("blind", "end_to_end"))
    t.set_defaults(fn=_results)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.fn(args)
    except run_errors() as e:
        print(f"kdp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kdp: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
