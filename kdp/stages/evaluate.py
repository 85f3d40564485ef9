"""Stage 3: every defense under three threat models, with sanity checks recorded in each row.

Threat models (EvalConfig.threat_models):
- `classifier` (the paper's protocol): an attack is crafted on the classifier alone, once
  per classifier (SOAP brings its own), and every defense purifies the same AEs.
- `full` (full white-box): the attack runs end to end through purifier∘classifier. The CAEs
  and NRP are differentiable and attacked exactly; JPEG and SOAP pass gradients by BPDA
  (identity, Athalye et al. 2018); randomized defenses are attacked with EOT (mean logits
  over eot_samples passes). Rows record which (`attack.grad`, `attack.eot`).
- `transfer`: AEs crafted on a separately trained surrogate classifier, then purified and
  classified by each defense.

Sanity checks, in the spirit of AutoAttack's (Croce & Hein 2020) flags:
- `check.eval_mode`: the purifier, classifier (and source model) were in eval mode;
- `check.grad_nonzero` (full): the loss's input gradient through purifier∘classifier is nonzero;
- `check.attack_ok`: the attack fooled at least min_attack_success of the images its
  undefended source model (classifier, SOAP's own, surrogate; not at_classifier's, trained to resist
  it) classified correctly;
- `check.linf_ok`: x_adv lies within the attack's L-inf budget and in [0, 1].
A failed check is a warning in the log, a name in `check_failures` and `checks_ok` False.

Rows carry counts (`correct`, `agree`, `check.src_*`) and the per-image outcome (`hits`, a
'0'/'1' string over test images first..first+n-1, for bootstrap intervals), so shards over
test-set slices combine (`kdp.stages.shards.merge_rows`); `finalize` then derives the checks from the sums.
Each row records what the attack ran (`attack.settings`, `attack.steps`, `attack.restarts`);
aa-standard runs on the first `aa_subset` images only. Classifier- and transfer-threat AEs
come from the evaluation AE cache when given one (kdp.stages.eval_cache; `attack.cached`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from kdp.accel import Accel
from kdp.attacks import EPS, attack_batches, build_attack, describe, linf_budget, settings
from kdp.checkpoint import load_checkpoint, load_frozen
from kdp.config import THREAT_MODELS, EvalConfig, Runtime, ThreatModel
from kdp.data import Cifar, to_float
from kdp.interrupt import stop_hook
from kdp.models import EOT, Purified, freeze
from kdp.stages.eval_cache import cache_key, entry_trace, fetched, load_entry, model_sha, saving
from kdp.trace import PROBE_KEYS, TRACE_KEYS, Watch, grad_probe, stability_probe, traced_model
from kdp.accel import resolve_device

LINF_TOL = 1e-6  # float slack on the L-inf budget


def as_defense(purifier: nn.Module, classifier: nn.Module) -> Purified:
    """What a variant classifies with: its purifier and the classifier behind it. A purifier with
    its own classifier (SOAP) uses it; every other one the shared classifier."""
    own = getattr(purifier, "own_classifier", None)
    return Purified(purifier, classifier if own is None else own)


def load_defenses(purifier_dirs: dict[str, Path | None], classifier: nn.Module, device) -> dict[str, Purified]:
    """variant name -> Purified with a frozen purifier (nn.Identity for a None path: no defense)."""
    return {name: as_defense(freeze(nn.Identity() if p is None else load_checkpoint(p, device)[0]), classifier)
            for name, p in purifier_dirs.items()}


_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


def in_eval_mode(*models: nn.Module) -> bool:
    """No batch-norm or dropout layer (the layers train mode changes) is in train mode."""
    return not any(m.training for model in models for m in model.modules() if isinstance(m, _MODE_DEPENDENT))


def input_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d CE(model(x), y) / dx (mean over the batch); zeros where no gradient reaches the input."""
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y)
        if not loss.requires_grad:
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(loss, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def attack_target(defense: Purified, cfg: EvalConfig) -> tuple[nn.Module, str, int]:
    """(model the full attack differentiates, gradient kind, EOT samples) of a defense."""
    model = defense
    eot = cfg.eot_samples if getattr(defense.purifier, "randomized", False) else 1
    grad = getattr(defense.purifier, "backward", "exact")
    return (EOT(model, eot) if eot > 1 else model), grad, eot


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1).cpu()


@dataclass
class Tally:
    """Counts of one (variant, attack, threat model) cell over the batches seen."""
    n: int = 0
    correct: int = 0
    agree: int = 0
    seconds: float = 0.0
    hits: list = field(default_factory=list)

    def add(self, pred, y, clean_pred):
        self.n += len(y)
        self.correct += int((pred == y).sum())
        self.agree += int((pred == clean_pred).sum())
        self.hits.append(pred == y)

    def bits(self) -> str:
        """Per-image correctness as a '0'/'1' string, in test-set order."""
        return "".join("1" if h else "0" for h in torch.cat(self.hits).tolist()) if self.hits else ""


@dataclass
class Crafted:
    """What is shared by every defense scoring one attack's AEs: source-model counts and x_adv's range."""
    attack_seconds: float = 0.0
    linf: float = 0.0
    in_range: bool = True
    src_correct: int | None = None
    src_fooled: int | None = None

    def see(self, xb, xs, src_clean=None, src_adv=None, y=None):
        self.linf = max(self.linf, float((xb.cpu() - xs).abs().max()) if len(xs) else 0.0)
        self.in_range &= bool(xb.min() >= 0) and bool(xb.max() <= 1) if len(xb) else True
        if src_clean is not None:
            ok = src_clean == y
            self.src_correct = (self.src_correct or 0) + int(ok.sum())
            self.src_fooled = (self.src_fooled or 0) + int((ok & (src_adv != y)).sum())


CLEAN_INFO = {"attack.settings": "none (clean images)", "attack.steps": 0, "attack.restarts": 0,
              "attack.cached": False}


def _row(variant, attack, threat, t: Tally, c: Crafted, eval_mode: bool, start: int, info: dict, **extra) -> dict:
    return {**dict.fromkeys(TRACE_KEYS + PROBE_KEYS), "variant": variant, "attack": attack, "threat_model": str(threat),
            "n": t.n, "correct": t.correct, "agree": t.agree, "accuracy": t.correct / max(t.n, 1),
            "agreement": t.agree / max(t.n, 1),
            "first": start, "hits": t.bits(), **info,
            "seconds": c.attack_seconds + t.seconds, "attack_seconds": c.attack_seconds, "linf_max": c.linf,
            "check.eval_mode": eval_mode, "check.in_range": c.in_range, "check.src_correct": c.src_correct,
            "check.src_fooled": c.src_fooled, "check.grad_norm": None, "attack.grad": None, "attack.eot": None,
            "attack.same_as": None,
            **extra}


class Context:
    """The images, labels and clean predictions one evaluation call works on."""

    def __init__(self, cfg: EvalConfig, x, y, device, start: int, cache: Path | None = None, store=None,
                 on_batch=None):
        self.cfg, self.x, self.y, self.device, self.start, self.cache = cfg, x, y, device, start, cache
        self.store = store  # the output root's (kdp.storage): a bucket's cache entries are fetched and published
        self.on_batch = on_batch  # (threat, attack, variants, images) after each scored batch: progress
        self._clean: dict[int, torch.Tensor] = {}
        self._modes: dict[int, bool] = {}

    def record_modes(self, *models: nn.Module) -> None:
        """Note whether each model is in eval mode now, before any attack: torchattacks puts
        the model it attacks in eval mode, which would hide a model left in train mode."""
        for m in models:
            self._modes.setdefault(id(m), in_eval_mode(m))

    def tick(self, threat: str, attack: str, variants: str, images: int) -> None:
        """One batch of `images` scored (progress lines; kdp.stages.drivers)."""
        if self.on_batch is not None:
            self.on_batch(threat, attack, variants, images)

    def was_eval(self, *models: nn.Module) -> bool:
        return all(self._modes.get(id(m), in_eval_mode(m)) for m in models)

    def batches(self):
        bs = self.cfg.batch_size
        return (self.x[i:i + bs].to(self.device) for i in range(0, len(self.x), bs))

    def count(self, name: str) -> int:
        """Images of this slice that attack `name` runs on (aa_subset counts from test image 0)."""
        return max(0, self.cfg.subset(name, self.start + len(self.x)) - self.start)

    def adversarial(self, name: str, model: nn.Module, cacheable: bool = False):
        """(batches of AEs of attack `name` on `model`, the attack's settings). With `cacheable`
        (the AEs depend on nothing but `model`) and a cache, they are read or written there."""
        cfg, k = self.cfg, self.count(name)
        traced = traced_model(name, model)  # reads the iterates; the key and the AEs stay the model's own
        attack = build_attack(name, model if traced is None else traced, seed=cfg.seed)
        info, x, y = {**describe(attack), "attack.cached": False}, self.x[:k], self.y[:k]
        watch = Watch(name, attack, traced, info)
        batches = attack_batches(attack, x, y, cfg.batch_size, cfg.seed, self.start, self.device, watch)
        if not cacheable or self.cache is None or k == 0:
            return batches, info
        key = cache_key(model, name, settings(attack), cfg.seed, cfg.batch_size, self.start, x, y)
        hit = load_entry(fetched(self.cache / key, self.store), k)
        if hit is None:
            meta = {"attack": name, **info, "seed": cfg.seed, "batch_size": cfg.batch_size, "start": self.start, "n": k,
                    "model_sha256": model_sha(model)}  # the model it was crafted on (kdp cache --unused)
            return saving(batches, self.cache / key, meta, info, self._batched, self.store), info
        return self._batched(hit), {**info, "attack.cached": True, **entry_trace(self.cache / key)}

    def _batched(self, x: torch.Tensor):
        bs = self.cfg.batch_size
        return (x[i:i + bs].to(self.device) for i in range(0, len(x), bs))

    def clean_pred(self, classifier: nn.Module) -> torch.Tensor:
        """The classifier's predictions on the clean images (agreement's reference)."""
        if id(classifier) not in self._clean:
            preds = [_predict(classifier, xb) for xb in self.batches()]
            self._clean[id(classifier)] = torch.cat(preds) if preds else self.y.clone()
        return self._clean[id(classifier)]


def score_crafted(ctx: Context, name: str, threat: str, source: nn.Module | None, group: dict[str, Purified]):
    """AEs of attack `name` crafted once on `source` (clean images for 'clean'), scored through
    every defense in `group`; the source model's own success is counted for the checks."""
    tallies = {v: Tally() for v in group}
    crafted = Crafted()
    batches, info = (ctx.batches(), CLEAN_INFO) if name == "clean" else ctx.adversarial(name, source, True)
    ctx.tick(threat, name, ",".join(group), 0)  # what runs now, before its first batch is done
    i, t0 = 0, time.perf_counter()
    # attack_ok asks an attack to fool its undefended source: not a source trained to resist it (at_classifier)
    checked = name != "clean" and not any(getattr(d.purifier, "same_threats", False) and d.classifier is source
                                          for d in group.values())
    for xb in batches:
        crafted.attack_seconds += time.perf_counter() - t0
        sl = slice(i, i + len(xb))
        src = (_predict(source, ctx.x[sl].to(ctx.device)), _predict(source, xb)) if checked else (None, None)
        crafted.see(xb, ctx.x[sl], *src, ctx.y[sl])
        for v, d in group.items():
            t1 = time.perf_counter()
            tallies[v].add(_predict(d, xb), ctx.y[sl], ctx.clean_pred(d.classifier)[sl])
            tallies[v].seconds += time.perf_counter() - t1
        i += len(xb)
        ctx.tick(threat, name, ",".join(group), len(xb))
        t0 = time.perf_counter()
    extra = (source,) if source is not None else ()
    return [_row(v, name, threat, tallies[v], crafted, ctx.was_eval(d.purifier, d.classifier, *extra), ctx.start,
                 info) for v, d in group.items()]


def score_full(ctx: Context, name: str, variant: str, d: Purified) -> dict:
    """One attack run end to end through the defense, scored on the same defense."""
    eval_mode = ctx.was_eval(d.purifier, d.classifier)
    model, grad, eot = attack_target(d, ctx.cfg)
    bs, m = ctx.cfg.batch_size, min(ctx.cfg.batch_size, ctx.cfg.indicator_subset)
    g = input_grads(model, ctx.x[:bs].to(ctx.device), ctx.y[:bs].to(ctx.device))
    probes = {**grad_probe(g), **stability_probe(d, ctx.x[:m].to(ctx.device), ctx.y[:m].to(ctx.device),
                                                 linf_budget(name) or EPS)}
    undefended = isinstance(d.purifier, nn.Identity)  # the attacked model is then its own undefended source
    t, c = Tally(), Crafted()
    batches, info = ctx.adversarial(name, model)
    ctx.tick(ThreatModel.FULL, name, variant, 0)
    i, t0 = 0, time.perf_counter()
    for xb in batches:
        sl = slice(i, i + len(xb))
        pred = _predict(d, xb)
        clean = ctx.clean_pred(d.classifier)[sl]
        c.see(xb, ctx.x[sl], *((clean, pred) if undefended else (None, None)), ctx.y[sl])
        t.add(pred, ctx.y[sl], clean)
        i += len(xb)
        ctx.tick(ThreatModel.FULL, name, variant, len(xb))
    c.attack_seconds = time.perf_counter() - t0
    return _row(variant, name, ThreatModel.FULL, t, c, eval_mode, ctx.start, info,
                **{"check.grad_norm": float(g.abs().sum()), "attack.grad": grad, "attack.eot": eot, **probes})


def _by_classifier(defenses: dict[str, Purified]) -> list[tuple[nn.Module, dict[str, Purified]]]:
    groups: dict[int, tuple[nn.Module, dict]] = {}
    for v, d in defenses.items():
        groups.setdefault(id(d.classifier), (d.classifier, {}))[1][v] = d
    return list(groups.values())


def _summary(rows: list[dict]) -> str:
    return " ".join(f"{r['variant']}={r['accuracy']:.3f}" for r in rows)


def evaluate_models(ctx: Context, defenses: dict[str, Purified], attacks=None, threat_models=THREAT_MODELS,
                    surrogate: nn.Module | None = None, log=print) -> list[dict]:
    """Raw rows (before `finalize`) for every defense, threat model and attack on ctx's images."""
    cfg, rows = ctx.cfg, []
    ctx.record_modes(*[m for d in defenses.values() for m in (d.purifier, d.classifier)],
                     *([surrogate] if surrogate is not None else []))
    wanted = lambda a: attacks is None or a in attacks  # noqa: E731
    blind = ThreatModel.CLASSIFIER
    for name in filter(wanted, cfg.suite(blind, clean=True) if blind in threat_models else ()):
        for clf, group in _by_classifier(defenses):
            rows += score_crafted(ctx, name, ThreatModel.CLASSIFIER, clf, group)
        log(f"[eval] classifier {name:<10} " + _summary([r for r in rows if r["attack"] == name]))
    for name in filter(wanted, cfg.runs(ThreatModel.FULL) if ThreatModel.FULL in threat_models else ()):
        for v, d in defenses.items():
            if not said_once(d.purifier, ThreatModel.FULL, name, cfg):
                rows.append(score_full(ctx, name, v, d))
        log(f"[eval] full       {name:<10} " + _summary([r for r in rows if r["threat_model"] == ThreatModel.FULL
                                                         and r["attack"] == name]))
    for name in filter(wanted, cfg.suite(ThreatModel.TRANSFER) if ThreatModel.TRANSFER in threat_models else ()):
        if surrogate is None:
            raise ValueError("the transfer threat model needs a surrogate classifier (surrogate_dir)")
        rows += score_crafted(ctx, name, ThreatModel.TRANSFER, surrogate, defenses)
        log(f"[eval] transfer   {name:<10} " + _summary(rows[-len(defenses):]))
    return rows


def evaluate(cfg: EvalConfig, classifier_dir: Path, purifier_dirs: dict[str, Path | None], data: Cifar,
             rt: Runtime = Runtime(), start: int = 0, stop: int | None = None,
             attacks: tuple[str, ...] | None = None, threat_models: tuple[str, ...] | None = None,
             surrogate_dir: Path | None = None, log=print, cache_dir: Path | None = None, store=None,
             on_batch=None) -> list[dict]:
    """Checked accuracy rows for every (variant, attack, threat model) on test images [start, stop).

    `attacks` / `threat_models` restrict the run (for sharding; default: all of cfg's);
    'clean' counts as a classifier-threat attack. Shards give the same AEs as one run if
    `start` is a multiple of cfg.batch_size. `cache_dir`: the evaluation AE cache (None: none),
    in the output root's `store` (kdp.storage; a bucket's entries are fetched and published).
    `on_batch(threat, attack, variants, images)` is called after each scored batch (progress).
    """
    device = resolve_device(rt.device)
    acc = Accel.of(rt, device).for_attacks
    threats = cfg.threat_models if threat_models is None else tuple(threat_models)
    classifier = acc.module(load_frozen(classifier_dir, device))
    defenses = {v: Purified(acc.module(d.purifier), acc.module(d.classifier))
                for v, d in load_defenses(purifier_dirs, classifier, device).items()}
    surrogate = None
    if ThreatModel.TRANSFER in threats and (attacks is None or set(attacks) & set(cfg.suite(ThreatModel.TRANSFER))):
        if surrogate_dir is None:
            raise ValueError("the transfer threat model needs surrogate_dir (a classifier checkpoint)")
        surrogate = acc.module(load_frozen(surrogate_dir, device))
    for m in {id(m): m for m in (classifier, surrogate, *(d.classifier for d in defenses.values()))
              if m is not None}.values():
        m.register_forward_pre_hook(stop_hook)  # every attack query passes here: Ctrl-C ends it at the next
    ctx = Context(cfg, to_float(data.test_x[start:stop]), data.test_y[start:stop], device, start,
                  None if cache_dir is None else Path(cache_dir), store, on_batch)
    rows = evaluate_models(ctx, defenses, attacks, threats, surrogate, log)
    return finalize(rows + full_copies(rows, cfg, {v for v, d in defenses.items()
                                                   if getattr(d.purifier, "same_threats", False)}), cfg, log)


def said_once(purifier, threat: str, attack: str, cfg: EvalConfig) -> bool:
    """Is this run one the `classifier` threat model makes already? For a defense that is its own
    classifier (a purifier class or module with `same_threats`, e.g. at_classifier) a `full`
    attack is the classifier threat model's attack on the same model: run once, its rows copied."""
    blind = ThreatModel.CLASSIFIER
    return (threat == ThreatModel.FULL and getattr(purifier, "same_threats", False) and blind in cfg.threat_models
            and attack in cfg.suite(blind, clean=True))


def full_copies(rows: list[dict], cfg: EvalConfig, same: set[str]) -> list[dict]:
    """The `full` rows of the `same` variants' attacks said once: their classifier rows, marked
    `attack.same_as` (per shard, so that merged shards sum them as they sum the originals)."""
    full = set(cfg.runs(ThreatModel.FULL)) if ThreatModel.FULL in cfg.threat_models else set()
    blind = ThreatModel.CLASSIFIER
    return [{**r, "threat_model": ThreatModel.FULL.value, "attack.same_as": blind.value, "attack.grad": "exact",
             "attack.eot": 1}
            for r in rows if r["threat_model"] == blind and r["variant"] in same and r["attack"] in full]


def finalize(rows: list[dict], cfg: EvalConfig, log=print) -> list[dict]:
    """Derive each row's sanity checks from its counts; warn about every failed one."""
    for r in rows:
        budget = 0.0 if r["attack"] == "clean" else linf_budget(r["attack"])
        src_n, fooled = r["check.src_correct"], r["check.src_fooled"]
        success = fooled / src_n if src_n else None
        checks = {"check.eval_mode": r["check.eval_mode"],
                  "check.grad_nonzero": (None if r["threat_model"] != ThreatModel.FULL or r.get("attack.same_as")
                                         else (r["check.grad_norm"] or 0) > 0),
                  "check.attack_ok": None if success is None else success >= cfg.min_attack_success,
                  "check.linf_ok": r["check.in_range"] and (budget is None or r["linf_max"] <= budget + LINF_TOL)}
        failed = [k.removeprefix("check.") for k, ok in checks.items() if ok is False]
        r.update(checks, **{"check.attack_success": success, "checks_ok": not failed,
                            "check_failures": ",".join(failed)})
        if failed:
            log(f"[eval] WARNING sanity check failed ({', '.join(failed)}): variant {r['variant']}, "
                f"attack {r['attack']}, threat model {r['threat_model']}")
    return rows
