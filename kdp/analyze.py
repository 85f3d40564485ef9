"""The blend test: is each distilled student close to a fixed blend of its inputs and teachers?

The student s is trained (kdp/stages/purifier.py, `student_step`) on
    beta * MSE(s(x'), x) + gamma * mean_j [KL_g(T_j || s) + MSE(s(x'), T_j)],
where the AT teacher is fed the AE x' and the NT teacher the *clean* image x
(purifier.py:85, `teachers[k](x_adv if k == "at" else x)`). A minimizer of such a sum of
squared errors is pulled towards a weighted mean of its targets, so one may ask whether
    s(x') ~ a * x + b * T_AT(x') + c * T_NT(x)
holds with fixed (a, b, c) over all test AEs. This module fits (a, b, c) by least squares
over every pixel of every test AE (no intercept, float64 normal equations, solved with
torch.linalg.lstsq so that collinear regressors do not crash it) and reports R^2 =
1 - SS_res / SS_tot, SS_tot taken about the mean of s(x'), and the residual RMSE.

The test AEs are crafted on the classifier alone, exactly as the evaluation stage does
(kdp/stages/evaluate.py, Context.adversarial: same attack, seed and batch size), so they are
the AEs behind the run's `classifier` rows. The NT teacher is fed the clean test image, as
in training. Results go to <run>/blend.json; `find_blends` collects them for `kdp report`.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from kdp.attacks import attack_batches, build_attack
from kdp.checkpoint import is_complete, load_frozen, read_meta
from kdp.files import read_json, write_json
from kdp.data import Cifar, load_cifar, to_float
from kdp.pipeline import run_input
from kdp.accel import resolve_device
from kdp.errors import ConfigError, DataError, NotFoundError
from kdp.storage import local_only

BLEND_FILE = "blend.json"
_STAT_KEYS = ("gram", "xty", "sum_y", "sum_yy", "count", "n")


# ---------------------------------------------------------------- the fit

def blend_stats(student_out, x, t_at, t_nt) -> dict:
    """Float64 sufficient statistics of the no-intercept fit on one batch (they add up)."""
    X = torch.stack([t.detach().double().flatten() for t in (x, t_at, t_nt)], 1)  # (pixels, 3)
    y = student_out.detach().double().flatten()
    return {"gram": X.T @ X, "xty": X.T @ y, "sum_y": float(y.sum()), "sum_yy": float(y @ y),
            "count": y.numel(), "n": len(student_out)}


def add_stats(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: a[k] + b[k] for k in _STAT_KEYS}


def solve_blend(stats: dict) -> dict:
    """(a, b, c), R^2 and RMSE from accumulated statistics; rank deficiency gives the
    minimum-norm solution (gelsd), and R^2 is NaN when s(x') is constant."""
    gram, xty = stats["gram"].cpu(), stats["xty"].cpu()
    w = torch.linalg.lstsq(gram, xty[:, None], driver="gelsd").solution[:, 0]
    ss_res = max(stats["sum_yy"] - 2 * float(w @ xty) + float(w @ gram @ w), 0.0)
    ss_tot = stats["sum_yy"] - stats["sum_y"] ** 2 / max(stats["count"], 1)
    r2 = 1 - ss_res / ss_tot if ss_tot > 1e-12 * max(stats["sum_yy"], 1e-300) else math.nan
    a, b, c = (float(v) for v in w)
    norm = math.sqrt(float(gram[0, 0]) * float(gram[2, 2]))
    return {"a": a, "b": b, "c": c, "r2": r2, "rmse": math.sqrt(ss_res / max(stats["count"], 1)),
            "n": int(stats["n"]), "cos_x_nt": float(gram[0, 2]) / norm if norm > 0 else math.nan}


def fit_blend(student_out, x, t_at, t_nt) -> dict:
    """Least-squares s ~ a*x + b*t_at + c*t_nt over all pixels of (N,3,32,32) tensors:
    {"a", "b", "c", "r2", "rmse", "n"} (n: images)."""
    shapes = {tuple(t.shape) for t in (student_out, x, t_at, t_nt)}
    if len(shapes) != 1:
        raise ValueError(f"fit_blend needs four tensors of one shape, got {sorted(shapes)}")
    return solve_blend(blend_stats(student_out, x, t_at, t_nt))


# ---------------------------------------------------------------- one run

def _complete(d: Path) -> bool:
    return d.is_dir() and is_complete(d)


def student_dirs(run_dir: Path) -> list[Path]:
    """The finished student_<variant> checkpoints of a run (temporary dirs start with '.')."""
    return sorted(d for d in Path(run_dir).glob("student_*") if _complete(d))


def is_run(d: Path) -> bool:
    """A pipeline run with what the blend test needs: config, classifier, both teachers, a student."""
    d = Path(d)
    return ((d / "config.json").is_file() and all(_complete(run_input(d, s)) for s in ("classifier", "teacher_at",
                                                                                          "teacher_nt"))
            and bool(student_dirs(d)))


def _student_fields(sdir: Path, run_cfg: dict) -> dict:
    """teachers, beta, gamma, kd_space of a student: its checkpoint's flattened config, else
    the run config's students entry with the same variant."""
    variant = sdir.name.removeprefix("student_")
    cfg = read_meta(sdir).get("config") or {}
    if "teachers" not in cfg:
        cfg = next((s for s in run_cfg.get("students", [])
                    if "kd_" + "_".join(t for t in ("at", "nt") if t in s.get("teachers", ())) == variant), {})
    teachers = cfg.get("teachers", "")
    teachers = teachers.split("+") if isinstance(teachers, str) else list(teachers)
    return {"variant": variant, "teachers": [t for t in teachers if t],
            "beta": cfg.get("beta"), "gamma": cfg.get("gamma"), "kd_space": cfg.get("kd_space")}


def _run_data(run_cfg: dict, data: Cifar | None, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float test images and labels: `data`, or the run's own test set; n images if given."""
    if data is None:
        d = run_cfg["data"]
        data = load_cifar(d["data_dir"], n_train=0, n_test=n if n is not None else d.get("n_test"))
    return to_float(data.test_x[:n]), data.test_y[:n]


def _load(d: Path, device) -> torch.nn.Module:
    return load_frozen(d, device)


@torch.no_grad()
def _purify(model, x):
    return model(x).float()


def analyze_run(run_dir, data: Cifar | None = None, attack: str = "pgd8", n: int | None = None,
                device: str = "cpu", batch_size: int | None = None) -> list[dict]:
    """One blend record per student of a run, on `attack` AEs of its test images.

    The AEs are crafted on the classifier with the run's eval seed; batch_size (default: the
    run's eval.batch_size, which the per-batch seeding needs to reproduce the eval's AEs)."""
    run_dir = Path(run_dir)
    if not is_run(run_dir):
        raise DataError(f"{run_dir}: not a run with config.json, classifier, teacher_at, teacher_nt and a student_*")
    cfg = read_json(run_dir / "config.json", "config.json")
    dev = resolve_device(device)
    x, y = _run_data(cfg, data, n)
    ev = cfg.get("eval", {})
    classifier, t_at, t_nt = (_load(run_input(run_dir, s), dev) for s in ("classifier", "teacher_at", "teacher_nt"))
    students = {s: _load(s, dev) for s in student_dirs(run_dir)}
    bs = batch_size or ev.get("batch_size", 256)
    stats: dict[Path, dict | None] = dict.fromkeys(students)
    i = 0
    for xa in attack_batches(build_attack(attack, classifier), x, y, bs, ev.get("seed", 0), 0, dev):
        xb = x[i:i + len(xa)].to(dev)
        at_out, nt_out = _purify(t_at, xa), _purify(t_nt, xb)  # AT sees x', NT sees x (as in training)
        for s, model in students.items():
            stats[s] = add_stats(stats[s], blend_stats(_purify(model, xa), xb, at_out, nt_out))
        i += len(xa)
    if i == 0:
        raise DataError(f"{run_dir}: no test images to analyse")
    return [{"run": run_dir.name, "run_dir": str(run_dir), "attack": attack, **_student_fields(s, cfg),
             **solve_blend(stats[s])} for s in students]


# ---------------------------------------------------------------- many runs, files

def find_runs(path) -> list[Path]:
    """`path` itself if it is a run, else every run below it (hidden directories skipped)."""
    path = Path(path)
    if not path.is_dir():
        raise NotFoundError(f"{path}: not a directory")
    if is_run(path):
        return [path]
    runs = [c.parent for c in sorted(path.rglob("config.json"))
            if not any(p.startswith(".") for p in c.relative_to(path).parts) and is_run(c.parent)]
    if not runs:
        raise DataError(f"{path}: no run with config.json, classifier, teacher_at, teacher_nt and a student_*")
    return runs


def analyze(path, data: Cifar | None = None, attack: str = "pgd8", n: int | None = None,
            device: str = "cpu", batch_size: int | None = None) -> list[dict]:
    """The blend test on every run at or under `path`; writes <run>/blend.json for each."""
    from kdp.config import Runtime
    from kdp.provenance import provenance

    records = []
    for run in find_runs(path):
        recs = analyze_run(run, data, attack, n, device, batch_size)
        write_json(run / BLEND_FILE, {"records": recs, "attack": attack, "n": recs[0]["n"],
                                      "provenance": provenance(Runtime(device=device))})
        records += recs
    return records


def blend_files(path) -> list[Path]:
    """The blend.json files at or under `path` (a results parquet: its directory)."""
    path = Path(path)
    if path.is_file() or path.suffix == ".parquet":
        path = path.parent
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob(BLEND_FILE)
                  if not any(s.startswith(".") for s in p.relative_to(path).parts))


def find_blends(path) -> list[dict]:
    """Every record of the blend.json files at or under `path` ([] when there are none)."""
    return [r for f in blend_files(path) for r in read_json(f, BLEND_FILE).get("records", [])]


# ---------------------------------------------------------------- markdown

def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def blend_markdown(records: list[dict]) -> str:
    """A table of the fits, its caption, and the reading rule, restated with this table's counts."""
    if not records:
        return "No blend records (run `kdp analyze` on a pipeline run)."
    multi = len({r.get("run_dir", r.get("run")) for r in records}) > 1
    header = (["run"] if multi else []) + ["variant", "teachers", "a", "b", "c", "a + c", "R²", "RMSE",
                                           "cos(x, T_NT(x))", "n"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in records:
        cells = ([str(r.get("run", ""))] if multi else []) + [
            str(r["variant"]), "+".join(r.get("teachers") or []) or "?",
            *(_num(r[k]) for k in ("a", "b", "c")), _num(r["a"] + r["c"]), *(_num(r[k]) for k in ("r2", "rmse")),
            _num(r.get("cos_x_nt")), str(r["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    attacks = ", ".join(sorted({str(r.get("attack")) for r in records}))
    dominated = sum(1 for r in records if math.isfinite(r["b"] + r["c"]) and r["b"] + r["c"] > abs(r["a"]))
    caption = (f"Least-squares fit, over every pixel of the n test AEs x' ({attacks}, crafted on the "
               "classifier alone), of s(x') ≈ a·x + b·T_AT(x') + c·T_NT(x) with no intercept; the NT "
               "teacher is fed the clean x and the AT teacher the AE, as in the student's training step. "
               "R² = 1 − SS_res/SS_tot with SS_tot about the mean of s(x'); RMSE is the residual's root "
               "mean square in [0, 1] pixel units. The NT teacher reconstructs x, so x and T_NT(x) are nearly "
               "collinear (their cosine is listed): a and c are then not separately identified, and a + c is the "
               "weight on the clean image. Reading: if b + c dominates a and the students' ordering "
               f"follows b, the students are near a fixed blend of the teachers. Here b + c > |a| for "
               f"{dominated} of {len(records)} students.")
    return "\n".join(lines) + "\n\n" + caption


# ---------------------------------------------------------------- CLI hooks

def add_analyze_args(p: argparse.ArgumentParser) -> None:
    """Arguments of `kdp analyze`."""
    p.add_argument("path", help="a pipeline run directory or a directory of runs")
    p.add_argument("--attack", default="pgd8", help="attack crafted on the classifier (default: pgd8)")
    p.add_argument("--n", type=int, default=None, help="test images (default: the run's data.n_test)")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")


def analyze_command(args: argparse.Namespace) -> None:
    """`kdp analyze`: the blend test on each run; prints the table and the blend.json paths."""
    from kdp.attacks import ATTACKS
    from kdp.models import lookup

    lookup(ATTACKS, args.attack, "attack")  # fail before any work on a bad --attack
    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be >= 1, got {args.n}")
    records = analyze(local_only(args.path, "kdp analyze"), attack=args.attack, n=args.n, device=args.device)
    print(blend_markdown(records))
    for run_dir in dict.fromkeys(r["run_dir"] for r in records):
        print(f"blend: {Path(run_dir) / BLEND_FILE}")
