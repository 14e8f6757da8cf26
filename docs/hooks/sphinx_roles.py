"""Griffe extension for the API reference: the Sphinx roles of docstrings (:func:`x`, :class:`~a.b.C`,
:mod:`.sibling`) become mkdocs-autorefs cross-references, resolved in the docstring's own scope: a link where the
site documents the object, its name as code otherwise. ``help()`` and IDEs keep showing the docstrings as written."""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, NameResolutionError, Object

ROLE = re.compile(r":(?:func|class|mod|meth|data|attr|exc|obj):`(~?)(\.*)([\w.]+)`")


def _target(obj: Object, dots: str, name: str) -> str:
    """The full path of ``dots`` + ``name`` as Python would import it from ``obj``'s module or scope."""
    if dots:  # relative to the module's package, one level up per extra dot
        package = obj.module.path if obj.module.is_init_module else obj.module.path.rsplit(".", 1)[0]
        return ".".join([*package.split(".")[: len(package.split(".")) - len(dots) + 1], name])
    first, _, rest = name.partition(".")
    try:
        first = obj.resolve(first)
    except NameResolutionError:
        return name
    return f"{first}.{rest}" if rest else first


class SphinxRoles(Extension):
    def on_object(self, *, obj: Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return

        def reference(match: re.Match[str]) -> str:
            short, dots, name = match.groups()
            shown = name.rsplit(".", 1)[-1] if short else name
            return f'<autoref identifier="{_target(obj, dots, name)}" optional><code>{shown}</code></autoref>'

        obj.docstring.value = ROLE.sub(reference, obj.docstring.value)
