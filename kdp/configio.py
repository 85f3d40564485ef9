"""A config's other forms: flat rows (`flatten`: the parquet row and Ray's train_loop_config;
`unflatten`), nested dicts (`from_dict`: config.json), `--set` overrides (`override`) and
`--seeds` (`parse_seeds`, `replicate`). The configs themselves are in kdp.config."""
from __future__ import annotations

import dataclasses
import typing

from kdp.config import require, one_of
from kdp.defenses import REGISTRY
from kdp.errors import ConfigError


SEED_SCOPES = ("purifiers", "all")


def parse_seeds(text: str) -> tuple[int, ...]:
    """'0,1,2' -> (0, 1, 2); a one-line error for an empty list, a non-integer or a repeat."""
    parts = [p.strip() for p in str(text).split(",")]
    require(any(parts), f"--seeds {text!r}: give at least one integer seed, e.g. 0,1,2")
    try:
        seeds = tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--seeds {text!r}: seeds must be integers, e.g. 0,1,2") from None
    require(len(set(seeds)) == len(seeds) and min(seeds) >= 0, f"--seeds {text!r}: seeds must be distinct and >= 0")
    return seeds


def replicate(cfg, seed: int, scope: str = "purifiers"):
    """The run of `cfg` for replicate `seed`, named <name>-seed<seed>. Scope 'purifiers' seeds
    what depends on the seed (teachers, students, baselines, attack starts) and keeps the
    classifier, surrogate and training AEs, so replicates share them; 'all' reseeds the
    classifier and training AEs too (the surrogate keeps its own seed)."""
    one_of(scope, SEED_SCOPES, "seed scope")
    r = dataclasses.replace
    new = dict(at_teacher=r(cfg.at_teacher, seed=seed), nt_teacher=r(cfg.nt_teacher, seed=seed),
               students=tuple(r(s, seed=seed) for s in cfg.students), eval=r(cfg.eval, seed=seed))
    new.update({name: r(getattr(cfg, name), seed=seed) for name in REGISTRY if hasattr(getattr(cfg, name), "seed")})
    if scope == "all":
        new.update(classifier=r(cfg.classifier, seed=seed), ae=r(cfg.ae, seed=seed))
    return r(cfg, name=f"{cfg.name}-seed{seed}", seed=seed, **new)


def flatten(cfg, prefix: str = "") -> dict:
    """Nested dataclass -> {'a.b': value}; tuples of strings or numbers become 'x+y'."""
    out = {}
    for f in dataclasses.fields(cfg):
        v, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(v):
            out.update(flatten(v, key + "."))
        elif isinstance(v, tuple) and all(isinstance(t, (str, int, float)) for t in v):
            out[key] = "+".join(map(str, v))
        elif not isinstance(v, tuple):
            out[key] = v
    return out


def coerce(text: str, hint):
    """Parse a CLI override value for a field of type `hint`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    base = typing.get_origin(hint) or hint
    if args and base is not tuple:
        base = args[0]
    if base is tuple:
        return _items(text, hint)
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"expected true/false, got {text!r}")
        return text.lower() in ("true", "1")
    if base is float and "/" in text:  # allow eps=8/255
        num, den = text.split("/")
        return float(num) / float(den)
    return base(text)


def _students(students: tuple, text: str) -> tuple:
    """'at,nt,at+nt' -> one student per teacher set, each with the first student's settings;
    '' -> no students."""
    if not text.strip():
        return ()
    sets = [tuple(t for t in part.strip().split("+") if t) for part in text.split(",")]
    require(students and all(sets), f"bad value for students: {text!r}; give teacher sets, e.g. at,nt,at+nt")
    return tuple(dataclasses.replace(students[0], teachers=t) for t in sets)


def override(cfg, assignment: str, _full: str | None = None):
    """Apply 'a.b=value' to a nested frozen config; 'students.x=v' sets it on every student,
    'students=at,at+nt' picks the students by teacher set."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key=value")
    path, text = assignment.split("=", 1)
    full = _full or path
    head, _, rest = path.partition(".")
    hints = typing.get_type_hints(type(cfg))
    if head not in hints:
        valid = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise ConfigError(f"unknown config key {head!r} in {type(cfg).__name__}; valid: {valid}")
    value = getattr(cfg, head)
    if head == "students" and not rest and isinstance(value, tuple):  # PipelineConfig's
        new = _students(value, text)
    elif rest and isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        new = tuple(override(v, f"{rest}={text}", full) for v in value)
    elif rest:
        new = override(value, f"{rest}={text}", full)
    else:
        try:
            new = coerce(text, hints[head])
        except ValueError as e:
            raise ConfigError(f"bad value for {full}: {e}") from None
    return dataclasses.replace(cfg, **{head: new})


def _items(text: str, hint) -> tuple:
    """'x+y' as the tuple a `tuple[T, ...]` field holds (T: str or a number)."""
    tup = next((a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is tuple), hint)
    kind = (typing.get_args(tup) or (str,))[0]
    try:
        return tuple(kind(t) for t in text.split("+") if t)
    except ValueError:
        raise ConfigError(f"expected {kind.__name__} values joined by '+', got {text!r}") from None


def unflatten(cls, flat: dict, prefix: str = ""):
    """Inverse of `flatten` for a dataclass without tuple-of-dataclass fields."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(hint):
            kwargs[f.name] = unflatten(hint, flat, key + ".")
        elif key in flat:
            v = flat[key]
            kwargs[f.name] = _items(v, hint) if isinstance(v, str) and (
                typing.get_origin(hint) is tuple) else v
    return cls(**kwargs)


def from_dict(cls, d: dict):
    """Inverse of dataclasses.asdict (e.g. a config.json): nested configs and tuples rebuilt."""
    if not isinstance(d, dict):
        raise ConfigError(f"{cls.__name__}: expected a mapping, got {type(d).__name__}")
    hints, kwargs = typing.get_type_hints(cls), {}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    require(not unknown, f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    for name, v in d.items():
        hint = hints[name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint):
            v = from_dict(hint, v)
        elif typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
            v = tuple(from_dict(args[0], x) for x in v)
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[name] = v
    return cls(**kwargs)
