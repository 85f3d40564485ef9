"""The `kdp` command: a table of subcommands (run, show, results, report, analyze, sweep, cache, export),
each a function of its parsed flags; the flags and the command's ending they share with the
Ray jobs are in kdp.commands."""
from __future__ import annotations

import argparse
import dataclasses
import json

from kdp.commands import add_pipeline_args, add_sweep_args, pipeline_command, run_command, sweep_command
from kdp.config import THREAT_MODELS, ThreatModel
from kdp.presets import PRESETS, build_config


def _show(args) -> None:
    cfg = build_config(args.preset, sets=args.set)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))


def _results(args) -> None:
    from kdp.results import load, table1

    df = load(args.path)
    print(table1(df, args.threat_model).round(2).to_string())


def _export(args) -> int:
    from kdp.export import export

    if args.check:
        from kdp.robustbench_check import require

        require()  # before anything is written
    model = export(args.run_dir, args.variant, args.out, args.name)
    print(f"wrote {model} and {model.with_suffix('.json')}", flush=True)
    return _check(args, model) if args.check else 0


def _check(args, model) -> int:
    """RobustBench's own code on the exported model (kdp.robustbench_check): a table, <name>.check.json,
    and exit status 1 when an image's outcome differs from kdp's rows."""
    from kdp.robustbench_check import check, save, table

    print("checking with RobustBench's clean_accuracy and the original AutoAttack (CPU) ...", flush=True)
    result = check(args.run_dir, args.variant, model, model.with_suffix(".json"))
    path = save(result, model.with_suffix(".check.json"))
    print(f"{table(result)}\nwrote {path}")
    return 0 if result["same"] else 1


def add_export_args(e: argparse.ArgumentParser) -> None:
    e.add_argument("run_dir", metavar="RUN_DIR", help="a finished run's directory (<out>/<name> of kdp run)")
    e.add_argument("variant", metavar="VARIANT", help="the defense, as the results name it: none (the classifier "
                   "alone), at_teacher, nt_teacher, a student (kd_at, kd_nt, kd_at_nt) or one of the run's baselines")
    e.add_argument("--out", required=True, metavar="DIR", help="where to write <name>.pt and <name>.json")
    e.add_argument("--name", help="the files' name (default: kdp_<run>_<variant>)")
    e.add_argument("--check", action="store_true", help="after writing, score the exported model with "
                   "RobustBench's own code (robustbench.utils.clean_accuracy and the original AutoAttack, "
                   "version='standard', the run's eps, seed and batch size, on the CPU) on the test images of "
                   "kdp's aa-standard row, in a fresh interpreter without kdp; print kdp's and RobustBench's "
                   "correct/n, clean and under AutoAttack, and whether the same images are correct; write "
                   "DIR/<name>.check.json; exit status 1 when they differ. Needs the robustbench extra: "
                   "pip install -e '.[robustbench]'")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdp", description="Distillation-based adversarial purification "
                                "(Koo, Chae, Lee 2023): train a classifier, AT/NT teachers and students, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the whole pipeline, in this process or on Ray",
                       description="Run every stage; re-running the same --name resumes. --executor ray "
                       "is the Ray job (jobs/pipeline.py).")
    add_pipeline_args(r, "local")
    r.set_defaults(fn=pipeline_command)
    s = sub.add_parser("show", help="print a preset's full config as JSON")
    s.add_argument("--preset", default="smoke", help=f"one of: {', '.join(PRESETS)}")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    s.set_defaults(fn=_show)
    t = sub.add_parser("results", help="print the Table 1 layout of a results file or directory")
    t.add_argument("path", help="a results .parquet file or a directory of them")
    t.add_argument("--threat-model", default=ThreatModel.CLASSIFIER.value, choices=THREAT_MODELS)
    t.set_defaults(fn=_results)
    from kdp.report import add_report_args, report_command

    g = sub.add_parser("report", help="markdown tables beside the paper's numbers, plots and a Figure-5 grid",
                       description="Write report.md and PNGs from a results file or dataset directory.")
    add_report_args(g)
    g.set_defaults(fn=report_command)
    from kdp.analyze import add_analyze_args, analyze_command

    a = sub.add_parser("analyze", help="the blend test: fit each student's output as a·x + b·T_AT(x') + c·T_NT(x)",
                       description="Least-squares fit of every student's output on test AEs to the clean image "
                       "and the teachers' outputs; prints (a, b, c, R²) and writes <run>/blend.json.")
    add_analyze_args(a)
    a.set_defaults(fn=analyze_command)
    w = sub.add_parser("sweep", help="a Ray Tune sweep over variants, beta, gamma, eps (same as jobs/sweep.py)",
                       description="Sweep the method's knobs with Ray Tune; --resume continues a sweep.")
    add_sweep_args(w)
    from kdp.distributed.config import add_scale_args

    add_scale_args(w)
    w.set_defaults(fn=sweep_command)
    from kdp.cache import add_cache_args, cache_command

    c = sub.add_parser("cache", help="list the AE caches under an output root, their sizes; prune them",
                       description="List the training and evaluation AE caches under ROOT (sweeps' shared ones "
                       "too) with entries, size and last use; --older-than DAYS and/or --unused prune them.")
    add_cache_args(c)
    c.set_defaults(fn=cache_command)
    e = sub.add_parser("export", help="one defense of a run as a TorchScript model and a RobustBench card",
                       description="Write DIR/<name>.pt, purifier and classifier as one TorchScript model "
                       "(torch.jit.load; [0, 1] images -> logits), and DIR/<name>.json, a card in RobustBench's "
                       "model_info format with kdp's clean and full-threat aa-standard accuracies. Refused: "
                       "defenses RobustBench excludes (non-differentiable or randomized purifiers). --check "
                       "then scores the model with RobustBench's own code against kdp's rows. docs/export.md")
    add_export_args(e)
    e.set_defaults(fn=_export)
    return p


def main(argv=None) -> int:
    from kdp.distributed.netns import this_command

    args = parser().parse_args(argv)
    args.rerun = this_command(argv)
    return run_command("kdp", args.fn, args)


def console() -> None:
    """The `kdp` console script: main(), then an exit that leaves no stopped stage's thread behind."""
    from kdp.interrupt import exit_with

    exit_with(main())


if __name__ == "__main__":
    console()
