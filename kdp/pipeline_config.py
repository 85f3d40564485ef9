"""The whole experiment's config: the stage configs (kdp.config), the students, and one field per
registered baseline (kdp.baselines), named as the baseline, holding its config."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from kdp.baselines import BASELINES
from kdp.baselines.at_classifier import ATClassifierConfig
from kdp.baselines.bitdepth import BitDepthConfig
from kdp.baselines.e2e_at import E2EATConfig
from kdp.baselines.jpeg import JpegConfig
from kdp.baselines.nrp import NRPConfig
from kdp.baselines.soap import SoapConfig
from kdp.config import (AEConfig, ClassifierConfig, DataConfig, EvalConfig, StudentConfig, TeacherConfig, require,
                        one_of, check_name)

DEFAULT_BASELINES = tuple(name for name, d in BASELINES.items() if d.default)


@dataclass(frozen=True)
class PipelineConfig:
    """The whole method: classifier -> AEs -> AT and NT teachers -> students -> evaluation."""
    name: str = "kdp"
    """Run name: a directory under the output root; re-running it resumes."""
    preset: str = "custom"
    """Preset this config came from."""
    seed: int | None = None
    """Replicate seed (set by `replicate`, i.e. --seeds): the seed of every purifier, baseline and
    evaluation attack of this run; None: a single run with each stage's own seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset."""
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    """Stage 0."""
    ae: AEConfig = field(default_factory=AEConfig)
    """Training AEs."""
    at_teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(kind="at"))
    """Stage 1, AT."""
    nt_teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(kind="nt"))
    """Stage 1, NT."""
    students: tuple[StudentConfig, ...] = (StudentConfig(teachers=("at",)), StudentConfig(teachers=("nt",)),
                                           StudentConfig())
    """Stage 2: one student per entry (default: the paper's ablation)."""
    surrogate: ClassifierConfig = field(default_factory=lambda: ClassifierConfig(seed=1))
    """The `transfer` threat model's surrogate: a classifier trained separately (another seed)."""
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    """Baseline purifiers trained and evaluated beside the students (any registered in
    kdp.baselines); each also has its config field below, named as it."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Stage 3."""
    # one field per registered baseline, named as it (checked below), in registration order
    jpeg: JpegConfig = field(default_factory=JpegConfig)
    """Baseline `jpeg`."""
    nrp: NRPConfig = field(default_factory=NRPConfig)
    """Baseline `nrp`."""
    soap: SoapConfig = field(default_factory=SoapConfig)
    """Baseline `soap`."""
    bitdepth: BitDepthConfig = field(default_factory=BitDepthConfig)
    """Baseline `bitdepth`."""
    at_classifier: ATClassifierConfig = field(default_factory=ATClassifierConfig)
    """Baseline `at_classifier`."""
    e2e_at: E2EATConfig = field(default_factory=E2EATConfig)
    """Baseline `e2e_at`."""

    def __post_init__(self):
        check_name(self.name, "run")
        require(self.at_teacher.kind == "at" and self.nt_teacher.kind == "nt",
               "at_teacher must have kind 'at' and nt_teacher kind 'nt'")
        object.__setattr__(self, "students", tuple(self.students))
        names = [s.variant for s in self.students]
        require(len(set(names)) == len(names), f"two students share a teacher set: {names}")
        object.__setattr__(self, "baselines", tuple(self.baselines))
        for b in self.baselines:
            one_of(b, tuple(BASELINES), "baseline")
        require(len(set(self.baselines)) == len(self.baselines), f"repeated baseline in {self.baselines}")


def _check_fields() -> None:
    """Every registered baseline has its field, of its config type: a new baseline's missing
    line is named at import, not found later as a missing column."""
    fields = {f.name: f.type for f in dataclasses.fields(PipelineConfig)}
    for name, d in BASELINES.items():
        if fields.get(name) != d.config.__name__:
            raise TypeError(f"baseline {name!r} is registered, but PipelineConfig has no field "
                            f"`{name}: {d.config.__name__}` (kdp/pipeline_config.py; docs/extending.md)")


_check_fields()
