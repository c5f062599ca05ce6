"""Griffe extension for the API reference: read our reST-isms as Markdown, without touching
the docstrings.

- ``text::`` before an indented block (reST's literal block) becomes ``text:``, and a lone
  ``::`` line goes; the indented block is already a Markdown code block.
- ``:mod:`x```, ``:class:`x``` and the other Python roles become the code span ```x```.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

LITERAL_MARKER = re.compile(r"^([ \t]*)::[ \t]*$|(?<=\S)::$", re.MULTILINE)
ROLE = re.compile(r":(?:py:)?(?:mod|class|func|meth|attr|data|exc|obj|const):(`[^`]+`)")


def markdown(text: str) -> str:
    """``text`` with the literal-block markers and roles above rewritten."""
    text = LITERAL_MARKER.sub(lambda m: "" if m.group(1) is not None else ":", text)
    return ROLE.sub(r"\1", text)


class RestToMarkdown(griffe.Extension):
    """Rewrite every docstring once the package is loaded."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Rewrite ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = markdown(obj.docstring.value)
