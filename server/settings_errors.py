"""Why ``lora-server serve`` refused its settings, told without repeating what the user typed.

Pydantic echoes input values in a ``ValidationError`` (a model-level check even echoes every setting, keys
included), and argparse echoes unknown arguments, so a mistyped flag (``--admin-kye <key>``) would print the key
that follows it. Keys must never reach a terminal or a log: validation errors are told by field and reason only,
every value typed on the command line is blanked out of parser errors, and the configured keys are blanked out of
whatever remains.
"""

import re
from collections.abc import Iterable, Mapping

from pydantic import ValidationError
from pydantic_settings import SettingsError

HIDDEN = "***"
ENV_PREFIX = "LORA_SERVER_"
KEY_FIELDS = ("api_key", "admin_key")


_FLAG_NAME = re.compile(r"--[a-z][a-z0-9-]*|-h")  # how our flags (and mistyped ones) look; a key rarely does


def typed_values(flags: Iterable[str]) -> set[str]:
    """Every value on the command line: each argument that does not look like a flag name (a URL-safe key may
    start with ``-``), and the part after ``=`` in ``--flag=v``."""
    values = set()
    for arg in flags:
        name, eq, value = arg.partition("=")
        if eq and _FLAG_NAME.fullmatch(name):
            values.add(value)
        elif not _FLAG_NAME.fullmatch(arg):
            values.add(arg)
    return {v for v in values if v}


def key_values(flags: list[str], environ: Mapping[str, str]) -> set[str]:
    """The keys given by flag (``--api-key k``, ``--api-key=k``) or environment variable, whatever their validity."""
    keys = {environ.get(ENV_PREFIX + field.upper(), "") for field in KEY_FIELDS}
    names = {f"--{field.replace('_', sep)}" for field in KEY_FIELDS for sep in ("-", "_")}
    for i, arg in enumerate(flags):
        name, eq, value = arg.partition("=")
        if name in names:
            keys.add(value if eq else (flags[i + 1] if i + 1 < len(flags) else ""))
    return {k for k in keys if k}


def blank(text: str, values: Iterable[str]) -> str:
    """``text`` with each value replaced where it stands as a whole word (whitespace, quotes or ``=`` around it),
    as argparse quotes or lists it; longest first, so a value inside another is not left half-visible."""
    for value in sorted(values, key=len, reverse=True):
        for form in {value, repr(value)[1:-1]}:
            text = re.sub(rf"(?<![^\s'\"=]){re.escape(form)}(?![^\s'\"])", HIDDEN, text)
    return text


def describe(exc: ValidationError | SettingsError, flags: list[str], environ: Mapping[str, str]) -> str:
    """One line per problem, naming the setting (flag and environment variable) and the reason, never a value."""
    if isinstance(exc, SettingsError):
        lines = [blank(str(exc), typed_values(flags))]
    else:
        lines = []
        for err in exc.errors(include_input=False, include_url=False, include_context=False):
            field = ".".join(str(part) for part in err["loc"])
            where = f"{field} (--{field.replace('_', '-')} or {ENV_PREFIX}{field.upper()}): " if field else ""
            lines.append(f"{where}{err['msg']}")
    return "\n".join(blank(line, key_values(flags, environ)) for line in lines)
