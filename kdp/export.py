"""`kdp export`: one defense of a finished run handed to RobustBench, as one model file and a card.

`export(run_dir, variant, out_dir)` loads the variant's purifier and classifier as the evaluation
does (`kdp.stages.evaluate.load_defenses`), refuses what RobustBench's rules exclude (`RULE`: a
non-differentiable purifier, attacked by BPDA, or a randomized one), and writes
- `<out>/<name>.pt`: purifier∘classifier as one TorchScript model, loaded with torch alone
  (`torch.jit.load`): images in [0, 1] of shape (N, 3, 32, 32) -> logits, any N, input gradients
  through it; checked against the defense in memory before it is published;
- `<out>/<name>.json`: a card in RobustBench's `model_info` format (`CARD_KEYS`), its numbers
  kdp's own rows of `<run>/results.parquet`: clean accuracy, and `aa-standard` under the `full`
  threat model (white box through the whole defense, RobustBench's setting).

TorchScript, not torch.export: a loaded ExportedProgram's module refuses `.eval()` (torchattacks
calls it) and says `training=True` (RobustBench's `benchmark` warns); a traced module does
neither, and its batch norms stay in eval mode. Both files are written under temporary names and
renamed together, after the checks.
"""
from __future__ import annotations

import json
import math
import re
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from kdp.attacks import EPS, ATTACKS
from kdp.checkpoint import is_complete, load_frozen, read_meta
from kdp.files import atomic_path, read_json
from kdp.config import check_name, ThreatModel
from kdp.configio import from_dict
from kdp.errors import ConfigError, DataError, NotFoundError
from kdp.models import CifarResNet, Purified

RULE = ('RobustBench accepts only defenses that "(1) have in general non-zero gradients wrt the inputs, '
        '(2) have a fully deterministic forward pass (i.e. no randomness) that (3) does not have an '
        'optimization loop" (its README)')
CARD_KEYS = ("name", "architecture", "eps", "clean_acc", "autoattack_acc", "additional_data",
             "number_forward_passes", "dataset", "venue", "reported", "footnote")
ATTACK, THREAT = "aa-standard", ThreatModel.FULL  # RobustBench's autoattack_acc: AutoAttack, white box on the defense
CHECK_ATOL = 1e-5  # the exported model's logits against the defense's in memory
CHECK_BATCHES = (4, 3)  # traced at the first size, checked at both: any batch size works


@dataclass(frozen=True)
class Source:
    """A variant of a run: the run's config and where the variant's checkpoints are."""
    run_dir: Path
    variant: str
    cfg: object
    """The run's PipelineConfig."""
    purifier_dir: Path | None
    """Its purifier's checkpoint (None: `none`, the classifier alone)."""
    classifier_dir: Path


def export(run_dir: str | Path, variant: str, out_dir: str | Path, name: str | None = None) -> Path:
    """Write `<out_dir>/<name>.pt` (the defense, TorchScript) and `<name>.json` (its RobustBench
    card); returns the model's path. `name` defaults to kdp_<run>_<variant>. Bad input (no such run
    or variant, a defense RobustBench excludes, no full-threat aa-standard row) is a one-line kdp error
    before anything is written."""
    from kdp.storage import local_only

    run_dir, out = local_only(run_dir, "kdp export"), local_only(out_dir, "kdp export --out")
    if name is not None:
        check_name(name, "export")  # one file name in out_dir
    src = find(run_dir, variant)
    defense = load_defense(src)
    refuse_excluded(defense, variant)
    name = name or re.sub(r"[^A-Za-z0-9_.-]", "_", f"kdp_{src.cfg.name}_{variant}")
    card = model_card(src, defense)
    with ExitStack() as stack:  # both renamed into place only when both are written and checked
        tmp_model = stack.enter_context(atomic_path(out / f"{name}.pt"))
        tmp_card = stack.enter_context(atomic_path(out / f"{name}.json"))
        save_traced(defense, tmp_model)
        check_exported(tmp_model, defense)
        tmp_card.write_text(json.dumps(card, indent=2) + "\n")
    return out / f"{name}.pt"


def find(run_dir: str | Path, variant: str) -> Source:
    """The run's config and the checkpoints of `variant`, by the stage graph's own mapping
    (kdp.graph.pipeline_graph: Stage.variant -> Stage.name; 'none' is the classifier alone)."""
    from kdp.graph import pipeline_graph
    from kdp.pipeline import run_input
    from kdp.pipeline_config import PipelineConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise NotFoundError(f"{run_dir}: not a kdp run (no config.json)")
    cfg = from_dict(PipelineConfig, read_json(run_dir / "config.json", "config.json"))
    graph = pipeline_graph(cfg)
    made_by = {s.variant: s.name for s in graph if s.variant}
    stages = {v: made_by.get(v) for s in graph for v in s.evaluates}  # the evaluation's order, 'none' first
    if variant not in stages:
        raise ConfigError(f"unknown variant {variant!r} of run {cfg.name!r}; valid: {', '.join(stages)}")
    purifier = None if stages[variant] is None else run_input(run_dir, stages[variant])
    classifier = run_input(run_dir, "classifier")
    for stage, path in (("classifier", classifier), (stages[variant], purifier)):
        if path is not None and not is_complete(path):
            done = [v for v, s in stages.items() if all(is_complete(run_input(run_dir, k))
                                                        for k in ("classifier", s) if k is not None)]
            raise NotFoundError(f"{path}: no finished checkpoint of stage {stage} (variant {variant!r}); "
                                f"variants of this run with checkpoints: {', '.join(done) or 'none'}")
    return Source(run_dir, variant, cfg, purifier, classifier)


def load_defense(src: Source) -> Purified:
    """The variant's defense on the CPU, built exactly as the evaluation builds it."""
    from kdp.stages.evaluate import load_defenses

    classifier = load_frozen(src.classifier_dir, "cpu")
    return load_defenses({src.variant: src.purifier_dir}, classifier, "cpu")[src.variant]


def refuse_excluded(defense: Purified, variant: str) -> None:
    """A one-line ConfigError for a defense RobustBench excludes, read from the attributes the
    evaluation reads (`backward == 'bpda'`: attacked by BPDA; `randomized`: attacked with EOT)."""
    p = defense.purifier
    if getattr(p, "backward", "exact") == "bpda":
        raise ConfigError(f"variant {variant!r} cannot be exported: {RULE}; its purifier "
                          f"({type(p).__name__}) is not differentiable (kdp attacks it by BPDA), against rule (1)")
    if getattr(p, "randomized", False):
        raise ConfigError(f"variant {variant!r} cannot be exported: {RULE}; its purifier "
                          f"({type(p).__name__}) is randomized (kdp attacks it with EOT), against rule (2)")


# ---- the model file ----------------------------------------------------------------------------

def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(n))


def save_traced(defense: Purified, path: Path) -> None:
    """purifier∘classifier traced (eval mode, frozen) and saved as TorchScript at `path`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.x deprecates torch.jit; it still loads
        traced = torch.jit.trace(defense.eval(), _images(CHECK_BATCHES[0]), check_trace=False)
        torch.jit.save(traced, str(path))


def check_exported(path: Path, defense: Purified) -> None:
    """The saved model, loaded back, gives the defense's logits (atol CHECK_ATOL) and input gradients
    at every batch size of CHECK_BATCHES; else a RuntimeError and nothing is published."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    for n in CHECK_BATCHES:
        got, grad = _logits_and_grad(loaded, _images(n))
        want, want_grad = _logits_and_grad(defense, _images(n))
        diff = float((got - want).abs().max())
        if diff > CHECK_ATOL or not torch.allclose(grad, want_grad, atol=CHECK_ATOL, rtol=1e-4):
            raise RuntimeError(f"the exported model differs from the defense on {n} images "
                               f"(max logit difference {diff:.3g}); nothing written")


def _logits_and_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x)
        (g,) = torch.autograd.grad(logits.logsumexp(1).sum() - logits[:, 0].sum(), x)
    return logits.detach(), g


# ---- the card ----------------------------------------------------------------------------------

def model_card(src: Source, defense: Purified) -> dict:
    """RobustBench's model_info fields (CARD_KEYS) from kdp's rows of the run's results."""
    clean, aa = kdp_rows(src)
    pct = lambda r: f"{100 * r['correct'] / r['n']:.2f}"  # noqa: E731 (RobustBench: '85.34')
    card = {"name": f"kdp {src.variant} (run {src.cfg.name})", "architecture": architecture(src, defense),
            "eps": _eps(), "clean_acc": pct(clean), "autoattack_acc": pct(aa), "additional_data": False,
            "number_forward_passes": 1, "dataset": "cifar10", "venue": _venue(_value(aa, "utc")),
            "reported": pct(aa), "footnote": footnote(src, clean, aa)}
    return {k: card[k] for k in CARD_KEYS}


def footnote(src: Source, clean: dict, aa: dict) -> str:
    """Whose numbers they are, on how many images, from which run, preset and code."""
    source = "/".join(Path(_value(clean, "data.source") or "").parts[-2:]) or "unknown source"
    git = f", kdp git {_value(aa, 'git_sha')[:12]}" if _value(aa, "git_sha") else ""
    text = (f"kdp's own evaluation, not RobustBench's: clean accuracy on {clean['n']} CIFAR-10 test images "
            f"({source}), AutoAttack (kdp's aa-standard: APGD-CE, APGD-T, FAB-T, Square at the original "
            f"strengths, torchattacks' implementation) white-box through purifier and classifier on the first "
            f"{aa['n']} of them (eval.aa_subset), seed {src.cfg.eval.seed}; kdp run {src.cfg.name!r}, "
            f"preset {src.cfg.preset!r}, variant {src.variant!r}{git}.")
    if _value(aa, "attack.same_as"):  # a defense that is its own classifier: one attack, both threat models
        text += f" Its full-threat AutoAttack is the {_value(aa, 'attack.same_as')} threat model's (the same model)."
    if _value(aa, "checks_ok") is not None and not _value(aa, "checks_ok"):
        text += f" kdp's sanity checks failed on the AutoAttack row: {_value(aa, 'check_failures')}."
    return text


def kdp_rows(src: Source) -> tuple[dict, dict]:
    """The variant's clean row (classifier threat model) and its full-threat aa-standard row."""
    from kdp.results import load

    path = src.run_dir / "results.parquet"
    if not path.is_file():
        raise NotFoundError(f"{path}: no results; finish the run first (kdp run with its --name)")
    df = load(path)
    df = df[df["variant"] == src.variant]
    if df.empty:
        raise DataError(f"{path}: variant {src.variant!r} was not evaluated in this run (no rows)")
    pick = lambda a, t: df[(df["attack"] == a) & (df["threat_model"] == t)].to_dict("records")  # noqa: E731
    clean, aa = pick("clean", ThreatModel.CLASSIFIER), pick(ATTACK, THREAT)
    if not clean:
        raise DataError(f"{path}: no clean row for variant {src.variant!r}; evaluate it with the classifier "
                        "threat model (--set eval.threat_models=...+classifier)")
    if not aa:
        ev = src.cfg.eval
        sets = [f"eval.adaptive_attacks={'+'.join(dict.fromkeys((*ev.adaptive_attacks, ATTACK)))}"]
        if THREAT not in ev.threat_models:
            sets.append(f"eval.threat_models={'+'.join((*ev.threat_models, THREAT))}")
        raise DataError(f"{path}: no {ATTACK} row under the {THREAT} threat model for variant {src.variant!r} "
                        f"(RobustBench's autoattack_acc); evaluate it with {' '.join('--set ' + s for s in sets)}")
    return clean[0], aa[0]


def architecture(src: Source, defense: Purified) -> str:
    """E.g. 'CAE(depth=4, width=16, head=literal) + ResNet-8': the purifier's checkpoint spec (left
    out when it has no weights of its own: `none`, an identity before its own classifier), then the
    classifier the defense uses."""
    from kdp.baselines import BASELINES

    parts = []
    own = getattr(defense.purifier, "own_classifier", None)
    own_ids = {id(p) for p in own.parameters()} if own is not None else set()
    if src.purifier_dir is not None and any(id(p) not in own_ids for p in defense.purifier.parameters()):
        spec = read_meta(src.purifier_dir)["spec"]
        label = {"cae": "CAE"}.get(spec["name"]) or getattr(BASELINES.get(spec["name"]), "label", spec["name"])
        kwargs = ", ".join(f"{k}={v}" for k, v in sorted(spec.get("kwargs", {}).items()))
        parts.append(f"{label}({kwargs})")
    parts.append(_classifier_label(defense.classifier))
    return " + ".join(parts)


def _classifier_label(model: nn.Module) -> str:
    if isinstance(model, CifarResNet):
        width = model.stem[0].out_channels
        return f"ResNet-{2 * len(model.blocks) + 2}" + ("" if width == 16 else f" (width {width})")
    return type(model).__name__


def _eps() -> str:
    eps = ATTACKS[ATTACK].linf_eps or EPS
    k = eps * 255
    return f"{round(k)}/255" if abs(k - round(k)) < 1e-9 else f"{eps:.4g}"


def _value(row: dict, key: str):
    """row[key], None where the results hold none (a missing column, a null, a NaN)."""
    v = row.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def _venue(utc: str | None) -> str:
    """'kdp, Oct 2026' from the row's UTC time (RobustBench: 'arXiv, Jun 2020'); 'kdp' without one."""
    import pandas as pd

    try:
        when = pd.Timestamp(utc) if utc else None
    except (TypeError, ValueError):
        when = None
    return "kdp" if when is None or pd.isna(when) else f"kdp, {when:%b %Y}"
