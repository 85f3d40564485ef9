"""`kdp export --check`: an exported defense scored by RobustBench's own code, image by image
against kdp's rows.

This file is both sides. Run as a script, `python -I kdp/robustbench_check.py ARGS_JSON`, it is
RobustBench's side and imports torch, robustbench and AutoAttack only, nothing of kdp (isolated
mode: neither the cwd nor PYTHONPATH is on its path; it reports the kdp modules it sees): the
TorchScript model loaded with `torch.jit.load`, scored with `robustbench.utils.clean_accuracy` and
the original AutoAttack (`version="standard"`, Linf, kdp's eps and seed), per-image hits written
as JSON. Imported, `check(run_dir, variant, model, card)` is kdp's side: the test images kdp's
full-threat aa-standard row ran on, that script in a subprocess, and both sides' counts and hits.

robustbench 1.1.1 from PyPI imports `autoattack` (the GitHub package's name) but depends on
`pyautoattack` (AutoAttack's PyPI release, the same attack code): the script aliases one to the
other before importing robustbench. Both come with the `robustbench` extra (EXTRA).
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from importlib.util import find_spec
from pathlib import Path

EXTRA = "pip install -e '.[robustbench]'"
PACKAGES = ("robustbench", "pyautoattack")
MISSING = 3  # the script's exit status when one of PACKAGES does not import
SIDES = (("clean", "clean"), ("autoattack", "AutoAttack"))  # the result's keys, the table's labels


# ---- RobustBench's side: run as a script, it imports nothing of kdp ------------------------------

def import_robustbench():
    """AutoAttack, robustbench's clean_accuracy and ModelInfo (pyautoattack aliased as autoattack)."""
    import pyautoattack
    import pyautoattack.state

    sys.modules.setdefault("autoattack", pyautoattack)  # robustbench 1.1.1 imports the GitHub package's name
    sys.modules.setdefault("autoattack.state", pyautoattack.state)
    from robustbench.utils import ModelInfo, clean_accuracy

    return pyautoattack.AutoAttack, clean_accuracy, ModelInfo


def main(argv: list[str]) -> int:
    """Score args['data'] ({'x', 'y'}) with args['model']; write the result to args['out']."""
    args = json.loads(argv[0])
    try:
        auto_attack, clean_accuracy, model_info = import_robustbench()
    except ImportError as e:
        Path(args["out"]).write_text(json.dumps({"missing": e.name or str(e)}))
        return MISSING
    import torch
    from importlib.metadata import version

    torch.set_num_threads(args["threads"])
    flags = []  # AutoAttack's own checks (randomized, dynamic, zero gradients, ...) log warnings
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: flags.append(record.getMessage())
    logging.getLogger("auto-attack").addHandler(handler)
    model = torch.jit.load(args["model"], map_location="cpu")
    data = torch.load(args["data"], weights_only=True)
    x, y, bs = data["x"], data["y"], args["batch_size"]
    adversary = auto_attack(model, norm="Linf", eps=args["eps"], version="standard", seed=args["seed"], device="cpu")
    x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=bs)
    card = json.loads(Path(args["card"]).read_text())
    out = {name: {"correct": round(clean_accuracy(model, images, y, batch_size=bs) * len(y)), "n": len(y),
                  "hits": _hits(model, images, y, bs)} for name, images in (("clean", x), ("autoattack", x_adv))}
    out.update(flags=flags, linf=float((x_adv - x).abs().max()), card_unknown_keys=sorted(
        set(card) - set(model_info.__dataclass_fields__)), versions={p: version(p) for p in PACKAGES},
        kdp_modules=sorted(m for m in sys.modules if m == "kdp" or m.startswith("kdp.")))
    Path(args["out"]).write_text(json.dumps(out))
    return 0


def _hits(model, x, y, batch_size: int) -> str:
    """'1' where the model classifies the image correctly, else '0', in order."""
    import torch

    with torch.no_grad():
        pred = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return "".join("1" if h else "0" for h in (pred == y).tolist())


# ---- kdp's side ------------------------------------------------------------------------------

def require() -> None:
    """A one-line ConfigError naming the extra when robustbench or pyautoattack is not installed."""
    for name in PACKAGES:
        if find_spec(name) is None:
            missing(name)


def missing(name: str):
    from kdp.errors import ConfigError

    raise ConfigError(f"--check runs RobustBench's own code, and {name} is not installed; "
                      f"install the robustbench extra: {EXTRA}")


def check(run_dir: str | Path, variant: str, model_path: str | Path, card_path: str | Path,
          threads: int | None = None) -> dict:
    """Score the exported model (`model_path`, `card_path` from kdp.export.export) with RobustBench's
    code on the test images kdp's full-threat aa-standard row of `variant` ran on, with the run's eval
    seed and batch size, on the CPU with `threads` threads (default: this process's); returns both
    sides' counts and hits, 'same' (True where every image agrees, clean and under AutoAttack),
    AutoAttack's warnings ('flags') and the model and card's checks."""
    import torch

    from kdp.export import find, kdp_rows

    require()
    src = find(run_dir, variant)
    clean, aa = kdp_rows(src)
    first, n = _first(aa), int(aa["n"])
    x, y = aa_images(src.cfg.data, first, n)
    with tempfile.TemporaryDirectory(prefix="kdp-robustbench-") as tmp:
        torch.save({"x": x, "y": y}, Path(tmp) / "images.pt")
        args = {"model": str(model_path), "card": str(card_path), "data": str(Path(tmp) / "images.pt"),
                "out": str(Path(tmp) / "out.json"), "seed": src.cfg.eval.seed, "eps": _eps(),
                "batch_size": src.cfg.eval.batch_size, "threads": threads or torch.get_num_threads()}
        rb = run_script(args)
    ours = {"clean": _counts(_slice(clean, first, n)), "autoattack": _counts(_slice(aa, first, n))}
    same = all(ours[k]["hits"] == rb[k]["hits"] for k, _ in SIDES)
    return {"run": str(run_dir), "variant": variant, "model": str(model_path), "card": str(card_path),
            "images": {"data_dir": src.cfg.data.data_dir, "first": first, "n": n}, "same": same,
            "kdp": ours, "robustbench": {k: rb.pop(k) for k, _ in SIDES}, **rb,
            "settings": {k: args[k] for k in ("eps", "seed", "batch_size", "threads")},
            "card_values": _card_values(card_path)}


def aa_images(data_cfg, first: int, n: int):
    """Test images first..first+n-1 of the run's data, as floats in [0, 1], and their labels."""
    from kdp.data import load_cifar, to_float
    from kdp.errors import DataError

    data = load_cifar(data_cfg.data_dir, 0, data_cfg.n_test)
    if first + n > len(data.test_y):
        raise DataError(f"{data_cfg.data_dir}: {len(data.test_y)} test images, but kdp's row scored "
                        f"images {first}..{first + n - 1}")
    return to_float(data.test_x[first:first + n]), data.test_y[first:first + n]


def run_script(args: dict) -> dict:
    """This file as a script in a fresh interpreter (isolated: no kdp on its path); its JSON result."""
    out = subprocess.run([sys.executable, "-I", "-W", "ignore", str(Path(__file__).resolve()), json.dumps(args)],
                         capture_output=True, text=True)
    result = json.loads(Path(args["out"]).read_text()) if Path(args["out"]).is_file() else None
    if out.returncode == MISSING and result:
        missing(result["missing"])
    if out.returncode != 0 or result is None:
        raise RuntimeError(f"RobustBench's side failed (exit {out.returncode}): {out.stderr[-3000:]}")
    return result


def _first(row: dict) -> int:
    try:
        return int(row.get("first"))
    except (TypeError, ValueError):  # None, NaN, NA: rows from test image 0
        return 0


def _slice(row: dict, first: int, n: int) -> str:
    """A row's hits on test images first..first+n-1."""
    from kdp.errors import DataError

    start, hits = first - _first(row), row.get("hits") or ""
    if start < 0 or start + n > len(hits):
        raise DataError(f"kdp's {row['attack']} row of {row['variant']!r} has no per-image hits on test images "
                        f"{first}..{first + n - 1} (its hits: {len(hits)} from image {_first(row)})")
    return hits[start:start + n]


def _counts(hits: str) -> dict:
    return {"correct": hits.count("1"), "n": len(hits), "hits": hits}


def _eps() -> float:
    from kdp.attacks import ATTACKS, EPS
    from kdp.export import ATTACK

    return ATTACKS[ATTACK].linf_eps or EPS


def _card_values(card_path: str | Path) -> dict:
    card = json.loads(Path(card_path).read_text())
    return {k: card.get(k) for k in ("clean_acc", "autoattack_acc")}


def table(result: dict) -> str:
    """kdp's and RobustBench's correct/n, clean and under AutoAttack, and whether the same images agree."""
    lines = [f"{'':12}{'kdp':>12}{'RobustBench':>14}  same images"]
    for key, label in SIDES:
        ours, theirs = result["kdp"][key], result["robustbench"][key]
        same = "yes" if ours["hits"] == theirs["hits"] else "no"
        ours, theirs = (f"{side['correct']}/{side['n']}" for side in (ours, theirs))
        lines.append(f"{label:12}{ours:>12}{theirs:>14}  {same}")
    lines.append(f"AutoAttack's warnings: {'; '.join(result['flags']) or 'none'}")
    return "\n".join(lines)


def save(result: dict, path: str | Path) -> Path:
    """The result as JSON at `path`, written atomically."""
    from kdp.files import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    return Path(path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
