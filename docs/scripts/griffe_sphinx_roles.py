"""Griffe extension for the docs site: renders the docstrings' Sphinx roles.

The docstrings are Google style but cross-reference with reST roles
(``:func:`jacfd```, ``:class:`Batched```, ``:attr:`report```) and end a paragraph
with ``::`` before a literal block. Markdown shows both verbatim, so this rewrites
them before mkdocstrings renders the docstring: a role naming a public name
becomes a link to its API entry, any other role inline code, and ``::`` a colon
(the indented block after it is already a Markdown code block).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import jacfd

_ROLE = re.compile(r":(?:func|class|attr|meth|mod|data|obj):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::\n")


def _rewrite(text: str) -> str:
    def role(match: re.Match[str]) -> str:
        name = match.group(1).removeprefix("jacfd.")
        if name in jacfd.__all__:
            shown = f"{name}()" if callable(getattr(jacfd, name)) and name[0].islower() else name
            return f"[`{shown}`][jacfd.{name}]"
        return f"`{name}`"

    return _LITERAL.sub(r"\1:\n", _ROLE.sub(role, text))


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _rewrite(obj.docstring.value)
