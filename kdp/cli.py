"""The `kdp` command: run the pipeline in one process, show presets, print result tables."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from kdp.presets import PRESETS
from kdp.errors import ConfigError, NotFoundError


def build_config(preset: str, data_dir: str | None = None, name: str | None = None, sets=()):
    """Preset + data dir + run name + 'key=value' overrides -> a validated PipelineConfig."""
    from kdp.configio import override
    from kdp.presets import get_preset

    from kdp.storage import check_uri, is_uri

    cfg = get_preset(preset)
    if data_dir is not None and is_uri(data_dir):  # fetched (and checked) before any stage
        check_uri(data_dir)  # credentials in it: refused before the config records it
        cfg = override(cfg, f"data.data_dir={data_dir}")
    elif data_dir is not None:
        if not Path(data_dir).expanduser().exists():
            raise NotFoundError(f"--data-dir {data_dir}: no such file or directory")
        # absolute: Ray workers and resumed runs do not share this process's cwd
        cfg = override(cfg, f"data.data_dir={Path(data_dir).expanduser().resolve()}")
    if name is not None:
        cfg = override(cfg, f"name={name}")
    for s in sets:
        cfg = override(cfg, s)
    if cfg.data.n_test is not None:  # after every override: they may set n_test and aa_subset in any order
        cfg.eval.check_test_size(cfg.data.n_test)
    return cfg


def _run(args) -> None:
    from kdp.train import resolve_device

    cfg, seeds = build_config(args.preset, args.data_dir, args.name, args.set), run_seeds(args)
    resolve_device(args.device)
    print_results(run_all(cfg, seeds, args, runtime(args)))


def run_seeds(args):
    """The parsed --seeds (None: one run under the plain name), checked before any work."""
    from kdp.configio import SEED_SCOPES, parse_seeds

    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    if seeds is None and args.seed_scope != SEED_SCOPES[0]:
        raise ConfigError("--seed-scope needs --seeds")
    return seeds


def run_all(cfg, seeds, args, rt, executor=None) -> list:
    """The run, or one run per seed (kdp.pipeline.run_replicates); returns the parquet paths."""
    from kdp.pipeline import run_pipeline, run_replicates

    if seeds is None:
        return [run_pipeline(cfg, args.out, rt, classifier_dir=args.classifier, executor=executor)]
    return run_replicates(cfg, seeds, args.out, rt, args.classifier, args.seed_scope, executor=executor)


def print_results(paths) -> None:
    """Where the rows are; one accuracy table per threat model, each attack with its image
    count; and the command that writes the full report."""
    import os

    import pandas as pd

    from kdp.config import THREAT_MODELS
    from kdp.results import load
    from kdp.storage import is_uri

    paths = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    print("results: " + ", ".join(paths))
    df = pd.concat([load(p) for p in paths], ignore_index=True)
    for threat in (t for t in THREAT_MODELS if t in set(df.threat_model)):
        print(f"\n{threat} threat model: accuracy % (n = test images per attack)\n"
              + threat_table(df, threat).round(2).to_string())
    parents = [p.rsplit("/", 1)[0] if is_uri(p) else str(Path(p).resolve().parent) for p in paths]
    root = parents[0] if len(set(parents)) == 1 else (os.path.commonpath(parents) if not is_uri(paths[0])
                                                      else parents[0].rsplit("/", 1)[0])
    print(f"\nfull report (intervals, Table 2, plots): kdp report {root} --out {root}/report")


def threat_table(df, threat: str):
    """table1 of one threat model, its rows labelled 'attack (n=N)' (and the run, if several),
    attacks and variants under the report's labels (kdp.cells)."""
    from kdp.cells import ATTACK_LABELS, VARIANT_LABELS
    from kdp.results import table1

    t = table1(df, threat)
    n = df[df.threat_model == threat].groupby(["run", "attack"])["n"].max()
    several = df["run"].nunique() > 1
    t.index = [f"{run + ' ' if several else ''}{ATTACK_LABELS.get(a, a)} (n={n[(run, a)]})" for run, a in t.index]
    t.columns = [VARIANT_LABELS.get(v, v) for v in t.columns]
    return t


def _show(args) -> None:
    cfg = build_config(args.preset, sets=args.set)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))


def _results(args) -> None:
    from kdp.results import load, table1

    df = load(args.path)
    print(table1(df, args.threat_model).round(2).to_string())


def add_run_args(r: argparse.ArgumentParser) -> None:
    """Arguments shared by `kdp run` and the Ray job (jobs/pipeline.py)."""
    r.add_argument("--name", help="run name (default: the preset's); re-running a name resumes it")
    add_config_args(r)
    r.add_argument("--classifier", help="use this classifier checkpoint dir instead of training one")
    r.add_argument("--seeds", metavar="LIST", help="replicate seeds, e.g. 0,1,2: one run <name>-seed<k> each, "
                   "sharing the classifier and training AEs (default: one run, the stages' own seeds)")
    from kdp.configio import SEED_SCOPES

    r.add_argument("--seed-scope", default=SEED_SCOPES[0], choices=SEED_SCOPES,
                   help="what --seeds reseeds: purifiers (teachers, students, baselines, attack starts; "
                   "default) or all (the classifier and training AEs too)")
    add_runtime_args(r)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Runtime's flags (--bf16, --channels-last, --compile) from its fields, and --quiet for progress=False."""
    from kdp.config import Runtime
    from kdp.flags import add_dataclass_args

    add_dataclass_args(p, Runtime, only=("bf16", "channels_last", "compile", "rescore"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def runtime(args, **fixed):
    from kdp.config import Runtime
    from kdp.flags import dataclass_from_args

    return dataclass_from_args(Runtime, args, progress=not args.quiet, **fixed)


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The flags of a pipeline config and where it writes: kdp run, jobs/pipeline.py, sweeps."""
    p.add_argument("--preset", default="smoke", help=f"one of: {', '.join(PRESETS)} (default: smoke)")
    p.add_argument("--data-dir", help="cifar-10-batches-py dir, ImageFolder dir or .zip (default: download)")
    p.add_argument("--out", default="runs", help="output root (default: ./runs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. ae.eps=4/255, students.beta=0.3, or students=at,at+nt "
                   "(which students, by teacher set) (repeatable)")


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    """The search space (YAML and/or flags) and the base pipeline config of a sweep."""
    p.add_argument("--sweep", metavar="YAML", help="search space file (see jobs/sweep.yaml); flags override it")
    p.add_argument("--name", help="sweep id (default: the YAML's name, else 'sweep')")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name under --out (Tune restore)")
    add_config_args(p)
    p.add_argument("--variants", help="comma list of at_only, kd_at, kd_nt, kd_at_nt (default: all four)")
    p.add_argument("--beta", help="grid '0.25,0.5' or range 'uniform:0.1:1' (default: 0.5)")
    p.add_argument("--gamma", help="grid or range, like --beta (default: 0.5)")
    p.add_argument("--eps", help="training eps grid, e.g. '4/255,8/255,16/255' (default: 8/255)")
    p.add_argument("--kd-space", help="comma list of pixels, logits (default: pixels)")
    p.add_argument("--seeds", help="replicate seeds, a grid dimension, e.g. '0,1,2' (default: 0)")
    p.add_argument("--num-samples", type=int, help="repeats of the grid (default: 1)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    p.add_argument("--no-share", action="store_true", help="every trial trains its own classifier and "
                   "teachers (the naive sweep; for benchmarks)")
    add_runtime_args(p)


_SPACE_FLAGS = ("variants", "beta", "gamma", "eps", "kd_space", "seeds", "num_samples", "max_concurrent")


def build_sweep(args):
    """(SweepConfig, base PipelineConfig, Runtime) from the sweep flags; --resume reads sweep.json."""
    from kdp.storage import open_storage
    from kdp.sweep import load_sweep_file, load_sweep_record, sweep_exists, sweep_from_dict

    open_storage(args.out).preflight()  # a bucket's problems in one line, before Ray starts
    rt = runtime(args)
    space = {k: getattr(args, k) for k in _SPACE_FLAGS}
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in space.items() if v is not None]
        given += ["--sweep"] * bool(args.sweep) + ["--set"] * bool(args.set) + ["--no-share"] * args.no_share
        if not args.name or given:
            raise ConfigError("--resume takes --name and --out only (the sweep's recorded config is used)"
                             + (f"; drop {', '.join(given)}" if given else ""))
        sweep, base = load_sweep_record(args.out, args.name)
        return sweep, base, rt
    space.update(name=args.name, share=False if args.no_share else None)
    sweep = load_sweep_file(args.sweep, **space) if args.sweep else sweep_from_dict({}, **space)
    if sweep_exists(args.out, sweep.name):
        raise ConfigError(f"sweep {sweep.name!r} exists under {args.out}; pass --resume to continue it "
                         "or pick another --name")
    return sweep, build_config(args.preset, args.data_dir, sweep.name, args.set), rt


def sweep_command(args) -> None:
    """Build the sweep, connect to Ray, run it and print its table (kdp sweep, jobs/sweep.py)."""
    from kdp.distributed.config import connect, isolate, scale_config
    from kdp.distributed.netns import network_uses

    sweep, base, rt = build_sweep(args)
    scale = scale_config(args)
    isolate(args.address, scale, network_uses(args.out, base.data.data_dir), getattr(args, "rerun", None))
    connect(args.address, args.verbose)
    from kdp.distributed.sweep import run_sweep

    print_results(run_sweep(sweep, base, args.out, scale, rt, resume=args.resume))


def kdp_cause(e: BaseException):
    """The KdpError that `e` wraps (a Ray task's, a Tune trial's: `.cause` or the exception
    chain), or None: such an error is still bad input, said in one line."""
    from kdp.errors import KdpError

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, KdpError) and type(e).__module__.startswith("kdp."):
            return e
        e, seen = getattr(e, "cause", None) or e.__cause__ or e.__context__, seen + 1
    return None


def one_line(e: BaseException) -> str:
    """An error's message without a remote traceback (Ray's RayTaskError-derived classes append it)."""
    cause = getattr(e, "cause", None)
    return str(cause if cause is not None else e).splitlines()[0] if str(e) else type(e).__name__


def run_errors():
    """The exceptions that mean bad input (`kdp.errors`): one line, exit code 2. Anything else
    keeps its traceback and exits 1."""
    from kdp.errors import KdpError

    return (KdpError,)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdp", description="Distillation-based adversarial purification "
                                "(Koo, Chae, Lee 2023): train a classifier, AT/NT teachers and students, evaluate.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the whole pipeline in this process",
                       description="Run every stage; re-running the same --name resumes.")
    add_run_args(r)
    from kdp.config import Runtime
    from kdp.flags import add_dataclass_args

    # the Ray job's devices are Ray's to assign; a time limit stops this one process
    add_dataclass_args(r, Runtime, only=("device", "time_limit"))
    r.set_defaults(fn=_run)
    s = sub.add_parser("show", help="print a preset's full config as JSON")
    s.add_argument("--preset", default="smoke", help=f"one of: {', '.join(PRESETS)}")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    s.set_defaults(fn=_show)
    t = sub.add_parser("results", help="print the Table 1 layout of a results file or directory")
    t.add_argument("path", help="a results .parquet file or a directory of them")
    t.add_argument("--threat-model", default="classifier", choices=("classifier", "full", "transfer"))
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
    return p


def interrupted(prog: str, e: BaseException, args=None) -> int:
    """The one line an interrupted command ends with; its exit code (130 SIGINT, 143 SIGTERM)."""
    how = (f"add --resume (--name {args.name or '<sweep>'} --out {args.out}) to resume it"
           if args is not None and hasattr(args, "resume") and not args.resume else "the same command resumes")
    from kdp.interrupt import OutOfTime

    word = "stopped" if isinstance(e, OutOfTime) else "interrupted"
    print(f"\n{prog}: {word} ({e or 'SIGINT'}); {how}: finished stages are kept, a stage in flight "
          "continues from its last epoch", file=sys.stderr)
    return getattr(e, "code", 130)


def run_command(prog: str, fn, *args) -> int:
    """fn(*args) as a command: 0; 2 and one line for bad input; on Ctrl-C (130) or SIGTERM (143)
    the stages in flight are stopped, a Ray this process joined is shut down, and one line says
    how to resume. `kdp`, jobs/pipeline.py and jobs/sweep.py all end through here."""
    from kdp.interrupt import STOP, Interrupted, reap_at_exit, stoppable

    try:
        with stoppable():
            try:
                fn(*args)
            except run_errors():
                raise
            except Exception as e:
                kdp = kdp_cause(e)
                if kdp is not None:  # bad input met in a Ray task or Tune trial: still one line
                    raise kdp from None
                if STOP.is_set():
                    raise Interrupted() from e
                raise
            except BaseException as e:  # once stopped, whatever escapes is the stop's doing
                if STOP.is_set() and not isinstance(e, (Interrupted, KeyboardInterrupt)):
                    raise Interrupted() from e
                raise
    except run_errors() as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            reap_at_exit()  # if the shutdown is cut short, nothing this command started stays
            ray.shutdown()  # a local Ray this command started goes with it; a cluster ends its work
        return interrupted(prog, e, args[0] if args else None)
    return 0


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
