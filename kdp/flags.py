"""Command-line flags derived from config dataclasses: one flag per field, its default and
its help taken from the field itself (the docstring under it), so defaults are stated once."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import os
import textwrap
import typing

from kdp.errors import ConfigError


@functools.lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """{field name: the docstring written under it} for a dataclass (and its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(
                    nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_dataclass_args(p: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None,
                       help_overrides: dict | None = None) -> None:
    """One --flag-name per field of `cls` (bools are store_true flags), default from the field."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        text = (help_overrides or {}).get(f.name, docs.get(f.name, ""))
        if hints[f.name] is bool:
            if default:
                raise ValueError(f"{cls.__name__}.{f.name}: a flag for a field that defaults to True")
            p.add_argument(flag, action="store_true", help=text)
        else:
            kind = _plain(hints[f.name])
            p.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")


def _plain(hint):
    """The type a flag parses: `float | None` -> float."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(hint) and len(args) == 1 else hint


def dataclass_from_args(cls, args: argparse.Namespace, **fixed):
    """The dataclass from the flags `add_dataclass_args` made (fields without a flag keep defaults)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**kw, **fixed})


def env_seconds(name: str, default: float) -> float:
    """A number of seconds from the environment variable `name`; one line naming it if it is not one."""
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: not a number of seconds (e.g. {name}={default:g})")
    return value
