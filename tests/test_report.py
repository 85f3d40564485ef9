"""kdp.report: paper-shaped tables from known counts, plots, Figure 5 and the CLI hooks."""
from __future__ import annotations

import argparse
import struct

import pandas as pd
import pyarrow as pa
import pytest
import torch

from kdp import plots, report
from kdp.checkpoint import save_checkpoint
from kdp.models import build_model
from kdp.results import SCHEMA

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SWEEP_VARIANTS = ("at_teacher", "kd_at", "kd_nt", "kd_at_nt")  # a trial's variant is its sweep.variant


def _row(variant, attack, correct, n=100, threat="classifier", run="r1", **extra):
    return {"run": run, "variant": variant, "attack": attack, "threat_model": threat, "n": n,
            "correct": correct, "accuracy": correct / n, "git_sha": "abc123", "data.train_size": 5085,
            "classifier.test_acc": 0.9, "ae.eps": 8 / 255, **extra}


def _frame(rows):
    """SCHEMA rows; checks_ok/check_failures are added with pandas when any row gives them
    (SCHEMA may lack them)."""
    df = pa.Table.from_pylist(rows, schema=SCHEMA).to_pandas()
    for col in ("checks_ok", "check_failures"):
        if any(col in r for r in rows):
            df[col] = pd.Series([r.get(col) for r in rows], index=df.index, dtype=object)
    return df


def pipeline_rows():
    """Two unequal shards of one run (pgd8 kd_at_nt: 30/100 + 10/50 -> 26.67 pooled, not the
    25.0 mean of percentages), the baselines, and full / transfer rows (kd_at_nt, nrp)."""
    rows = [_row("none", "clean", 90), _row("kd_at_nt", "clean", 80),
            _row("none", "pgd8", 5), _row("kd_at_nt", "pgd8", 30), _row("kd_at_nt", "pgd8", 10, n=50),
            _row("at_teacher", "pgd8", 20),
            _row("kd_at", "pgd8", 25, **{"purifier.beta": 0.5, "purifier.gamma": 0.5}),
            _row("soap", "pgd8", 18), _row("nrp", "pgd8", 15), _row("jpeg", "pgd8", 12),
            _row("kd_at_nt", "pgd8", 1, threat="full"), _row("nrp", "pgd8", 3, threat="full"),
            _row("kd_at_nt", "fgsm", 44, threat="transfer")]
    return rows


def checked_rows():
    """pipeline_rows with checks: two nrp rows fail (one with two names), the rest pass."""
    fails = {("nrp", "classifier"): "grad_nonzero", ("nrp", "full"): "eot_variance, grad_nonzero"}
    return [{**r, "checks_ok": (r["variant"], r["threat_model"]) not in fails,
             "check_failures": fails.get((r["variant"], r["threat_model"]), "")} for r in pipeline_rows()]


def sweep_rows():
    """4 sweep variants x β in {0.5, 0.3} x ε = 8/255; correct encodes (variant, β)."""
    rows = []
    for i, variant in enumerate(SWEEP_VARIANTS):
        for beta, base in ((0.5, 10), (0.3, 60)):
            for attack in ("clean", "pgd8", "fgsm"):
                extra = {"trial_id": f"{variant}-{beta}", "sweep.variant": variant, "sweep.beta": beta,
                         "sweep.gamma": 0.5, "sweep.eps": 8 / 255 + 1e-9, "sweep.kd_space": "pixels"}
                rows.append(_row(variant, attack, base + i + (attack == "fgsm"), run="sweep", **extra))
    return rows


def _cells(md: str, first: str) -> list[str]:
    """The cells of the markdown table row whose first cell is `first`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{md}")


def _header(md: str) -> list[str]:
    return [c.strip() for c in next(l for l in md.splitlines() if l.startswith("|")).strip("|").split("|")]


def _tables(md: str) -> list[list[str]]:
    """The markdown tables of md, each as its lines."""
    tables, cur = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            tables, cur = tables + [cur], []
    return tables


def _first_column(md: str) -> list[str]:
    """The first cells of the first markdown table's body rows (header and separator skipped)."""
    return [l.split("|")[1].strip() for l in _tables(md)[0][2:]]


def test_table1_rows_in_order_with_pooled_values_per_threat_block():
    md = report.table1_markdown(_frame(pipeline_rows()))
    assert _header(md) == ["variant", "Original", "Purified clean", "PGD8", "full PGD8", "transfer FGSM", "checks"]
    assert _first_column(md) == ["none (undefended)", "JPEG", "NRP", "SOAP", "AT teacher", "student KD←AT+NT",
                                 "student KD←AT", "paper: NRP", "paper: SOAP", "paper: KD←AT+NT (ours)"]  # one label each
    student = dict(zip(_header(md), _cells(md, "student KD←AT+NT")))
    # Original: the undefended classifier's clean accuracy, in every row; Purified clean: the row's own
    assert student == {"variant": "student KD←AT+NT", "Original": "90.00", "Purified clean": "80.00",
                       "PGD8": "26.67", "full PGD8": "1.00", "transfer FGSM": "44.00", "checks": report.DASH}
    nrp = _cells(md, "NRP")
    assert nrp[1:6] == ["90.00", report.DASH, "15.00", "3.00", report.DASH]
    assert _cells(md, "JPEG")[3] == "12.00" and _cells(md, "SOAP")[3] == "18.00"
    assert _cells(md, "none (undefended)")[1:4] == ["90.00", "90.00", "5.00"]
    assert "surrogate" in md and "BPDA" in md and "paper's protocol" in md


def test_table1_paper_rows_only_in_classifier_block():
    md = report.table1_markdown(_frame(pipeline_rows()))
    head = _header(md)
    nrp = dict(zip(head, _cells(md, "paper: NRP")))
    assert (nrp["Original"], nrp["PGD8"]) == ("89.46", "35.07")
    # the paper never reports clean accuracy after purification
    assert nrp["Purified clean"] == nrp["full PGD8"] == nrp["transfer FGSM"] == nrp["checks"] == report.DASH
    assert dict(zip(head, _cells(md, "paper: SOAP")))["PGD8"] == "39.14"
    ours = dict(zip(head, _cells(md, "paper: KD←AT+NT (ours)")))
    assert ours["PGD8"] == "40.20" and ours["full PGD8"] == report.DASH


def test_table1_checks_column():
    md = report.table1_markdown(_frame(checked_rows()))
    assert _cells(md, "NRP")[-1] == "2 failed (eot_variance, grad_nonzero)"
    assert _cells(md, "student KD←AT+NT")[-1] == "ok" and _cells(md, "JPEG")[-1] == "ok"
    assert _cells(md, "paper: NRP")[-1] == report.DASH
    rows = checked_rows()
    for r in rows:
        if r["variant"] == "jpeg":
            r["checks_ok"], r["check_failures"] = None, None  # recorded no checks
        if r["variant"] == "soap":
            r["checks_ok"], r["check_failures"] = False, None  # failed, names unknown
    md = report.table1_markdown(_frame(rows))
    assert _cells(md, "JPEG")[-1] == report.DASH and _cells(md, "SOAP")[-1] == "1 failed"


def test_table1_from_sweep_only_uses_paper_setting():
    md = report.table1_markdown(_frame(sweep_rows()))
    assert _first_column(md)[:4] == ["AT teacher", "student KD←AT+NT", "student KD←AT", "student KD←NT"]
    assert "JPEG" not in _first_column(md)
    cells = dict(zip(_header(md), _cells(md, "student KD←AT+NT")))
    assert cells["PGD8"] == "13.00"  # β=0.5 trial (10+3), not pooled with β=0.3 (63)
    assert "full PGD8" not in _header(md) and "surrogate" not in md


@pytest.mark.parametrize("beta, base", [(0.5, 10), (0.3, 60)])
def test_table2_picks_requested_beta(beta, base):
    md = report.table2_markdown(_frame(sweep_rows() + pipeline_rows()), beta=beta)
    assert _header(md) == ["variant", "PGD8", "FGSM"]
    assert _cells(md, "AT, no KD")[1:] == [f"{base:.2f} (34.16)", f"{base + 1:.2f} (38.07)"]
    assert _cells(md, "KD ← AT+NT")[1:] == [f"{base + 3:.2f} (40.20)", f"{base + 4:.2f} (40.12)"]
    assert "4 trial(s)" in md


def test_table2_falls_back_to_pipeline_variants_and_notes_no_match():
    df = _frame(pipeline_rows())
    md = report.table2_markdown(df)
    assert _cells(md, "AT, no KD")[1] == "20.00 (34.16)"
    assert _cells(md, "KD ← AT")[1] == "25.00 (35.46)"
    assert _cells(md, "KD ← AT+NT")[1] == "26.67 (40.20)"
    assert "KD ← NT" not in md
    other = report.table2_markdown(df, beta=0.9)  # kd_at has β=0.5; the others have no β
    assert _cells(other, "AT, no KD")[1] == "20.00 (34.16)"
    with pytest.raises(AssertionError, match="no row"):
        _cells(other, "KD ← AT")
    note = report.table2_markdown(df, eps=4 / 255)
    assert "|" not in note and "no classifier-threat-model rows at β=0.5, γ=0.5, ε=4/255" in note


def test_plots_write_pngs(tmp_path):
    df = _frame(sweep_rows() + pipeline_rows())
    for fn, name in ((plots.plot_attacks, "a.png"), (plots.plot_grid, "g.png")):
        path = fn(df, tmp_path / name)
        assert path == tmp_path / name and path.read_bytes()[:8] == PNG_MAGIC
    assert plots.plot_grid(_frame(pipeline_rows()), tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "g.png"]  # no temp files left


def test_write_report_links_existing_pngs(tmp_path):
    path = report.write_report(_frame(pipeline_rows()), tmp_path / "rep")
    text = path.read_text()
    assert path == tmp_path / "rep" / "report.md"
    assert "(attacks.png)" in text and "grid.png" not in text  # no sweep rows -> no grid plot
    assert (tmp_path / "rep" / "attacks.png").read_bytes()[:8] == PNG_MAGIC
    assert text.count("## Table 1") == 1 and "full PGD8" in text and "## Table 2" in text
    assert "rows: 13; runs: 1;" in text and "abc123" in text and "5085" in text
    assert "## Sanity checks\n\nNo sanity-check columns in these results." in text
    full = report.write_report(_frame(sweep_rows() + pipeline_rows()), tmp_path / "rep2").read_text()
    assert "(grid.png)" in full and "trials: 8" in full


def test_write_report_lists_failed_sanity_checks(tmp_path):
    text = report.write_report(_frame(checked_rows()), tmp_path / "rep").read_text()
    section = text.split("## Sanity checks", 1)[1]
    assert "2 row(s) with failed sanity checks" in section
    assert _header(section) == ["run", "variant", "attack", "threat_model", "check_failures", "rows"]
    rows = [r for r in section.splitlines() if r.startswith("| r1")]
    assert rows == ["| r1 | nrp | pgd8 | classifier | grad_nonzero | 1 |",
                    "| r1 | nrp | pgd8 | full | eot_variance, grad_nonzero | 1 |"]
    passing = [{**r, "checks_ok": True, "check_failures": ""} for r in pipeline_rows()]
    ok = report.write_report(_frame(passing), tmp_path / "rep2").read_text()
    assert "## Sanity checks\n\nAll recorded sanity checks passed." in ok


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("models")
    clf_spec = {"kind": "classifier", "name": "resnet8", "kwargs": {"width": 4}}
    pur_spec = {"kind": "purifier", "name": "cae", "kwargs": {"depth": 1, "width": 4}}
    clf = save_checkpoint(d / "clf", build_model("classifier", "resnet8", width=4), clf_spec, {})
    pur = save_checkpoint(d / "pur", build_model("purifier", "cae", depth=1, width=4), pur_spec, {})
    return pur, clf


def test_figure5_images_within_budget(tiny_models, tiny_data):
    from kdp.checkpoint import load_frozen
    from kdp.data import to_float

    pur, clf = (load_frozen(p) for p in tiny_models)
    x, y = to_float(tiny_data.test_x[:4]), tiny_data.test_y[:4]
    x0, x_adv, x_pur = plots.figure5_images(pur, clf, x, y, "pgd8")
    assert x_adv.shape == x_pur.shape == x.shape and torch.equal(x0, x)
    assert (x_adv - x).abs().max() <= 8 / 255 + 1e-6 and (x_adv != x).any()
    assert x_pur.min() >= 0 and x_pur.max() <= 1


def test_figure5_png_has_three_rows(tiny_models, tiny_data, tmp_path):
    path = plots.figure5(*tiny_models, tiny_data, tmp_path / "f5.png", n=3, attack="fgsm")
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC
    width, height = struct.unpack(">II", raw[16:24])  # IHDR
    assert (width, height) == (int(1.3 * 3 * 100), 500)


def _args(path, **kw):
    p = argparse.ArgumentParser()
    report.add_report_args(p)
    argv = [str(path)] + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    return p.parse_args(argv)


def test_report_command_errors(tmp_path):
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        report.report_command(_args(missing, out=tmp_path / "o"))
    with pytest.raises(ValueError, match="missing --classifier, --data-dir"):
        report.report_command(_args(missing, purifier=tmp_path))
    with pytest.raises(ValueError, match="'bogus'"):
        report.report_command(_args(missing, attack="bogus"))


def test_report_command_writes_report(tmp_path, tiny_models, cifar_subset_dir, capsys):
    from kdp.results import write_results

    res = write_results(pipeline_rows(), tmp_path / "r.parquet")
    pur, clf = tiny_models
    report.report_command(_args(res, out=tmp_path / "o", purifier=pur, classifier=clf,
                                data_dir=cifar_subset_dir, attack="fgsm"))
    assert capsys.readouterr().out.strip() == f"report: {tmp_path / 'o' / 'report.md'}"
    text = (tmp_path / "o" / "report.md").read_text()
    assert "(figure5.png)" in text and (tmp_path / "o" / "figure5.png").read_bytes()[:8] == PNG_MAGIC


def test_figure5_finds_a_trials_classifier_and_data(tmp_path, tiny_models, cifar_subset_dir):
    """--purifier alone: a sweep trial's trial.json names its classifier and data."""
    import json
    import shutil

    from kdp.results import write_results

    pur, clf = tiny_models
    trial = tmp_path / "trials" / "t0"
    shutil.copytree(pur, trial / "student")
    (trial / "trial.json").write_text(json.dumps({"inputs": {"classifier": str(clf)},
                                                  "config": {"data": {"data_dir": str(cifar_subset_dir)}}}))
    res = write_results(pipeline_rows(), tmp_path / "r.parquet")
    report.report_command(_args(res, out=tmp_path / "o", purifier=trial / "student"))
    assert (tmp_path / "o" / "figure5.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="missing --classifier, --data-dir"):
        report.report_command(_args(res, out=tmp_path / "o2", purifier=pur))  # no trial.json beside it


def _bits(correct: int, n: int, shift: int = 0) -> str:
    """A hit string with `correct` ones out of n, rotated by shift."""
    b = "1" * correct + "0" * (n - correct)
    return b[shift:] + b[:shift]


def seeded_rows():
    """Three seeds (runs) of a run: at_teacher and kd_at_nt on pgd8 (kd_at_nt clearly higher on
    the same images), kd_at equal to at_teacher, and each variant's clean row."""
    rows = []
    for seed in range(3):
        run = f"r-seed{seed}"
        common = dict(n=200, run=run, seed=seed, **{"purifier.beta": 0.5, "purifier.gamma": 0.5})
        for v, c in (("none", 180), ("at_teacher", 170), ("kd_at", 170), ("kd_at_nt", 175)):
            rows.append(_row(v, "clean", c, hits=_bits(c, 200), agree=c - 5, **common))
        for v, c in (("none", 2), ("at_teacher", 60 + seed), ("kd_at", 60 + seed), ("kd_at_nt", 120 + seed)):
            rows.append(_row(v, "pgd8", c, hits=_bits(c, 200), agree=c, **common,
                             **{"attack.settings": "PGD 20 steps, random start"}))
    return rows


def test_cells_carry_bootstrap_intervals_and_agreement():
    md = report.table1_markdown(_frame(seeded_rows()))
    head = _header(md)
    student = dict(zip(head, _cells(md, "student KD←AT+NT")))
    mean, hw = student["PGD8"].split(" ± ")
    assert float(mean) == pytest.approx(100 * (120 + 121 + 122) / 600, abs=0.01)
    assert 3 < float(hw) < 12  # about 1.96 * sqrt(.6 * .4 / 200) * 100 = 6.8 over images
    assert dict(zip(head, _cells(md, "none (undefended)")))["Original"].startswith("90.00 ± ")
    agreement = _tables(md)[1]
    assert agreement[0].startswith("| variant | Purified clean | PGD8")
    assert "| student KD←AT+NT | 85.00 | 60.50 |" in agreement  # pooled agree / n
    assert "PGD 20 steps, random start, 200 images" in md  # the suite line


def test_table2_marks_differences_beyond_noise():
    md = report.table2_markdown(_frame(seeded_rows()))
    pgd8 = {r: _cells(md, r)[1] for r in ("AT, no KD", "KD ← AT", "KD ← AT+NT")}
    assert "▲" in pgd8["KD ← AT+NT"] and "(40.20)" in pgd8["KD ← AT+NT"]
    assert "▲" not in pgd8["KD ← AT"] and "▼" not in pgd8["KD ← AT"]  # identical to AT: no mark
    assert "▲" not in pgd8["AT, no KD"]
    assert " ± " in pgd8["KD ← AT"]


def test_rows_without_hits_get_no_interval():
    md = report.table1_markdown(_frame(pipeline_rows()))
    assert all(" ± " not in line for t in _tables(md) for line in t)


def test_names_of_older_files_load_as_todays(tmp_path):
    """Files written before a rename (threat models `blind`, `end_to_end`; the sweep variant
    `at_only`) load with today's names, so old results still make one table."""
    from kdp.results import load, write_results

    rows = [_row("at_teacher", "pgd8", 10, threat="blind", **{"sweep.variant": "at_only", "trial_id": "t"}),
            _row("none", "pgd8", 5, threat="end_to_end")]
    df = load(write_results(rows, tmp_path / "old.parquet"))
    assert sorted(df.threat_model) == ["classifier", "full"]
    assert df["sweep.variant"].dropna().tolist() == ["at_teacher"]
