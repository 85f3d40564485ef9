"""Result tables: one parquet row per (run, purifier variant, attack, threat model).

A row holds the flattened pipeline config, the variant's purifier config under
`purifier.*`, the counts and accuracy, the per-image outcome (`hits` from test image
`first` on), what the attack ran (`attack.*`), and provenance. The schema is fixed (`SCHEMA`),
so tables from many runs and sweep trials concatenate. Files are written under a
temporary name and renamed.
"""
from __future__ import annotations

import typing
import uuid
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from kdp.cells import CURVE
from kdp.files import atomic_path
from kdp.baselines import BASELINES
from kdp.config import AEConfig, ClassifierConfig, DataConfig, EvalConfig, StudentConfig, TeacherConfig, ThreatModel
from kdp.pipeline_config import PipelineConfig
from kdp.configio import flatten
from kdp.provenance import PACKAGES
from kdp.errors import DataError, NotFoundError, StorageError
from kdp.indicators import INDICATORS
from kdp.sweep_space import KNOBS
from kdp.trace import PROBE_KEYS, TRACE_KEYS

_ARROW = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


def _fields(cls, prefix: str) -> list[pa.Field]:
    out = []
    for name, hint in typing.get_type_hints(cls).items():
        base = [hint] if typing.get_origin(hint) is tuple else [a for a in typing.get_args(hint)
                                                                 if a is not type(None)] or [hint]
        base = typing.get_origin(base[0]) or base[0]  # a tuple is its flattened 'x+y' text
        out.append(pa.field(prefix + name, pa.string() if base is tuple else _ARROW[base]))
    return out


# A teacher's or student's row: its kind, then every field of either config (a new knob has its
# column without a word here), each once
PURIFIER_FIELDS = [pa.field("purifier.kind", pa.string())] + list({
    f.name: f for f in _fields(StudentConfig, "purifier.") + _fields(TeacherConfig, "purifier.")
    if f.name != "purifier.kind"}.values())
METRIC_FIELDS = [pa.field(n, t) for n, t in (
    ("variant", pa.string()), ("attack", pa.string()), ("threat_model", pa.string()), ("n", pa.int64()),
    ("correct", pa.int64()), ("agree", pa.int64()), ("accuracy", pa.float64()), ("agreement", pa.float64()),
    ("seconds", pa.float64()), ("attack_seconds", pa.float64()), ("linf_max", pa.float64()),
    ("classifier.test_acc", pa.float64()), ("data.source", pa.string()), ("data.train_size", pa.int64()),
    ("wall_seconds", pa.float64()), ("first", pa.int64()), ("hits", pa.string()))]
# How the attack got its gradient (full threat model) and the sanity checks (kdp.stages.evaluate).
CHECK_FIELDS = [pa.field(n, t) for n, t in (
    ("attack.settings", pa.string()), ("attack.steps", pa.int64()), ("attack.restarts", pa.int64()),
    ("attack.cached", pa.bool_()), ("attack.grad", pa.string()), ("attack.eot", pa.int64()), ("attack.same_as", pa.string()), ("check.eval_mode", pa.bool_()),
    ("check.in_range", pa.bool_()), ("check.grad_norm", pa.float64()), ("check.grad_nonzero", pa.bool_()),
    ("check.src_correct", pa.int64()), ("check.src_fooled", pa.int64()), ("check.attack_success", pa.float64()),
    ("check.attack_ok", pa.bool_()), ("check.linf_ok", pa.bool_()), ("checks_ok", pa.bool_()),
    ("check_failures", pa.string()))]
# What the attack did (kdp.trace, counts summed over shards) and the indicators of attack failure
# (kdp.indicators: True = fired, None = does not apply), with the fired ones and their counts in words.
INDICATOR_FIELDS = ([pa.field(k, pa.int64()) for k in TRACE_KEYS + PROBE_KEYS]
                    + [pa.field(f"indicator.{n}", pa.bool_()) for n in INDICATORS]
                    + [pa.field("indicators", pa.string()), pa.field("indicator_notes", pa.string())])
PROVENANCE_FIELDS = [pa.field(n, pa.string()) for n in (
    "git_sha", "python", "host", "device", "utc", "accel", *(f"{p}_version" for p in PACKAGES))]
# A sweep trial's identity and hyperparameters (null outside sweeps). The sweep id itself is
# the hive partition directory `sweep_id=<id>`, not a column of the files.
SWEEP_FIELDS = [pa.field("trial_id", pa.string())] + [
    pa.field(f"sweep.{k.param}", _ARROW[k.type]) for k in KNOBS] + [
    pa.field("stopped_epoch", pa.int64())]  # the epoch early stopping ended the trial at; null: it ran to the end
SCHEMA = pa.schema(
    [pa.field("run", pa.string()), pa.field("preset", pa.string()), pa.field("seed", pa.int64())] + METRIC_FIELDS + CHECK_FIELDS
    + INDICATOR_FIELDS
    + _fields(DataConfig, "data.") + _fields(ClassifierConfig, "classifier.") + _fields(AEConfig, "ae.")
    + _fields(TeacherConfig, "at_teacher.") + _fields(TeacherConfig, "nt_teacher.")
    + _fields(ClassifierConfig, "surrogate.") + [pa.field("baselines", pa.string())]
    + [f for name, d in BASELINES.items() for f in _fields(d.config, f"{name}.")]
    + _fields(EvalConfig, "eval.") + PURIFIER_FIELDS + SWEEP_FIELDS + PROVENANCE_FIELDS)
KEY_META = b"kdp.results_key"  # parquet metadata: what the rows were computed from
# Names in files written by older kdp versions (the same things, renamed), by column.
OLD_NAMES = {"threat_model": {"blind": ThreatModel.CLASSIFIER.value, "end_to_end": ThreatModel.FULL.value},
             "sweep.variant": {"at_only": "at_teacher"}}


def purifier_columns(cfg) -> dict:
    """The `purifier.*` columns of a variant: None (no defense), a teacher, a student or a
    baseline (its full config is also in its <name>.* columns)."""
    if cfg is None:
        return {"purifier.kind": "none"}
    cols = {f"purifier.{k}": v for k, v in flatten(cfg).items()
            if f"purifier.{k}" in SCHEMA.names and k != "kind"}
    kinds = {d.config: name for name, d in BASELINES.items()}
    kind = kinds.get(type(cfg)) or (cfg.kind if isinstance(cfg, TeacherConfig) else "student")
    cols["purifier.kind"] = kind
    return cols


def make_rows(cfg: PipelineConfig, variants: dict, eval_rows: list[dict], extra: dict) -> list[dict]:
    """Join evaluation rows with config columns; `variants` maps variant -> its config or None."""
    base = {k: v for k, v in flatten(cfg).items() if k in SCHEMA.names}
    base["run"] = cfg.name
    return [{**base, **purifier_columns(variants[r["variant"]]), **extra, **r} for r in eval_rows]


def write_results(rows: list[dict], path: str | Path, key: str | None = None) -> Path:
    """Write rows with the fixed schema to `path` (a .parquet file) atomically; `key` (what
    the rows were computed from, see `results_key`) goes into the file's metadata."""
    unknown = sorted({k for r in rows for k in r} - set(SCHEMA.names))
    if unknown:
        raise ValueError(f"result columns not in the schema: {unknown}")
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    if key is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), KEY_META: key.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)


def results_key(path: str | Path) -> str | None:
    """The key `write_results` stored in a results file (None: no file, or none stored)."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    return meta.get(KEY_META, b"").decode() or None


def unique_name(prefix: str) -> str:
    """A file name no other writer will pick: for many writers into one directory."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}.parquet"


def _sweep_of(file: PurePosixPath) -> str | None:
    """The sweep id of a file from its hive partition directory `sweep_id=<id>`, if any."""
    for parent in file.parents:
        if parent.name.startswith("sweep_id="):
            return parent.name.split("=", 1)[1]
    return None


def _parquet_files(path: str | Path):
    """(filesystem, the .parquet files under `path`: local, or in a bucket when it is a URI)."""
    import pyarrow.fs as pafs

    from kdp.storage import is_uri, open_storage

    if is_uri(path):
        store = open_storage(path)
        fs, base = store.fs, store.base
    else:
        fs, base = pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    try:
        info = fs.get_file_info(base)
        found = ([] if info.type == pafs.FileType.NotFound else [info] if info.type == pafs.FileType.File
                 else fs.get_file_info(pafs.FileSelector(base, recursive=True)))
    except OSError as e:
        from kdp.bucket_io import why
        raise StorageError(f"{path}: {why(e)}") from None
    if info.type == pafs.FileType.NotFound:
        raise NotFoundError(f"{path}: no results here")
    files = sorted(f.path for f in found if f.path.endswith(".parquet") and f.type == pafs.FileType.File
                   and not any(part.startswith(".") for part in PurePosixPath(f.path).relative_to(base).parts))
    if not files:
        raise NotFoundError(f"{path}: no .parquet files under it")
    return fs, files


def load(path: str | Path, as_table: bool = False):
    """Every result row under `path` as one pandas DataFrame (a pyarrow Table with as_table).

    `path` is a results .parquet file, a sweep partition (`.../results/sweep_id=<id>`), a
    results root holding many sweeps, or any directory tree of runs; local, or in a bucket
    (`s3://bucket/prefix`, read in place: kdp.storage). Columns are SCHEMA plus `sweep_id`
    (null outside sweeps); files written before a column existed read it as null.
    """
    fs, files = _parquet_files(path)
    groups: dict[str | None, list[str]] = {}
    for f in files:
        groups.setdefault(_sweep_of(PurePosixPath(f)), []).append(f)
    parts = []
    for sweep, group in groups.items():
        try:
            t = ds.dataset(group, schema=SCHEMA, format="parquet", filesystem=fs).to_table()
        except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
            raise DataError(f"{path}: cannot read results ({str(e).splitlines()[0]})") from None
        parts.append(t.append_column("sweep_id", pa.array([sweep] * len(t), pa.string())))
    table = _rename_old(pa.concat_tables(parts))
    return table if as_table else table.to_pandas()


def _rename_old(table: pa.Table) -> pa.Table:
    for col, old in OLD_NAMES.items():
        names = table.column(col).to_pylist()
        if any(n in old for n in names):
            new = pa.array([old.get(n, n) for n in names], pa.string())
            table = table.set_column(table.schema.get_field_index(col), col, new)
    return table


def table1(df, threat_model: str = ThreatModel.CLASSIFIER):
    """Accuracy (%) pivot: rows are attacks, columns purifier variants (paper Table 1/2 layout)."""
    sub = df[(df["threat_model"] == threat_model) & ~df["attack"].isin(CURVE)]
    agg = sub.groupby(["run", "attack", "variant"], sort=False)[["correct", "n"]].sum()
    acc = (100 * agg["correct"] / agg["n"]).rename("accuracy").reset_index()
    return acc.pivot_table(index=["run", "attack"], columns="variant", values="accuracy", sort=False)


def print_tables(paths) -> None:
    """Where the rows are; one accuracy table per threat model, each attack with its image
    count and each cell marked with X where a sanity check failed and the letters of the indicators
    of attack failure its rows fired; the legend;
    and the command that writes the full report."""
    import os

    import pandas as pd

    from kdp.cells import legend, not_same_images
    from kdp.config import THREAT_MODELS
    from kdp.storage import is_uri

    paths = [str(p) for p in (paths if isinstance(paths, list) else [paths])]
    print("results: " + ", ".join(paths))
    df = pd.concat([load(p) for p in paths], ignore_index=True)
    for threat in (t for t in THREAT_MODELS if t in set(df.threat_model)):
        print(f"\n{threat} threat model: accuracy % (n = test images per attack; letters: see below)\n"
              + threat_table(df, threat, marked=True).to_string())
        print("\n".join(not_same_images(df, threat)))
    print("\n".join(legend(df[~df["attack"].isin(CURVE)])))  # the letters in these tables
    parents = [p.rsplit("/", 1)[0] if is_uri(p) else str(Path(p).resolve().parent) for p in paths]
    root = parents[0] if len(set(parents)) == 1 else (os.path.commonpath(parents) if not is_uri(paths[0])
                                                      else parents[0].rsplit("/", 1)[0])
    print(f"\nfull report (intervals, Table 2, plots): kdp report {root} --out {root}/report")


def threat_table(df, threat: str, marked: bool = False):
    """table1 of one threat model, its rows labelled 'attack (n=N)' (and the run, if several),
    attacks and variants under the report's labels (kdp.cells); `marked`: cells as text, each
    followed by the letters of the indicators its rows fired."""
    import pandas as pd

    from kdp.cells import ATTACK_LABELS, VARIANT_LABELS, codes

    t = table1(df, threat)
    if marked:
        marks = codes(df[df.threat_model == threat], ["run", "attack", "variant"])
        t = t.round(2).astype(object)
        for (run, a) in t.index:
            for v in t.columns:
                x = t.loc[(run, a), v]
                t.loc[(run, a), v] = "" if pd.isna(x) else f"{x:.2f} {marks.get((run, a, v), '')}".rstrip()
    n = df[df.threat_model == threat].groupby(["run", "attack"])["n"].max()
    several = df["run"].nunique() > 1
    t.index = [f"{run + ' ' if several else ''}{ATTACK_LABELS.get(a, a)} (n={n[(run, a)]})" for run, a in t.index]
    t.columns = [VARIANT_LABELS.get(v, v) for v in t.columns]
    return t
