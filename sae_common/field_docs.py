"""What the CLI reads from a config dataclass's fields: each field's default, and the docstring written under it
(the `--help` text), read from the source once per class. Kept apart from the configs so that any dataclass
(SAEConfig, FeaturesConfig, ...) documents its flags the same way."""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Any


def field_doc(cls: type, name: str) -> str:
    """The docstring under a dataclass field (for --help), read from the source once per class."""
    return _field_docs(cls).get(name, "")


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    import ast
    import inspect

    body = ast.parse(inspect.getsource(cls)).body[0].body
    return {node.target.id: " ".join(nxt.value.value.split()) for node, nxt in zip(body, body[1:])
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)}


def default(cls: type, name: str) -> Any:
    return next(f.default for f in fields(cls) if f.name == name)
