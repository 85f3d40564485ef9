"""kdp.config and kdp.presets: paper defaults, validation, CLI overrides, flattening."""
from __future__ import annotations

import dataclasses

import pytest

from kdp.attacks import PAPER_SUITE
from kdp.baselines.jpeg import JpegConfig
from kdp.baselines.nrp import NRPConfig
from kdp.baselines.soap import SoapConfig
from kdp.config import AEConfig, ClassifierConfig, DataConfig, EvalConfig, Runtime, StudentConfig, TeacherConfig
from kdp.pipeline_config import PipelineConfig
from kdp.configio import flatten, override, parse_seeds, replicate
from kdp.presets import PRESETS, get_preset


def test_paper_defaults():
    t = TeacherConfig()
    assert (t.lr, t.batch_size, t.epochs) == (0.01, 128, 100)
    assert (t.depth, t.width, t.kind, t.head) == (15, 64, "at", "literal")
    s = StudentConfig()
    assert s.epochs == 40 and s.beta == 0.5 and s.gamma == 0.5
    assert s.kd_space == "pixels" and s.teachers == ("at", "nt") and s.lr == 0.01 and s.batch_size == 128
    a = AEConfig()
    assert a.eps == pytest.approx(8 / 255) and a.alpha == pytest.approx(2 / 255) and a.steps == 20
    assert a.attack == "pgd8"
    assert ClassifierConfig().arch == "resnet56"
    e = EvalConfig()
    assert e.attacks == PAPER_SUITE + ("aa-standard",)  # the paper's suite, plus full-strength AutoAttack
    assert e.adaptive_attacks == ("pgd100", "aa-standard") and e.aa_subset == 200
    p = PipelineConfig()
    assert [st.variant for st in p.students] == ["kd_at", "kd_nt", "kd_at_nt"]
    assert p.at_teacher.kind == "at" and p.nt_teacher.kind == "nt"


@pytest.mark.parametrize("make,fragment", [
    (lambda: AEConfig(eps=-0.5), "-0.5"),
    (lambda: AEConfig(alpha=-0.25), "-0.25"),
    (lambda: AEConfig(attack="cw"), "'cw'"),
    (lambda: AEConfig(steps=0), "steps must be > 0, got 0"),
    (lambda: ClassifierConfig(arch="vgg11"), "'vgg11'"),
    (lambda: ClassifierConfig(momentum=1.5), "1.5"),
    (lambda: TeacherConfig(kind="xt"), "'xt'"),
    (lambda: TeacherConfig(head="sigmoid"), "'sigmoid'"),
    (lambda: StudentConfig(teachers=("at", "xt")), "'xt'"),
    (lambda: StudentConfig(teachers=()), "teachers"),
    (lambda: StudentConfig(teachers=("at", "at")), "('at', 'at')"),
    (lambda: StudentConfig(kd_space="features"), "'features'"),
    (lambda: StudentConfig(beta=-1.0), "-1.0"),
    (lambda: EvalConfig(attacks=("pgd8", "deepfool")), "'deepfool'"),
    (lambda: EvalConfig(transfer_attacks=("pgd9",)), "'pgd9'"),
    (lambda: EvalConfig(threat_models=("blind",)), "'blind'"),
    (lambda: EvalConfig(min_attack_success=1.5), "1.5"),
    (lambda: EvalConfig(eot_samples=0), "eot_samples must be > 0, got 0"),
    (lambda: JpegConfig(quality=0), "got 0"),
    (lambda: NRPConfig(ssp_eps=-0.1), "-0.1"),
    (lambda: SoapConfig(aux="rot"), "'rot'"),
    (lambda: SoapConfig(arch="vgg"), "'vgg'"),
    (lambda: PipelineConfig(baselines=("jpeg", "jpeg")), "repeated"),
    (lambda: DataConfig(n_train=0), "n_train must be > 0, got 0"),
    (lambda: EvalConfig(aa_subset=0), "aa_subset must be > 0, got 0"),
    (lambda: EvalConfig().check_test_size(100), "eval.aa_subset=200 is larger than the test set (100"),
    (lambda: parse_seeds("0,one"), "'0,one'"),
    (lambda: parse_seeds(" "), "at least one"),
    (lambda: replicate(PipelineConfig(), 1, scope="classifier"), "'classifier'"),
    (lambda: PipelineConfig(name="a/b"), "'a/b'"),
    (lambda: PipelineConfig(students=(StudentConfig(teachers=("at",)), StudentConfig(teachers=("at",)))),
     "kd_at"),
])
def test_validation_names_bad_value(make, fragment):
    with pytest.raises(ValueError) as e:
        make()
    assert fragment in str(e.value)


def test_unknown_arch_lists_valid():
    with pytest.raises(ValueError, match="resnet56") as e:
        ClassifierConfig(arch="vgg")
    assert "resnet20" in str(e.value)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        AEConfig().eps = 0.1


def test_replicate_reseeds_what_depends_on_the_seed():
    base = get_preset("smoke")
    r = replicate(base, 3)
    assert (r.name, r.seed) == ("smoke-seed3", 3)
    assert {r.at_teacher.seed, r.nt_teacher.seed, r.nrp.seed, r.soap.seed, r.eval.seed} == {3}
    assert all(s.seed == 3 for s in r.students)
    # shared by every replicate: the classifier, the surrogate and the training AEs
    assert (r.classifier, r.surrogate, r.ae) == (base.classifier, base.surrogate, base.ae)
    everything = replicate(base, 3, scope="all")
    assert everything.classifier.seed == 3 and everything.ae.seed == 3 and everything.surrogate == base.surrogate
    assert flatten(r)["seed"] == 3 and flatten(base)["seed"] is None
    assert parse_seeds("0, 1,2") == (0, 1, 2)
    # no aa-standard in the suite: a small test set is fine
    PipelineConfig(data=DataConfig(n_test=10), eval=EvalConfig(attacks=("pgd8",), adaptive_attacks=("pgd100",)))


def test_override_values():
    cfg = PipelineConfig()
    c = override(cfg, "ae.eps=4/255")
    assert c.ae.eps == pytest.approx(4 / 255, rel=1e-12) and type(c.ae.eps) is float  # not a Fraction or str
    assert cfg.ae.eps == pytest.approx(8 / 255)  # the original is untouched
    c = override(cfg, "students.beta=0.3")
    assert [s.beta for s in c.students] == [0.3, 0.3, 0.3]
    assert [s.gamma for s in c.students] == [0.5, 0.5, 0.5]
    c = override(override(cfg, "data.n_train=100"), "data.n_train=none")
    assert c.data.n_train is None
    assert override(cfg, "data.n_train=100").data.n_train == 100
    c = override(cfg, "eval.attacks=pgd8+fgsm")
    assert c.eval.attacks == ("pgd8", "fgsm")
    assert override(cfg, "classifier.epochs=3").classifier.epochs == 3
    assert override(cfg, "name=run2").name == "run2"
    assert override(cfg, "data.data_dir=/tmp/x").data.data_dir == "/tmp/x"
    assert override(cfg, "at_teacher.adv_score=logit").at_teacher.adv_score == "logit"


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("false", False),
                                        ("FALSE", False), ("0", False)])
def test_override_bool(text, value):
    assert override(Runtime(), f"rescore={text}").rescore is value
    assert override(PipelineConfig(), f"classifier.nesterov={text}").classifier.nesterov is value


def test_override_errors():
    cfg = PipelineConfig()
    with pytest.raises(ValueError, match="bad value for rescore"):
        override(Runtime(), "rescore=yes")
    with pytest.raises(ValueError) as e:
        override(cfg, "ae.epz=1")
    assert "'epz'" in str(e.value) and "eps" in str(e.value) and "alpha" in str(e.value)
    with pytest.raises(ValueError) as e:
        override(cfg, "teacher.lr=0.1")
    assert "at_teacher" in str(e.value) and "students" in str(e.value)
    with pytest.raises(ValueError, match="key=value"):
        override(cfg, "ae.eps")
    with pytest.raises(ValueError, match=r"bad value for (classifier\.)?epochs.*'many'"):
        override(cfg, "classifier.epochs=many")
    with pytest.raises(ValueError, match=r"AEConfig\.eps must be >= 0, got -0\.0039"):
        override(cfg, "ae.eps=-1/255")  # validation runs on the new config
    with pytest.raises(ValueError, match="'nope'"):
        override(cfg, "eval.attacks=pgd8+nope")


def test_flatten():
    flat = flatten(PipelineConfig())
    assert flat["ae.eps"] == pytest.approx(8 / 255)
    assert flat["classifier.arch"] == "resnet56"
    assert flat["eval.attacks"] == "pgd8+pgd16+fgsm+bim+cw+autoattack+aa-standard"
    assert flat["eval.adaptive_attacks"] == "pgd100+aa-standard" and flat["eval.threat_models"] == "classifier+full+transfer"
    assert flat["data.n_train"] is None and flat["name"] == "kdp"
    assert "students" not in flat  # a tuple of configs has no single column
    cfg = PipelineConfig()
    for key, value in flat.items():  # every column is the config's own value, under its dotted path
        obj = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        assert value == ("+".join(map(str, obj)) if isinstance(obj, tuple) else obj), key
        assert value is None or type(value) in (str, int, float, bool), key
    sections = [f.name for f in dataclasses.fields(PipelineConfig) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    for sec in sections:
        assert {k for k in flat if k.startswith(sec + ".")} == {f"{sec}.{f.name}" for f in
                                                                  dataclasses.fields(getattr(cfg, sec))}
    assert flatten(StudentConfig())["teachers"] == "at+nt"
    assert flatten(StudentConfig(teachers=("nt",)))["teachers"] == "nt"
    assert set(flatten(AEConfig())) == {f.name for f in dataclasses.fields(AEConfig)}


def test_paper_preset():
    p = get_preset("paper")
    assert p.name == "paper" and p.preset == "paper"
    assert p.data == DataConfig()  # all of CIFAR-10
    assert p.classifier.arch == "resnet56"
    assert (p.ae.eps, p.ae.alpha, p.ae.steps) == (pytest.approx(8 / 255), pytest.approx(2 / 255), 20)
    for t in (p.at_teacher, p.nt_teacher):
        assert (t.depth, t.width, t.epochs, t.batch_size, t.lr) == (15, 64, 100, 128, 0.01)
    assert [s.teachers for s in p.students] == [("at",), ("nt",), ("at", "nt")]
    for s in p.students:
        assert (s.epochs, s.beta, s.gamma, s.lr, s.batch_size, s.depth) == (40, 0.5, 0.5, 0.01, 128, 15)
        assert s.kd_space == "pixels"
    assert p.eval.attacks == PAPER_SUITE + ("aa-standard",)


def test_all_presets_build():
    assert set(PRESETS) == {"paper", "smoke", "reduced", "demo", "tiny"}
    for name in PRESETS:
        cfg = get_preset(name)
        assert type(cfg) is PipelineConfig
        assert (cfg.name, cfg.preset) == (name, name)
        assert get_preset(name) == cfg and get_preset(name) is not cfg  # a fresh, deterministic config
        assert [s.variant for s in cfg.students] == ["kd_at", "kd_nt", "kd_at_nt"]
        assert (cfg.at_teacher.kind, cfg.nt_teacher.kind) == ("at", "nt")
        assert cfg.surrogate.seed != cfg.classifier.seed  # the transfer source is another model
        same = {"epochs", "seed"} if name in ("demo", "tiny") else {"seed"}  # these train it shorter
        assert {k: v for k, v in flatten(cfg.surrogate).items() if k not in same} == \
            {k: v for k, v in flatten(cfg.classifier).items() if k not in same}
    assert len({repr(sorted(flatten(get_preset(n)).items())) for n in PRESETS}) == len(PRESETS)  # all differ


def test_smoke_preset():
    """The sizes the README's preset table states for `smoke`."""
    p = get_preset("smoke")
    assert (p.classifier.arch, p.classifier.width, p.classifier.epochs) == ("resnet8", 16, 15)
    assert (p.data.n_train, p.data.n_test) == (None, 200)
    assert p.ae.steps == 7 and p.ae.eps == pytest.approx(8 / 255)
    for t in (p.at_teacher, p.nt_teacher, *p.students):
        assert (t.depth, t.width, t.epochs, t.batch_size) == (4, 16, 3, 128)
    assert [s.teachers for s in p.students] == [("at",), ("nt",), ("at", "nt")]
    assert (p.nrp.epochs, p.soap.arch, p.soap.epochs) == (3, "resnet8", 15)
    assert (p.at_classifier.arch, p.at_classifier.epochs, p.at_classifier.steps, p.at_classifier.passes) == \
        ("resnet8", 15, 7, 120)
    assert (p.e2e_at.depth, p.e2e_at.width, p.e2e_at.epochs, p.e2e_at.steps, p.e2e_at.gamma) == (4, 16, 3, 7, 0.0)
    assert p.eval.attacks == PAPER_SUITE + ("aa-standard",) and p.eval.batch_size == 100
    assert p.eval.adaptive_attacks == ("pgd8", "aa-standard") and p.eval.aa_subset == 50


def test_demo_is_a_lighter_smoke_with_every_stage_and_attack():
    smoke, demo = get_preset("smoke"), get_preset("demo")
    assert (demo.data.n_train, demo.data.n_test, demo.eval.aa_subset) == (2048, 100, 10)
    assert demo.eval.attacks == smoke.eval.attacks and demo.eval.threat_models == smoke.eval.threat_models
    assert demo.eval.adaptive_attacks == ("pgd8",)
    assert demo.baselines == tuple(b for b in smoke.baselines if b not in ("at_classifier", "e2e_at"))
    assert (demo.classifier.epochs, demo.surrogate.epochs, demo.soap.epochs, demo.nrp.epochs) == (10, 4, 6, 2)
    differ = {k for k, v in flatten(demo).items() if flatten(smoke)[k] != v}
    assert differ == {"name", "preset", "data.n_train", "data.n_test", "classifier.epochs", "surrogate.epochs",
                      "soap.epochs", "nrp.epochs", "eval.aa_subset", "eval.adaptive_attacks", "eval.eps_curve",
                      "eval.indicator_subset", "baselines"}


def test_tiny_runs_every_stage_attack_and_threat_model():
    t = get_preset("tiny")
    assert t.baselines == get_preset("paper").baselines and t.eval.threat_models == get_preset("paper").eval.threat_models
    assert {"at_classifier", "e2e_at"} <= set(t.baselines)
    assert t.eval.attacks == PAPER_SUITE + ("aa-standard",) and t.eval.aa_subset == 4
    assert (t.data.n_train, t.data.n_test) == (1024, 32)


def test_reduced_preset():
    """`reduced`: the paper's model sizes, fewer epochs (README: classifier 80, teachers 30, students 15)."""
    p = get_preset("reduced")
    assert p.data == DataConfig()
    assert (p.classifier.arch, p.classifier.epochs, p.surrogate.arch, p.soap.epochs) == ("resnet56", 80, "resnet56", 80)
    for t in (p.at_teacher, p.nt_teacher):
        assert (t.depth, t.width, t.epochs) == (15, 64, 30)
    assert [(s.depth, s.width, s.epochs) for s in p.students] == [(15, 64, 15)] * 3
    assert p.eval.attacks == PAPER_SUITE + ("aa-standard",)


def test_unknown_preset():
    with pytest.raises(ValueError) as e:
        get_preset("huge")
    assert "'huge'" in str(e.value) and "smoke" in str(e.value) and "paper" in str(e.value)


def test_set_students_picks_them_by_teacher_set():
    from kdp.configio import override

    tiny = get_preset("tiny")
    picked = override(tiny, "students=at+nt,nt")
    assert [s.variant for s in picked.students] == ["kd_at_nt", "kd_nt"]
    assert all(s.epochs == tiny.students[0].epochs and s.width == 8 for s in picked.students)  # the preset's settings
    assert override(tiny, "students=").students == ()  # none: teachers and baselines only
    with pytest.raises(ValueError, match="bad value for students: 'at,,nt'"):
        override(tiny, "students=at,,nt")
    with pytest.raises(ValueError, match="'xt'"):
        override(tiny, "students=at+xt")
