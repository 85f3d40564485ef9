"""The baseline defenses' registry: each baseline is one `Defense` record, declared once in its
own module under kdp/baselines/ with `register(...)` (timm's way with models).

From the records come: `PipelineConfig`'s `baselines` choices and one config field per
baseline (`--set <name>.field=...`, config.json), the stage `baseline_<name>` (trained by
its recipe, or, without one, a checkpoint written as is) and the order of side branches,
the results' `<name>.*` columns, the variant's label and place in tables and Table 1, the
checkpoint's model spec, replicate seeding, and the tests parametrized over every baseline.
Read the filled registry from `kdp.baselines` (importing it imports every baseline module);
this module only holds it, at the bottom, so that `kdp.models.build_model` reads it without
importing the baselines (which import the models).
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable

from kdp.errors import ConfigError


@dataclass(frozen=True)
class Defense:
    """One baseline purifier, declared once."""
    name: str
    """Its variant name in results, its config key (`--set <name>.x=...`, the `<name>.*` columns)
    and its module under kdp/baselines/; its stage is baseline_<name>."""
    label: str
    """Its name in tables, Table 1 and the report."""
    config: type
    """Its frozen config dataclass; the defaults are the original's (or kdp's stated choice)."""
    purifier: type
    """The nn.Module evaluated in front of the classifier (images in [0, 1] in and out), built
    from the config fields its __init__ names; a non-differentiable one sets `backward = "bpda"`."""
    recipe: Callable | None = None
    """Its training recipe, (cfg, inputs, data, device, rt, rank=0) -> kdp.train.Recipe;
    None: nothing to train (its stage writes the checkpoint, config and spec, as is)."""
    needs: tuple[str, ...] | Callable = ()
    """Stages whose outputs the recipe reads (e.g. 'classifier'), or a function of its config giving them."""
    parallel: bool = True
    """Data-parallel training allowed (False: its step calls submodules directly)."""
    cost: float = 0.0
    """Rough training cost relative to the classifier's (side branches start costliest first)."""
    in_table1: bool = True
    """Shown in Table 1 (always in the full results and Table 2)."""
    default: bool = True
    """Trained and evaluated unless `baselines` says otherwise."""

    def __post_init__(self):
        if not self.name.isidentifier() or self.name in ("none", "surrogate", "classifier"):
            raise ConfigError(f"baseline name {self.name!r} must be an identifier other than none/surrogate/classifier")
        if not dataclasses.is_dataclass(self.config):
            raise ConfigError(f"baseline {self.name!r}: config must be a dataclass, got {self.config!r}")

    def kwargs(self, cfg) -> dict:
        """The purifier's constructor arguments: the config's fields that its __init__ names."""
        names = inspect.signature(self.purifier).parameters
        return {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}

    def inputs(self, cfg) -> tuple[str, ...]:
        """The stages whose outputs its recipe reads under config `cfg`."""
        return tuple(self.needs(cfg) if callable(self.needs) else self.needs)

    def spec(self, cfg) -> dict:
        """The model spec a checkpoint of this baseline is rebuilt from (kdp.models.build_model)."""
        return {"kind": "purifier", "name": self.name, "kwargs": self.kwargs(cfg)}


REGISTRY: dict[str, Defense] = {}


def register(defense: Defense) -> Defense:
    """Add a baseline (one line at the end of its module); a second one of a name is refused."""
    if defense.name in REGISTRY and REGISTRY[defense.name] != defense:
        raise ConfigError(f"baseline {defense.name!r} is registered twice")
    REGISTRY[defense.name] = defense
    return defense
