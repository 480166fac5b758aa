"""What the adapter registry stores and how it refuses: ``AdapterRecord``, ``AdapterSummary``, the name rule and the
registry's errors (each with its HTTP status). Re-exported by ``server.adapters.registry``, where callers import them.
"""

import re
from dataclasses import asdict, dataclass
from typing import Literal

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # and no ".." anywhere: names are folder names on disk
_NAME = re.compile(NAME_PATTERN)
Source = Literal["upload", "startup"]


class RegistryError(Exception):
    """Base of the registry's refusals; each message says what to change."""


class InvalidAdapterName(RegistryError):
    """The name does not match NAME_PATTERN or contains '..' (HTTP 400)."""


class AdapterExists(RegistryError):
    """An adapter of that name is already registered (HTTP 409)."""


class AdapterNotFound(RegistryError, KeyError):
    """No adapter of that name (HTTP 404). A KeyError, so ``AdapterRegistry.path`` can serve as a name lookup."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0]) if self.args else ""


class UploadTooLarge(RegistryError):
    """A file or archive is above its UploadLimits cap (HTTP 413)."""


class StorageFull(RegistryError):
    """The disk (or quota) ran out while storing an upload or deleting (HTTP 507); nothing was changed."""


class StoreUnavailable(RegistryError):
    """The adapter store (``--adapter-store``) cannot be used now: unreachable, refused, or it served files that do not
    match their record (HTTP 503); an upload that met it left nothing behind."""


class BadArchive(RegistryError):
    """The archive is unsafe, broken, not a .zip/.tar.gz, or holds no adapter (HTTP 400)."""


@dataclass(frozen=True)
class AdapterSummary:
    """What the validator reports about a valid adapter folder."""

    rank: int
    alpha: float
    target_modules: list[str] | str  # a list of module names, or one regex / "all-linear" as PEFT stores it


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter as the API shows it; ``sha256`` is of adapter_model.safetensors, ``size_bytes`` the
    total of its stored files, ``created_at`` ISO 8601 UTC ("2026-11-24T14:05:00Z").

    ``uid`` identifies this upload: a fresh uuid4 hex per accepted add, so a delete and a re-upload under the same
    name give a different uid (a process holding the old adapter can tell it is stale). It is the registry's, not the
    API's: ``to_json`` leaves it out, so the HTTP adapter JSON keeps its shape.
    """

    name: str
    rank: int
    alpha: float
    target_modules: list[str] | str
    size_bytes: int
    sha256: str
    created_at: str
    source: Source
    uid: str

    def to_json(self) -> dict[str, object]:
        """A JSON-safe dict of the API's fields (a copy: changing it leaves the record alone); no ``uid``."""
        out = asdict(self)
        del out["uid"]
        out["alpha"] = float(self.alpha)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, object], uid: str) -> "AdapterRecord":
        """The inverse of ``to_json`` (plus ``uid``); raises ValueError/TypeError/KeyError on a malformed entry."""
        targets = raw["target_modules"]
        if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise TypeError(f"target_modules must be a string or a list of strings, got {targets!r}")
        source = raw["source"]
        if source not in ("upload", "startup"):
            raise ValueError(f"unknown source {source!r}")
        return cls(
            name=check_name(raw["name"]),
            rank=int(_numeric(raw["rank"])),
            alpha=float(_numeric(raw["alpha"])),
            target_modules=targets,
            size_bytes=int(_numeric(raw["size_bytes"])),
            sha256=str(raw["sha256"]),
            created_at=str(raw["created_at"]),
            source=source,
            uid=uid,
        )


def _numeric(value: object) -> int | float | str:
    """A JSON value that int() and float() accept by type; TypeError (as they would raise) for any other."""
    if not isinstance(value, int | float | str):
        raise TypeError(f"expected a number, got {value!r}")
    return value


def check_name(name: object) -> str:
    """``name`` when it is a valid adapter name, else InvalidAdapterName. Checked before any upload byte is read."""
    if not isinstance(name, str) or _NAME.fullmatch(name) is None or ".." in name:
        shown = repr(name if not isinstance(name, str) or len(name) <= 80 else name[:80] + "...")
        raise InvalidAdapterName(
            f"invalid adapter name {shown}: use 1 to 64 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, and no '..'"
        )
    return name
