"""The pipeline's stage graph, written once: what each stage is, what it reads and where its
output goes. How a graph runs is kdp.scheduler's.

A `Stage` names its config, the stages whose outputs it reads, and its kind, which says how it runs
(`kdp.scheduler.RUNNERS`), its function named in the kind's table (`kdp.stages.drivers`):
- `train`: one resumable fit of a training recipe (`RECIPES`): in this process, or a Ray Train run;
- `task`: a function of (config, inputs, out, data, rt) (`TASKS`): here, or a Ray task;
- `driver`: light work in the calling process (`DRIVER`): JPEG writes a checkpoint; evaluation
  fans its shards out through the executor and writes the parquet.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kdp.baselines import BASELINES
from kdp.config import ThreatModel
from kdp.data import Cifar
from kdp.pipeline_config import PipelineConfig
from kdp.stages.aes import ae_cache_key

KINDS = ("train", "task", "driver")
OUTPUTS = ("checkpoint", "aes", "results")
SURROGATE_COST = 2.0  # a side branch's cost (kdp.defenses.Defense.cost): the surrogate is a classifier


@dataclass(frozen=True)
class Stage:
    """One node of the graph."""
    name: str
    """Stage name: its directory under the run, its events, its Ray Train run."""
    kind: str
    """'train', 'task' or 'driver' (see the module docstring)."""
    fn: str
    """Recipe name (train) or function name (task, driver)."""
    config: Any
    """The stage's frozen config; a finished checkpoint made with another one is refused."""
    needs: tuple[str, ...] = ()
    """Stages whose outputs this one reads (keys of its `inputs`)."""
    variant: str | None = None
    """Result-table name of the purifier it makes, if evaluated."""
    parallel: bool = True
    """Data-parallel workers allowed (False: the step calls submodules directly, so one worker)."""
    evaluates: tuple[str, ...] = ()
    """The evaluate stage: the variants it scores ('none' is the classifier alone)."""
    output: str = "checkpoint"
    """What it writes (OUTPUTS): a checkpoint directory, an AE cache entry, or the results parquet."""
    shared: bool = True
    """May sweep trials share it (False: a trial's own, the student it sweeps, reported to Tune)?"""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown stage kind {self.kind!r}; valid: {', '.join(KINDS)}")
        if self.output not in OUTPUTS:
            raise ValueError(f"unknown stage output {self.output!r}; valid: {', '.join(OUTPUTS)}")


def baseline_stage(cfg: PipelineConfig, name: str) -> Stage:
    """Baseline `name`'s stage, from its declaration (kdp.baselines): trained by its recipe, or
    without one, its checkpoint written by the `untrained` driver."""
    d = BASELINES[name]
    if d.recipe is None:
        return Stage(f"baseline_{name}", "driver", "untrained", getattr(cfg, name), (), name)
    return Stage(f"baseline_{name}", "train", name, getattr(cfg, name), d.inputs(getattr(cfg, name)), name,
                 parallel=d.parallel)


def pipeline_graph(cfg: PipelineConfig, evaluated: tuple[str, ...] | None = None) -> list[Stage]:
    """The stages of `cfg` in priority order (the critical path first). `evaluated` limits the
    variants evaluated (default: none, both teachers, every student and baseline)."""
    teachers = [Stage("teacher_at", "train", "teacher", cfg.at_teacher, ("classifier", "aes"), "at_teacher"),
                Stage("teacher_nt", "train", "teacher", cfg.nt_teacher, (), "nt_teacher")]
    students = [Stage(f"student_{s.variant}", "train", "student", s,
                      ("classifier", "aes", *(f"teacher_{t}" for t in s.teachers)), s.variant, shared=False)
                for s in cfg.students]
    graph = [Stage("classifier", "train", "classifier", cfg.classifier),
             Stage("aes", "task", "aes", cfg.ae, ("classifier",), output="aes"), *teachers, *students]
    # side branches after the critical path, costliest first (SOAP trains a classifier with
    # auxiliary heads, the surrogate a classifier), so that none of them is left for the end
    side = [(BASELINES[b].cost, baseline_stage(cfg, b)) for b in cfg.baselines]
    if ThreatModel.TRANSFER in cfg.eval.threat_models:
        side.append((SURROGATE_COST, Stage("surrogate", "train", "classifier", cfg.surrogate)))
    graph += [stage for _, stage in sorted(side, key=lambda cs: -cs[0])]
    order = ["none", "at_teacher", "nt_teacher", *(s.variant for s in students), *cfg.baselines]
    wanted = tuple(v for v in order if evaluated is None or v in evaluated)
    makers = sorted((s for s in graph if s.variant in wanted), key=lambda s: order.index(s.variant))
    needs = ("classifier", *(s.name for s in makers),
             *(("surrogate",) if ThreatModel.TRANSFER in cfg.eval.threat_models else ()))
    graph.append(Stage("evaluate", "driver", "evaluate", cfg, needs, evaluates=wanted, output="results"))
    return graph


# ---- where each stage's output goes --------------------------------------------------------

def placer(places: dict[str, Callable[[Stage, dict], Path]]) -> Callable[[Stage, dict], Path]:
    """(stage, inputs) -> its output path, from one place function per kind of output (OUTPUTS)."""
    missing = set(OUTPUTS) - set(places)
    if missing:
        raise ValueError(f"no place for outputs {sorted(missing)}")
    return lambda stage, inputs: places[stage.output](stage, inputs)


def ae_entry(cache: Path, data: Cifar) -> Callable[[Stage, dict], Path]:
    """The training AEs' place: the cache entry named by their key (config, classifier, data)."""
    return lambda stage, inputs: cache / ae_cache_key(stage.config, Path(inputs["classifier"]), data)


def pipeline_place(out_root: Path, run_dir: Path, data: Cifar):
    """Where a pipeline stage writes: <run>/<stage>/, the AE cache entry, <run>/results.parquet."""
    return placer({"checkpoint": lambda stage, inputs: run_dir / stage.name,
                   "aes": ae_entry(out_root / "cache" / "aes", data),
                   "results": lambda stage, inputs: run_dir / "results.parquet"})
