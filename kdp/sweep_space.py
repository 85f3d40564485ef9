"""A sweep's search space, one declaration per knob (`KNOBS`).

A knob is one dimension of the space: a grid of values (or, for a number, a sampled `Range`).
From its `Knob` record come the SweepConfig field and its check, the YAML key and the
`kdp sweep --<field>` flag, sweep.json, Tune's search space, what the knob does to a trial's
config, and the trial's `sweep.<param>` results column. A student knob to sweep is one
`student_knob(...)` line below (docs/extending.md)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from kdp.config import StudentConfig, one_of, require
from kdp.configio import coerce, parse_seeds, replicate
from kdp.errors import ConfigError
from kdp.losses import KD_SPACES

# sweep variant -> the student's teachers (None: the AT teacher itself is the purifier, no KD)
VARIANTS = {"at_teacher": None, "kd_at": ("at",), "kd_nt": ("nt",), "kd_at_nt": ("at", "nt")}
DISTRIBUTIONS = ("uniform", "loguniform")
SEARCHES = ("grid", "random", "optuna")  # how a sweep chooses its trials (kdp.sweep.SweepConfig.search)
SCHEDULERS = ("none", "asha")  # whether a sweep stops trials early (kdp.sweep.SweepConfig.scheduler)


@dataclass(frozen=True)
class Range:
    """A sampled dimension: `dist` between low and high (each trial sample draws anew)."""
    dist: str
    """'uniform' or 'loguniform'."""
    low: float
    """Lower bound."""
    high: float
    """Upper bound (> low)."""

    def __post_init__(self):
        one_of(self.dist, DISTRIBUTIONS, "distribution")
        require(0 <= self.low < self.high, f"range needs 0 <= low < high, got {self.low}, {self.high}")
        require(self.dist != "loguniform" or self.low > 0, "loguniform needs low > 0")


@dataclass(frozen=True)
class Knob:
    """One dimension of a sweep's search space."""
    param: str
    """The trial's parameter, and its results column `sweep.<param>`."""
    field: str
    """The SweepConfig field and YAML key; the flag is `--<field>` with '-' for '_'."""
    type: type
    """float, int or str: the type of the values and of the column."""
    default: tuple
    """The grid when a sweep names none."""
    doc: str
    """What it is: the SweepConfig field's docstring and the flag's help."""
    apply: Callable
    """(the trial's PipelineConfig, a value) -> the config with it; applied in KNOBS' order."""
    choices: tuple = ()
    """The valid values of a str knob."""
    bounds: tuple[float, float, bool] = (0.0, float("inf"), True)
    """A number's valid interval (low, high, low included)."""
    ranged: bool = False
    """A float knob may also be a Range ('uniform:0.1:1'), drawn anew for each trial."""
    values: Callable | None = None
    """A parser of the whole comma list ('0,1,2' -> a tuple), in place of the value by value one."""

    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    def parse(self, value) -> tuple | Range:
        """Values from YAML, sweep.json or a flag ('a,b', a list, or 'uniform:lo:hi'), checked."""
        if self.ranged and (isinstance(value, dict) or isinstance(value, str)
                            and value.split(":")[0] in DISTRIBUTIONS):
            return self._range(value)
        if isinstance(value, Range):
            require(self.ranged, f"sweep {self.field} takes a list of values, not a range")
            return self._range({value.dist: [value.low, value.high]})
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        if self.values is not None:
            return self.values(",".join(str(x).strip() for x in items))
        values = tuple(self._value(str(x).strip()) for x in items if str(x).strip())
        require(len(values) > 0, f"sweep {self.field} needs at least one value")
        return values

    def _value(self, text: str):
        if self.type is str:
            one_of(text, self.choices, f"sweep {self.param}")
            return text
        x = self._number(text)
        low, high, closed = self.bounds
        ok = (low <= x if closed else low < x) and x <= high
        require(ok, f"sweep {self.field} value {x} out of range ({self._interval()})")
        return x

    def _interval(self) -> str:
        low, high, closed = self.bounds
        if high == float("inf"):
            return f"{'>=' if closed else '>'} {low:g}"
        return f"{'[' if closed else '('}{low:g}, {high:g}]"

    def _range(self, value) -> Range:
        if isinstance(value, str):
            parts = value.split(":")
            require(len(parts) == 3, f"sweep {self.field}: expected dist:low:high, got {value!r}")
            value = {parts[0]: parts[1:]}
        require(len(value) == 1, f"sweep {self.field}: a range is one of {DISTRIBUTIONS}: [low, high], got {value}")
        (dist, ends), = value.items()
        require(isinstance(ends, (list, tuple)) and len(ends) == 2, f"sweep {self.field}: {dist} needs [low, high]")
        r = Range(dist, *(self._number(x) for x in ends))
        require(r.high <= self.bounds[1], f"sweep {self.field} range must lie in {self._interval()}, got {r}")
        return r

    def _number(self, x):
        try:
            return coerce(str(x).strip(), self.type)
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"sweep {self.field}: not {'an integer' if self.type is int else 'a number'}: "
                              f"{x!r}") from None

    def to_json(self, v):
        return {v.dist: [v.low, v.high]} if isinstance(v, Range) else list(v)


def _variant(cfg, v: str):
    teachers = VARIANTS[v]
    template = cfg.students[0] if cfg.students else StudentConfig()
    students = () if teachers is None else (dataclasses.replace(template, teachers=teachers),)
    return dataclasses.replace(cfg, students=students)


def _eps(cfg, eps: float):
    """The training AEs' eps, their step alpha scaled with it."""
    alpha = cfg.ae.alpha * eps / cfg.ae.eps if cfg.ae.eps else eps / 4
    return dataclasses.replace(cfg, ae=dataclasses.replace(cfg.ae, eps=eps, alpha=alpha))


def _seed(cfg, seed: int):
    return dataclasses.replace(replicate(cfg, int(seed)), name=cfg.name)


def student_knob(name: str, type_: type, default: tuple, doc: str, **kw) -> Knob:
    """A knob that sets the field `name` of the trial's student (StudentConfig)."""
    def apply(cfg, v):
        if not cfg.students:  # the AT teacher alone: no student to set
            return cfg
        return dataclasses.replace(cfg, students=(dataclasses.replace(cfg.students[0], **{name: v}),))
    return Knob(name, name, type_, default, doc, apply, **kw)


# In the order Tune's grid takes them; the seed is applied last, so it reseeds the trial's student.
KNOBS = (
    Knob("variant", "variants", str, tuple(VARIANTS), "Teacher variants, Table 2's rows (at_teacher: the AT "
         "teacher as the purifier, no KD).", _variant, choices=tuple(VARIANTS)),
    student_knob("beta", float, (0.5,), "Weight of the reconstruction loss.", ranged=True),
    student_knob("gamma", float, (0.5,), "Weight of the distillation loss.", ranged=True),
    Knob("eps", "eps", float, (8 / 255,), "Training eps of the AT teacher's and the students' AEs (alpha "
         "scales with it).", _eps, bounds=(0.0, 1.0, False), ranged=True),
    student_knob("kd_space", str, ("pixels",), "KD softmax space(s).", choices=KD_SPACES),
    Knob("seed", "seeds", int, (0,), "Replicate seeds: each reseeds the trial's teachers, student and attack "
         "starts (kdp.configio.replicate); the classifier and training AEs stay shared.", _seed,
         values=parse_seeds),
)
BY_FIELD = {k.field: k for k in KNOBS}
