"""What the `kdp` command and the Ray jobs (jobs/pipeline.py, jobs/sweep.py) share: their
flags (the run's, the runtime's, a sweep's) and how a command ends: 0; one line and exit 2 for
bad input; on Ctrl-C or SIGTERM the stages in flight stopped and one line saying how to resume.
The work itself is the library's (`kdp.pipeline.run`, `kdp.distributed.sweep.run_sweep`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdp.errors import ConfigError
from kdp.presets import PRESETS, build_config
from kdp.sweep_space import KNOBS, SCHEDULERS, SEARCHES


def run_seeds(args):
    """The parsed --seeds (None: one run under the plain name), checked before any work."""
    from kdp.configio import SEED_SCOPES, parse_seeds

    seeds = None if args.seeds is None else parse_seeds(args.seeds)
    if seeds is None and args.seed_scope != SEED_SCOPES[0]:
        raise ConfigError("--seed-scope needs --seeds")
    return seeds


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


EXECUTORS = ("local", "ray")


def add_pipeline_args(p: argparse.ArgumentParser, executor: str) -> None:
    """The flags of `kdp run` (--executor local by default) and of jobs/pipeline.py (the same
    command, --executor ray by default)."""
    from kdp.config import Runtime
    from kdp.distributed.config import add_scale_args
    from kdp.flags import add_dataclass_args

    add_run_args(p)
    p.add_argument("--executor", choices=EXECUTORS, default=executor, help="local: every stage in this "
                   "process; ray: stages as Ray tasks and Train runs, on the cluster at --address or a "
                   "fresh local Ray (default: %(default)s)")
    local = p.add_argument_group("in this process (--executor local)")
    add_dataclass_args(local, Runtime, only=("device", "time_limit"))
    add_scale_args(p.add_argument_group("on Ray (--executor ray)"))


def pipeline_command(args) -> None:
    """kdp run, jobs/pipeline.py: bad input refused in one line before any work (and before Ray
    starts), the output root checked once; then kdp.pipeline.run in this process or on Ray."""
    from kdp.checkpoint import read_meta
    from kdp.pipeline import run
    from kdp.results import print_tables
    from kdp.storage import open_storage

    cfg, rt, seeds = build_config(args.preset, args.data_dir, args.name, args.set), runtime(args), run_seeds(args)
    scale = _scale(args)
    if args.classifier:
        read_meta(Path(args.classifier))
    store = open_storage(args.out)  # for Ray: a directory every node mounts, or a bucket every node reaches
    store.preflight()
    print_tables(run(cfg, store, rt, seeds, args.seed_scope, args.classifier, _executor(args, scale, cfg, store)))


def _scale(args):
    """The Ray executor's ScaleConfig (None for --executor local); the other executor's flags
    are refused, naming them."""
    from kdp.config import Runtime
    from kdp.distributed.config import ScaleConfig, scale_config

    scale = scale_config(args)
    if args.executor == "ray":
        given = [f for f, v in (("--device", args.device != Runtime.device), ("--time-limit", args.time_limit)) if v]
        why = "on Ray, --use-gpu asks for GPUs; a time limit stops one process"
    else:
        given = [f"--{f.replace('_', '-')}" for f in ScaleConfig.__dataclass_fields__
                 if getattr(scale, f) != getattr(ScaleConfig(), f)] + ["--address"] * bool(args.address)
        why = "they size and place the stages on Ray"
    if given:
        other = "local" if args.executor == "ray" else "ray"
        raise ConfigError(f"{', '.join(given)}: only with --executor {other} ({why})")
    return scale if args.executor == "ray" else None


def _executor(args, scale, cfg, store):
    """None (this process, on --device) or a RayExecutor, after joining or starting Ray."""
    if scale is None:
        from kdp.accel import resolve_device

        resolve_device(args.device)
        return None
    from kdp.distributed.config import connect, isolate
    from kdp.distributed.netns import network_uses

    uses = network_uses(args.out, cfg.data.data_dir, args.classifier)
    isolate(args.address, scale, uses, getattr(args, "rerun", None))
    connect(args.address, args.verbose)
    from kdp.distributed.executor import RayExecutor  # here: Ray is imported once, after any re-run above
    from kdp.distributed.nodes import check_shared_storage

    check_shared_storage(store)
    return RayExecutor(scale)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """Runtime's flags (--bf16, --channels-last, --compile) from its fields, and --quiet for progress=False."""
    from kdp.config import Runtime
    from kdp.flags import add_dataclass_args

    add_dataclass_args(p, Runtime, only=("bf16", "channels_last", "compile", "rescore", "mlflow"))
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def runtime(args, **fixed):
    """The Runtime of the flags; a --mlflow server that does not answer is one line before any work."""
    from kdp.config import Runtime
    from kdp.flags import dataclass_from_args
    from kdp.tracking import mlflow_call

    rt = dataclass_from_args(Runtime, args, progress=not args.quiet, **fixed)
    if rt.mlflow:
        mlflow_call(rt.mlflow, "experiments/get-by-name", query={"experiment_name": "Default"})
    return rt


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
    for k in KNOBS:
        p.add_argument(k.flag(), dest=k.field, metavar="VALUES", help=_knob_help(k))
    p.add_argument("--search", choices=SEARCHES, help="how trials are chosen: grid (every combination, "
                   "default), random (--num-samples draws) or optuna (--num-samples trials, each proposed by "
                   "Optuna's TPE from the finished ones' --metric; pip install optuna)")
    p.add_argument("--metric", help="the trial result that ranks trials (Optuna learns from it): acc/<attack> "
                   "or acc_full/<attack> (default: acc/ of the config's first attack)")
    p.add_argument("--mode", choices=("max", "min"), help="a larger --metric is better (max, default) or a smaller")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="early stopping: none (default: every trial runs to its "
                   "end) or asha (Tune's ASHA stops students whose per-epoch proxy_acc, PGD-10 on --proxy-n test "
                   "images, falls behind at a rung)")
    p.add_argument("--grace-epochs", type=int, help="asha: epochs before a student may be stopped (default: 1)")
    p.add_argument("--reduction-factor", type=int, help="asha: rungs at grace*factor**k epochs; the top 1/factor "
                   "go on (default: 2)")
    p.add_argument("--proxy-n", type=int, help="asha: test images of the per-epoch proxy (default: 64)")
    p.add_argument("--num-samples", type=int, help="trials: repeats of the grid, or draws of random and optuna "
                   "(default: 1)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what the cluster fits)")
    p.add_argument("--no-share", action="store_true", help="every trial trains its own classifier and "
                   "teachers (the naive sweep; for benchmarks)")
    add_runtime_args(p)


def _knob_help(k) -> str:
    """A knob's doc, its values' form and its default, from its declaration (kdp.sweep_space)."""
    form = (f"comma list of {', '.join(k.choices)}" if k.choices else
            "a comma list, or a range 'uniform:LOW:HIGH' / 'loguniform:LOW:HIGH'" if k.ranged else "a comma list")
    default = ",".join(_number(x) if isinstance(x, float) else str(x) for x in k.default)
    return f"{k.doc.rstrip('.')}; {form} (default: {default})".replace("%", "%%")


def _number(x: float) -> str:
    """8/255 for eps-like values, else the shortest form."""
    return f"{round(x * 255)}/255" if 0 < x < 1 and abs(x * 255 - round(x * 255)) < 1e-9 else f"{x:g}"


_SPACE_FLAGS = (*(k.field for k in KNOBS), "search", "metric", "mode", "scheduler", "grace_epochs",
                "reduction_factor", "proxy_n", "num_samples", "max_concurrent")


def build_sweep(args, store):
    """(SweepConfig, base PipelineConfig, Runtime) from the sweep flags; --resume reads sweep.json
    from `store` (the output root's kdp.storage.Storage)."""
    from kdp.sweep import load_sweep_file, load_sweep_record, sweep_exists, sweep_from_dict, sweep_metric, trial_base

    rt = runtime(args)
    space = {k: getattr(args, k) for k in _SPACE_FLAGS}
    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k, v in space.items() if v is not None]
        given += ["--sweep"] * bool(args.sweep) + ["--set"] * bool(args.set) + ["--no-share"] * args.no_share
        if not args.name or given:
            raise ConfigError("--resume takes --name and --out only (the sweep's recorded config is used)"
                             + (f"; drop {', '.join(given)}" if given else ""))
        sweep, base = load_sweep_record(store, args.name)
        return sweep, base, rt
    space.update(name=args.name, share=False if args.no_share else None)
    sweep = load_sweep_file(args.sweep, **space) if args.sweep else sweep_from_dict({}, **space)
    if sweep_exists(store, sweep.name):
        raise ConfigError(f"sweep {sweep.name!r} exists under {args.out}; pass --resume to continue it "
                         "or pick another --name")
    base = build_config(args.preset, args.data_dir, sweep.name, args.set)
    sweep_metric(sweep, base)  # a metric no trial reports, or ASHA with no rung: one line before Ray starts
    trial_base(sweep, base)
    return sweep, base, rt


def sweep_command(args) -> None:
    """Build the sweep, connect to Ray, run it and print its table (kdp sweep, jobs/sweep.py)."""
    from kdp.distributed.config import connect, isolate, scale_config
    from kdp.distributed.netns import network_uses
    from kdp.storage import open_storage

    store = open_storage(args.out)
    store.preflight()  # a bucket's problems in one line, before Ray starts; once per command
    sweep, base, rt = build_sweep(args, store)
    scale = scale_config(args)
    isolate(args.address, scale, network_uses(args.out, base.data.data_dir), getattr(args, "rerun", None))
    connect(args.address, args.verbose)
    from kdp.distributed.sweep import run_sweep

    from kdp.results import print_tables

    print_tables(run_sweep(sweep, base, store, scale, rt, resume=args.resume))


def _chain(e: BaseException, depth: int = 8):
    """`e` and what it wraps (a Ray task's `.cause`, then the exception chain), at most `depth`."""
    while e is not None and depth > 0:
        yield e
        e, depth = getattr(e, "cause", None) or e.__cause__ or e.__context__, depth - 1


def kdp_cause(e: BaseException):
    """The KdpError that `e` wraps (a Ray task's, a Tune trial's: `.cause` or the exception
    chain), or None: such an error is still bad input, said in one line."""
    from kdp.errors import KdpError

    return next((c for c in _chain(e) if isinstance(c, KdpError) and type(c).__module__.startswith("kdp.")), None)


def disk_cause(e: BaseException):
    """A local write the disk refused anywhere in `e`'s chain (kdp.errors.disk_error), naming the
    file's directory: one line, like bad input; or None."""
    from kdp.errors import disk_error

    errs = (disk_error(c, Path(c.filename).parent) for c in _chain(e) if isinstance(c, OSError) and c.filename)
    return next((err for err in errs if err is not None), None)


def one_line(e: BaseException) -> str:
    """An error's message without a remote traceback (Ray's RayTaskError-derived classes append it)."""
    from kdp.errors import redact

    cause = getattr(e, "cause", None)
    return redact(str(cause if cause is not None else e).splitlines()[0]) if str(e) else type(e).__name__


def run_errors():
    """The exceptions that mean bad input (`kdp.errors`): one line, exit code 2. Anything else
    keeps its traceback and exits 1."""
    from kdp.errors import KdpError

    return (KdpError,)


def interrupted(prog: str, e: BaseException, args=None) -> int:
    """The one line an interrupted command ends with; its exit code (130 SIGINT, 143 SIGTERM)."""
    how = (f"add --resume (--name {args.name or '<sweep>'} --out {args.out}) to resume it"
           if args is not None and hasattr(args, "resume") and not args.resume else "the same command resumes")
    from kdp.interrupt import OutOfTime

    word = "stopped" if isinstance(e, OutOfTime) else "interrupted"
    print(f"\n{prog}: {word} ({e or 'SIGINT'}); {how}: finished stages are kept, a stage in flight "
          "continues from its last epoch", file=sys.stderr, flush=True)
    return getattr(e, "code", 130)


def run_command(prog: str, fn, *args) -> int:
    """fn(*args) as a command: 0, or the int fn returns (`kdp export --check`: 1 on a mismatch); 2 and one
    line for bad input; on Ctrl-C (130) or SIGTERM (143)
    the stages in flight are stopped, one line says how to resume, and a Ray this process joined
    is shut down (unless a library thread still calls into it: then this process's exit ends its
    work on a cluster, and a reaper a local Ray's processes). `kdp`, jobs/pipeline.py and jobs/sweep.py all end through here."""
    from kdp.interrupt import STOP, Interrupted, reap_at_exit, stoppable, working

    status = None
    try:
        with stoppable():
            try:
                status = fn(*args)
            except run_errors():
                raise
            except Exception as e:
                kdp = kdp_cause(e) or disk_cause(e)
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
        code = interrupted(prog, e, args[0] if args else None)  # said first: nothing below may lose it
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            reap_at_exit()  # whatever happens next, nothing this command started outlives it
            if not working():  # else a library thread (Tune's loop) would call into a shut-down
                ray.shutdown()  # core worker, which then ends the process (exit 1, not `code`)
        return code
    return status if isinstance(status, int) else 0
