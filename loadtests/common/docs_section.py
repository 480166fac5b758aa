"""Figures a script writes into the docs: the text between two markers, ``<!-- name:begin -->`` and
``<!-- name:end -->``, is replaced and nothing else in the file changes."""

import textwrap
from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    """The begin and end markers of section ``name`` (HTML comments: invisible in rendered markdown)."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, body: str, heading: str | None = None) -> None:
    """Put ``body`` between the markers of ``name`` in ``path``; where they are missing (or out of order) they are
    appended at the end of the file first, under ``heading`` when given."""
    begin, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin not in text or end not in text or text.index(end) < text.index(begin):
        title = f"{heading}\n\n" if heading else ""
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + f"{title}{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}", encoding="utf-8")


def wrap_markdown(markdown: str, width: int = 116) -> str:
    """Wrap prose and bullet lines (tables, code fences and command lines stay as they are)."""
    out = []
    for line in markdown.splitlines():
        if len(line) <= width or line.startswith(("|", "```", ".venv")):
            out.append(line)
        else:
            indent = "  " if line.startswith("- ") else ""
            out.append(textwrap.fill(line, width, subsequent_indent=indent, break_on_hyphens=False))
    return "\n".join(out)
