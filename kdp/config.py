"""One frozen dataclass per stage. Flattened (`kdp.configio.flatten`), a config becomes the parquet row's
columns and, in the Ray layer, the `train_loop_config`. Fields are validated on creation."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from kdp.accel import COMPILE, SWITCH
from kdp.attacks import ATTACKS, CURVE_EPS, PAPER_SUITE, curve_name
from kdp.errors import ConfigError
from kdp.losses import ADV_SCORES, KD_SPACES
from kdp.models import CLASSIFIERS
from kdp.tracking import check_mlflow_uri

TEACHER_KINDS = ("at", "nt")


class ThreatModel(str, Enum):
    """What the attacker sees (the `threat_model` column; RobustBench-style). Its attacks are an
    EvalConfig field each (`EvalConfig.suite`)."""
    CLASSIFIER = "classifier"
    """Crafted on the classifier alone, then purified: the paper's (preprocessor-blind) protocol."""
    FULL = "full"
    """Crafted end to end through purifier∘classifier (BPDA, EOT where needed): adaptive."""
    TRANSFER = "transfer"
    """Crafted on a separately trained surrogate classifier, then purified and classified."""

    def __str__(self):  # its value in rows, f-strings and logs (as 3.11's StrEnum; kdp runs on 3.10 too)
        return self.value


THREAT_MODELS = tuple(t.value for t in ThreatModel)
PROXY_THREATS = (ThreatModel.CLASSIFIER.value, ThreatModel.FULL.value)  # the proxy's: transfer needs a surrogate
# the EvalConfig field holding each threat model's attacks: the suite map, said once
SUITES = {ThreatModel.CLASSIFIER: "attacks", ThreatModel.FULL: "adaptive_attacks",
          ThreatModel.TRANSFER: "transfer_attacks"}
HEADS = ("literal", "affine")
AE_ATTACKS = ("pgd8", "pgd16", "bim")  # iterative L-inf attacks that take eps/alpha/steps


# the checks every config's __post_init__ uses: a one-line ConfigError naming the bad value

def require(ok: bool, msg: str) -> None:
    """`msg` as a ConfigError unless `ok`."""
    if not ok:
        raise ConfigError(msg)


def positive(obj, *names: str) -> None:
    """Each named field of `obj` is > 0 (or None)."""
    for n in names:
        v = getattr(obj, n)
        require(v is None or v > 0, f"{type(obj).__name__}.{n} must be > 0, got {v}")


def nonnegative(obj, *names: str) -> None:
    """Each named field of `obj` is >= 0."""
    for n in names:
        v = getattr(obj, n)
        require(v >= 0, f"{type(obj).__name__}.{n} must be >= 0, got {v}")


def check_name(name: str, what: str) -> None:
    """A run or sweep name: one directory under the output root."""
    require(bool(name) and "/" not in name and not name.startswith("."), f"invalid {what} name {name!r}")


def one_of(value, valid, what: str) -> None:
    """`value` is one of `valid`; the error lists them."""
    require(value in valid, f"unknown {what} {value!r}; valid: {', '.join(map(str, valid))}")


@dataclass(frozen=True)
class DataConfig:
    data_dir: str | None = None
    """CIFAR-10 location: a cifar-10-batches-py layout, an ImageFolder tree or its .zip; None downloads."""
    n_train: int | None = None
    """Use only the first n_train training images (None: all)."""
    n_test: int | None = None
    """Use only the first n_test test images (None: all)."""

    def __post_init__(self):
        positive(self, "n_train", "n_test")


@dataclass(frozen=True)
class ClassifierConfig:
    """Stage 0: the CIFAR ResNet that is attacked, then frozen."""
    arch: str = "resnet56"
    """Registry name in kdp.models.CLASSIFIERS."""
    width: int = 16
    """Channels of the first stage (16 in He et al.)."""
    epochs: int = 200
    """SGD epochs, cosine schedule to zero."""
    batch_size: int = 256
    """Images per optimizer step (summed over data-parallel workers)."""
    lr: float = 0.1
    """Peak SGD learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """L2 weight decay."""
    nesterov: bool = True
    """Nesterov momentum (pytorch-cifar-models recipe)."""
    seed: int = 0
    """Seed for init, shuffling and augmentation."""

    def __post_init__(self):
        one_of(self.arch, sorted(CLASSIFIERS), "classifier")
        positive(self, "width", "epochs", "batch_size", "lr")
        require(0 <= self.momentum < 1, f"ClassifierConfig.momentum must be in [0, 1), got {self.momentum}")
        require(self.weight_decay >= 0, f"ClassifierConfig.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True)
class AEConfig:
    """The training AEs: PGD on the frozen classifier. Cached by classifier, this config and data."""
    attack: str = "pgd8"
    """Registry attack whose eps/alpha/steps are overridden below."""
    eps: float = 8 / 255
    """L-inf radius (paper: 8/255)."""
    alpha: float = 2 / 255
    """Step size (not stated for training in the paper; kdp uses the eval setting)."""
    steps: int = 20
    """Iterations (not stated for training; kdp uses the eval setting)."""
    seed: int = 0
    """Seed of the random start; each batch is seeded by its position."""
    batch_size: int = 256
    """Images per attack batch (part of the cache key: the random start is drawn per batch)."""

    def __post_init__(self):
        one_of(self.attack, AE_ATTACKS, "training attack")
        require(self.eps >= 0, f"AEConfig.eps must be >= 0, got {self.eps}")
        require(self.alpha >= 0, f"AEConfig.alpha must be >= 0, got {self.alpha}")
        positive(self, "steps", "batch_size")

    def key_fields(self) -> dict:
        """What the AEs depend on: every field. batch_size too, since attack_batches seeds the
        random start per batch, so other batch boundaries give other (equally valid) AEs."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PurifierTraining:
    """What every CAE stage shares: the architecture and Adam (paper Sec. 3.1, 4.1)."""
    depth: int = 15
    """Encoder blocks (= decoder blocks); paper: 15."""
    width: int = 64
    """Channels of every hidden layer; REDNet30: 64."""
    head: str = "literal"
    """Output head: 'literal' (ConvT-BN-ReLU, tanh) or 'affine' ((tanh + 1) / 2)."""
    epochs: int = 100
    """Adam epochs (paper: 100 for teachers, 40 for the student)."""
    batch_size: int = 128
    """Images per step (paper: 128)."""
    lr: float = 0.01
    """Adam learning rate (paper: 0.01), constant."""
    seed: int = 0
    """Seed for init and shuffling."""

    def __post_init__(self):
        one_of(self.head, HEADS, "purifier head")
        positive(self, "depth", "width", "epochs", "batch_size", "lr")


@dataclass(frozen=True)
class TeacherConfig(PurifierTraining):
    """Stage 1: an AT (on AEs, Eq. 2) or NT (on clean images, Eq. 3) autoencoder teacher."""
    kind: str = "at"
    """'at' trains on the AEs with L_AT; 'nt' on clean images with L_NT."""
    adv_score: str = "logprob"
    """L_AT's p_out/adv_out: true-label 'logprob' or 'logit' (AT only)."""

    def __post_init__(self):
        super().__post_init__()
        one_of(self.kind, TEACHER_KINDS, "teacher kind")
        one_of(self.adv_score, ADV_SCORES, "adv score")


@dataclass(frozen=True)
class StudentConfig(PurifierTraining):
    """Stage 2: the purifier, distilled from a set of teachers (Eqs. 4-6)."""
    epochs: int = 40
    """Adam epochs (paper: 40)."""
    teachers: tuple[str, ...] = ("at", "nt")
    """Teachers to distil from: any non-empty subset of ('at', 'nt')."""
    beta: float = 0.5
    """Weight of the reconstruction loss L_s (paper: 0.5)."""
    gamma: float = 0.5
    """Weight of the distillation loss L_kd (paper: 0.5)."""
    kd_space: str = "pixels"
    """Softmax space of the KL: 'pixels' (literal) or 'logits' (classifier outputs)."""
    proxy_n: int = 0
    """Test images (the first ones) of the per-epoch proxy (kdp.proxy): after each epoch, the
    student's accuracy under PGD-10 at its training AEs' eps, `proxy_acc` in the epoch's metrics
    (what a sweep's ASHA ranks trials by). 0: none. It changes no weight: a run with it trains
    the same student."""
    proxy_threat: str = "classifier"
    """The proxy's threat model: `classifier` (AEs crafted on the classifier once, then purified) or
    `full` (crafted through purifier and classifier after each epoch)."""

    def __post_init__(self):
        super().__post_init__()
        require(self.proxy_n >= 0, f"StudentConfig.proxy_n must be >= 0, got {self.proxy_n}")
        one_of(self.proxy_threat, PROXY_THREATS, "proxy threat model")
        object.__setattr__(self, "teachers", tuple(self.teachers))
        require(len(self.teachers) > 0 and len(set(self.teachers)) == len(self.teachers),
               f"StudentConfig.teachers must be a non-empty set of at/nt, got {self.teachers}")
        for t in self.teachers:
            one_of(t, TEACHER_KINDS, "teacher")
        one_of(self.kd_space, KD_SPACES, "kd space")
        require(self.beta >= 0 and self.gamma >= 0, f"beta and gamma must be >= 0, got {self.beta}, {self.gamma}")

    @property
    def variant(self) -> str:
        """Result-table name: kd_at, kd_nt or kd_at_nt (paper Table 2 rows)."""
        return "kd_" + "_".join(t for t in TEACHER_KINDS if t in self.teachers)


@dataclass(frozen=True)
class EvalConfig:
    """Stage 3: every defense under three threat models, with sanity checks in each row."""
    attacks: tuple[str, ...] = PAPER_SUITE + ("aa-standard",)
    """`classifier` threat model (the paper's protocol): crafted on the classifier alone, then purified.
    The paper's suite (its `autoattack` is torchattacks' 10-step one) plus full-strength `aa-standard`."""
    adaptive_attacks: tuple[str, ...] = ("pgd100", "aa-standard")
    """`full` threat model: run end to end through purifier∘classifier (BPDA, EOT where needed).
    Default: PGD-100 and full-strength AutoAttack, the adaptive-attack literature's minimum."""
    transfer_attacks: tuple[str, ...] = ("pgd8", "fgsm")
    """`transfer` threat model: crafted on the surrogate classifier, then purified and classified."""
    threat_models: tuple[str, ...] = THREAT_MODELS
    """Threat models to evaluate (a subset of classifier, full, transfer)."""
    eot_samples: int = 8
    """Forward passes averaged per gradient when attacking a randomized defense under `full`."""
    min_attack_success: float = 0.5
    """Sanity check: an attack must fool at least this fraction of the images its own
    (undefended) source model classified correctly, else the attack is flagged as broken."""
    aa_subset: int | None = 200
    """Test images (the first ones) that the per-image-expensive attacks (`Attack.subset` in
    kdp.attacks: aa-standard) run on, under every threat model; None: all. Rows record their own `n`."""
    batch_size: int = 256
    """Images per attack batch."""
    seed: int = 0
    """Seed of random starts; each batch is seeded by its position."""
    eps_curve: tuple[int, ...] = (2, 4, 8, 16, 32, 255)
    """L-inf radii, in 1/255 (one of kdp.attacks.CURVE_EPS each), of PGD-20 run beside a `full` suite on the first
    `indicator_subset` images: the report's accuracy-vs-ε plot. 255 spans all of [0, 1], the unbounded
    attack (`unbounded_attack_failure`). (): neither."""
    indicator_subset: int = 32
    """Test images (the first ones) that the indicators' own extra work runs on: the ε curve and the
    stability probe (docs/evaluation.md: their cost)."""

    def __post_init__(self):
        positive(self, "aa_subset", "indicator_subset")
        for n in ("attacks", "adaptive_attacks", "transfer_attacks", "threat_models", "eps_curve"):
            object.__setattr__(self, n, tuple(getattr(self, n)))
        for k in self.eps_curve:
            one_of(k, CURVE_EPS, "eps_curve radius (in 1/255)")
        for a in self.attacks + self.adaptive_attacks + self.transfer_attacks:
            one_of(a, sorted(ATTACKS), "attack")
        for t in self.threat_models:
            one_of(t, THREAT_MODELS, "threat model")
        positive(self, "batch_size", "eot_samples")
        require(0 <= self.min_attack_success <= 1,
               f"EvalConfig.min_attack_success must be in [0, 1], got {self.min_attack_success}")

    def subset(self, attack: str, n_test: int) -> int:
        """How many of the first test images `attack` runs on."""
        if attack in ATTACKS and ATTACKS[attack].curve:
            return min(n_test, self.indicator_subset)
        costly = attack in ATTACKS and ATTACKS[attack].subset
        return min(n_test, self.aa_subset) if costly and self.aa_subset else n_test

    def suite(self, threat: str, clean: bool = False) -> tuple[str, ...]:
        """The attacks of threat model `threat` (with `clean`: the classifier threat model's
        unattacked pass first, which counts as one of its attacks)."""
        attacks = getattr(self, SUITES[ThreatModel(threat)])
        return ("clean", *attacks) if clean and threat == ThreatModel.CLASSIFIER else attacks

    def runs(self, threat: str) -> tuple[str, ...]:
        """What threat model `threat` runs: its suite (with 'clean'), and beside a `full` suite the ε curve."""
        curve = (tuple(curve_name(k) for k in sorted(set(self.eps_curve)))
                 if threat == ThreatModel.FULL and self.adaptive_attacks else ())
        return self.suite(threat, clean=True) + curve

    def check_test_size(self, n_test: int) -> None:
        """A one-line error when aa_subset asks for more images than the test set has."""
        used = {a for t in self.threat_models for a in self.suite(t) if ATTACKS[a].subset}
        require(not used or self.aa_subset is None or self.aa_subset <= n_test,
               f"eval.aa_subset={self.aa_subset} is larger than the test set ({n_test} images); "
               f"set eval.aa_subset to at most {n_test}")


@dataclass(frozen=True)
class Runtime:
    """Where and how stages run; not part of an experiment's identity (results record it in `accel`)."""
    device: str = "auto"
    """'auto' (cuda if available), 'cpu', 'cuda' or 'cuda:N'."""
    bf16: str = "auto"
    """bf16 autocast in training steps, fp32 BatchNorm and losses (attacks stay fp32): auto (on CUDA), on, off."""
    channels_last: str = "auto"
    """NHWC models and image batches: auto (on CUDA), on, off."""
    compile: str = "auto"
    """torch.compile of training-step models, eager if it fails: auto ('default' on CUDA, off elsewhere),
    off, default, reduce-overhead (CUDA graphs), max-autotune."""
    time_limit: float | None = None
    """Minutes this command may train and evaluate: it stops at the first epoch or evaluation shard
    boundary where the next would not fit (exit 75), and the same command resumes. None: no limit."""
    progress: bool = True
    """Show progress bars."""
    eval_cache: bool = True
    """Reuse classifier- and transfer-threat-model AEs from the evaluation AE cache (off: craft
    them every time, e.g. to benchmark the cache; the AEs are the same either way)."""
    rescore: bool = False
    """Re-run the evaluation even if its config, inputs, test images and code are unchanged
    since the results were written (otherwise such a re-run keeps them)."""
    mlflow: str | None = None
    """MLflow tracking server, http[s]://HOST[:PORT]: every training stage's per-epoch metrics also
    go to an MLflow run there, from rank 0 (experiment: the run's or the sweep's name; kdp.tracking)."""

    def __post_init__(self):
        if self.mlflow is not None:
            check_mlflow_uri(self.mlflow)
        one_of(self.bf16, SWITCH, "bf16 setting")
        one_of(self.channels_last, SWITCH, "channels_last setting")
        one_of(self.compile, COMPILE, "compile mode")
        positive(self, "time_limit")


