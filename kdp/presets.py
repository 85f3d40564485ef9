"""Named configurations. `paper` is exactly the paper's hyperparameters; the others are
reduced so that they fit a CPU or a short GPU lease (their costs are in the README)."""
from __future__ import annotations

from typing import Callable

from kdp.config import (AEConfig, ClassifierConfig, DataConfig, EvalConfig, NRPConfig, PipelineConfig, SoapConfig,
                        StudentConfig, TeacherConfig)
from kdp.models import lookup

ABLATION = (("at",), ("nt",), ("at", "nt"))  # paper Table 2: KD <- AT, KD <- NT, KD <- AT + NT


def paper() -> PipelineConfig:
    """The paper: ResNet-56, CAE 15+15 width 64, teachers 100 epochs, students 40, full data.
    The classifier recipe is pytorch-cifar-models' (the paper used a pretrained one)."""
    return PipelineConfig(name="paper", preset="paper",
                          students=tuple(StudentConfig(teachers=t) for t in ABLATION))


def smoke() -> PipelineConfig:
    """Small models and few epochs on the shared 5085-image subset: the whole pipeline, the
    baselines and the attack suite under three threat models (200 test images) in about
    10 minutes on 2 CPU cores. Its `full` suite is cheaper than the default: PGD-20 (not
    PGD-100), and aa-standard on the first 50 images (not 200), which alone took 12 of
    the 17 minutes of evaluation at the default suite on the 2-core VM."""
    cae = dict(depth=4, width=16, batch_size=128)
    clf = dict(arch="resnet8", width=16, epochs=15, batch_size=128, lr=0.05)
    return PipelineConfig(
        name="smoke", preset="smoke",
        data=DataConfig(n_test=200),
        classifier=ClassifierConfig(**clf), surrogate=ClassifierConfig(**{**clf, "seed": 1}),
        nrp=NRPConfig(width=16, blocks=2, critic_width=16, epochs=3, ssp_steps=2, lr=1e-3),
        soap=SoapConfig(arch="resnet8", width=16, epochs=15, batch_size=128, lr=0.05),
        ae=AEConfig(steps=7),
        at_teacher=TeacherConfig(kind="at", epochs=3, **cae), nt_teacher=TeacherConfig(kind="nt", epochs=3, **cae),
        students=tuple(StudentConfig(teachers=t, epochs=3, **cae) for t in ABLATION),
        eval=EvalConfig(batch_size=100, adaptive_attacks=("pgd8", "aa-standard"), aa_subset=50))


def reduced() -> PipelineConfig:
    """The real 5085/1017 CIFAR-10 subset at the paper's model sizes, with fewer epochs:
    the recorded H100 run in docs/results.md (about 6 minutes there)."""
    return PipelineConfig(
        name="reduced", preset="reduced",
        classifier=ClassifierConfig(arch="resnet56", epochs=80, batch_size=128, lr=0.1),
        surrogate=ClassifierConfig(arch="resnet56", epochs=80, batch_size=128, lr=0.1, seed=1),
        soap=SoapConfig(epochs=80, batch_size=128, lr=0.1),
        at_teacher=TeacherConfig(kind="at", epochs=30), nt_teacher=TeacherConfig(kind="nt", epochs=30),
        students=tuple(StudentConfig(teachers=t, epochs=15) for t in ABLATION),
        eval=EvalConfig(batch_size=512))


PRESETS: dict[str, Callable[[], PipelineConfig]] = {"paper": paper, "smoke": smoke, "reduced": reduced}


def get_preset(name: str) -> PipelineConfig:
    return lookup(PRESETS, name, "preset")()
