"""The regular expressions of an ``adapter_config.json``, matched in time linear in the module name.

peft matches uploaded regexes against module names with Python's backtracking ``re``: ``target_modules`` and
``exclude_modules`` (strings) with ``re.fullmatch``, each ``rank_pattern`` / ``alpha_pattern`` key as
``re.match(rf"(.*\\.)?({key})$", name)`` and each ``layers_pattern`` entry inside
``re.match(rf"(?:^|.*?\\.){pattern}\\.(?P<idx>\\d+)\\.", name)``. A pattern such as ``(.|.)*X`` backtracks for minutes
per name while holding the GIL, freezing the whole server. We build exactly the expressions peft builds and match
them with RE2 (``google-re2``), whose running time is linear in the name for any pattern.

One exception keeps the common case fast: a rank/alpha key that is a plain module name (letters, digits, ``_``,
``-``, ``.`` and ``\\.``, as EVA writes one per module) has no quantifier, group or alternation, so Python's ``re``,
peft's own engine, can only backtrack over our ``(.*\\.)?`` prefix: O(len(name) x len(key)) steps, ten times faster
than a call into RE2 and identical to peft by construction.

Every pattern must compile under both engines, which keeps peft's refusals (``re``) and refuses what RE2 cannot
match in linear time (backreferences, lookaround, atomic groups, possessive quantifiers, ``\\Z``). Two spellings
compile under both but mean different things, so they are refused with a hint: ``{,n}`` (Python: 0 to n times; RE2:
the literal text) and POSIX classes such as ``[[:digit:]]`` (RE2: a class; Python: a set of characters). What stays
different is only for names no model has: RE2's ``\\d``, ``\\w``, ``\\s``, ``\\b`` are ASCII-only, and ``$`` does not
match before a trailing newline. Torch-free.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import re2

from server.adapters.errors import AdapterFormatError, UnsupportedAdapterError

# Patterns in real PEFT configs are short: ".*\.(q_proj|v_proj)", "model.layers.1[0-5].mlp.*", or a full module name
# (~40 characters) per rank_pattern key as EVA writes them. 1,000 characters leaves room for long alternations while
# keeping each compiled program small (RE2 compiles one in well under a millisecond).
MAX_PATTERN_CHARS = 1000
# EVA writes one key per adapted module: 224 for an 8B Llama, 560 for 70B (about 21 KiB of keys per pattern dict).
MAX_PATTERN_KEYS = 1024
MAX_LAYERS_PATTERNS = 16  # peft's examples use one or two ("layers", "h")
# All pattern text of one config: compiling costs ~0.1 ms per pattern plus ~2.5 us per character (Python's re).
MAX_TOTAL_PATTERN_CHARS = 64 * 1024
# A call into RE2 costs ~5 us per module name (35 us for a complex 1,000-character pattern), and every pattern is
# tried on every module name: these two caps keep the RE2 share of a config under ~0.15 s on an 8B model's targets.
MAX_RE2_PATTERNS = 64
MAX_RE2_CHARS = 16 * 1024

Regex = Any  # a compiled re2 expression, or a compiled re.Pattern for a plain key (both: .match / .fullmatch)

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused upload is answered with a 422, not logged to stderr by the C++ library
_OPTIONS.max_mem = 1 << 20  # per expression; past it the lazy DFA falls back to RE2's (still linear) NFA
_PLAIN_KEY = re.compile(r"(?:[A-Za-z0-9_.\-]|\\\.)*")
_EMPTY_QUANTIFIER = re.compile(r"\{,\d*\}")
_POSIX_CLASS = re.compile(r"\[:\^?[A-Za-z]+:\]")


def _show(pattern: str) -> str:
    return repr(pattern if len(pattern) <= 80 else pattern[:80] + "...")


class PatternBudget:
    """Counts one config's patterns against the caps above."""

    def __init__(self) -> None:
        self.chars = 0
        self.re2_patterns = 0
        self.re2_chars = 0

    def take(self, what: str, pattern: str, *, re2_matched: bool) -> None:
        if len(pattern) > MAX_PATTERN_CHARS:
            raise AdapterFormatError(
                f"{what}: the pattern {_show(pattern)} has {len(pattern)} characters; at most {MAX_PATTERN_CHARS} "
                "are accepted (list module names instead of spelling them out in one expression)"
            )
        self.chars += len(pattern)
        if self.chars > MAX_TOTAL_PATTERN_CHARS:
            raise AdapterFormatError(
                f"{what}: the config's patterns add up to more than {MAX_TOTAL_PATTERN_CHARS} characters"
            )
        if not re2_matched:
            return
        self.re2_patterns += 1
        self.re2_chars += len(pattern)
        if self.re2_patterns > MAX_RE2_PATTERNS or self.re2_chars > MAX_RE2_CHARS:
            raise AdapterFormatError(
                f"{what}: the config holds more than {MAX_RE2_PATTERNS} regular expressions or more than "
                f"{MAX_RE2_CHARS} characters of them (plain module names as rank/alpha keys do not count)"
            )


def compile_pattern(what: str, pattern: str, regex: str, budget: PatternBudget) -> Regex:
    """RE2's compiled ``regex``, the expression peft builds from the user's ``pattern`` (a value of ``what``).

    Raises AdapterFormatError (too long, not a valid Python regex, a spelling the engines read differently) or
    UnsupportedAdapterError (valid for Python but not matchable in linear time); both answer HTTP 422.
    """
    budget.take(what, pattern, re2_matched=True)
    try:
        compiled = re2.compile(regex, _OPTIONS)
    except re2.error as exc:
        _check_python(what, pattern, regex)  # a pattern peft refuses too is reported as invalid, not unsupported
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise UnsupportedAdapterError(
            f"{what}: {_show(pattern)} cannot be matched in linear time ({reason}); backreferences, lookahead, "
            "lookbehind, atomic groups, possessive quantifiers and \\Z are not supported (write $ for \\Z)"
        ) from None
    _check_python(what, pattern, regex)
    if _EMPTY_QUANTIFIER.search(pattern):
        raise AdapterFormatError(f"{what}: {_show(pattern)} uses {{,n}}; write {{0,n}} (RE2 reads {{,n}} literally)")
    if _POSIX_CLASS.search(pattern):
        raise AdapterFormatError(
            f"{what}: {_show(pattern)} uses a POSIX class like [:digit:], which Python and RE2 read differently; "
            "write the characters out ([0-9])"
        )
    return compiled


def _check_python(what: str, pattern: str, regex: str) -> None:
    """Refuse what peft itself could not compile. Python's parser recurses per nested group, hence RecursionError."""
    try:
        re.compile(regex)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterFormatError(f"{what}: {_show(pattern)} is not a valid regular expression ({exc})") from None


def fullmatch_regex(what: str, pattern: str, budget: PatternBudget) -> Regex:
    """peft's ``re.fullmatch(pattern, name)`` for target_modules / exclude_modules given as a string."""
    return compile_pattern(what, pattern, pattern, budget)


def suffix_key_regex(what: str, key: str, budget: PatternBudget) -> Regex:
    """peft's get_pattern_key test for one rank_pattern / alpha_pattern key: the key matches a dotted suffix."""
    regex = rf"(.*\.)?({key})$"
    if _PLAIN_KEY.fullmatch(key):
        budget.take(what, key, re2_matched=False)
        return re.compile(regex)  # peft's very expression; see the module docstring for why this one is safe
    return compile_pattern(what, key, regex, budget)


def layer_regex(what: str, pattern: str, budget: PatternBudget) -> Regex:
    """peft's layer-index expression for one layers_pattern entry (not wrapped in a group, exactly as peft does)."""
    return compile_pattern(what, pattern, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", budget)


@dataclass(frozen=True)
class ModuleMatchers:
    """A LoraSpec's patterns compiled once, with peft's matching rules; ``found`` remembers (r, alpha) per name."""

    target: Regex | None  # target_modules given as a regex string
    exclude: Regex | None  # exclude_modules given as a regex string
    target_names: frozenset[str]
    exclude_names: frozenset[str]
    layers: tuple[Regex, ...] | None
    layer_set: frozenset[int] | None
    rank_keys: tuple[tuple[str, Regex], ...]
    alpha_keys: tuple[tuple[str, Regex], ...]
    found: dict[str, tuple[int, float]] = field(default_factory=dict)

    @classmethod
    def compile(
        cls,
        *,
        target_regex: str | None,
        target_names: Iterable[str],
        exclude: tuple[str, ...] | str | None,
        layers_pattern: tuple[str, ...] | None,
        layers_to_transform: tuple[int, ...] | None,
        rank_keys: Iterable[str],
        alpha_keys: Iterable[str],
    ) -> "ModuleMatchers":
        """Compile (and refuse, naming the field) every pattern of one config against one PatternBudget."""
        budget = PatternBudget()
        rank_keys, alpha_keys = list(rank_keys), list(alpha_keys)
        for field_name, keys in (("rank_pattern", rank_keys), ("alpha_pattern", alpha_keys)):
            if len(keys) > MAX_PATTERN_KEYS:
                raise AdapterFormatError(f"{field_name} has {len(keys)} keys; at most {MAX_PATTERN_KEYS} are accepted")
        if layers_pattern is not None and len(layers_pattern) > MAX_LAYERS_PATTERNS:
            raise AdapterFormatError(
                f"layers_pattern has {len(layers_pattern)} entries; at most {MAX_LAYERS_PATTERNS} are accepted"
            )
        target = None if target_regex is None else fullmatch_regex("target_modules", target_regex, budget)
        exclude_regex = fullmatch_regex("exclude_modules", exclude, budget) if isinstance(exclude, str) else None
        layers = None
        if layers_pattern is not None:
            layers = tuple(layer_regex("layers_pattern", p, budget) for p in layers_pattern)
        return cls(
            target=target,
            exclude=exclude_regex,
            target_names=frozenset(target_names),
            exclude_names=frozenset(exclude) if exclude is not None and not isinstance(exclude, str) else frozenset(),
            layers=layers,
            layer_set=None if layers_to_transform is None else frozenset(layers_to_transform),
            rank_keys=tuple((k, suffix_key_regex("rank_pattern", k, budget)) for k in rank_keys),
            alpha_keys=tuple((k, suffix_key_regex("alpha_pattern", k, budget)) for k in alpha_keys),
        )

    def excluded(self, name: str) -> bool:
        """peft's exclude_modules test: a regex fullmatch, else a name equal to or ending with '.' + an entry."""
        if self.exclude is not None:
            return self.exclude.fullmatch(name) is not None
        return name in self.exclude_names or _ends_with_entry(name, self.exclude_names)

    def targeted(self, name: str) -> bool:
        """peft's target_modules test: a regex fullmatch; else an entry equal to the name (no layer filter) or a
        dotted suffix of it, then filtered by the layer index."""
        if self.target is not None:
            return self.target.fullmatch(name) is not None
        if name in self.target_names:
            return True
        if not _ends_with_entry(name, self.target_names):
            return False
        if self.layer_set is None:
            return True
        index = self._layer_index(name)
        return index is not None and index in self.layer_set

    def first_rank_key(self, name: str) -> str | None:
        """The first rank_pattern key (file order, as peft iterates them) matching a dotted suffix of ``name``."""
        return next((key for key, regex in self.rank_keys if regex.match(name) is not None), None)

    def first_alpha_key(self, name: str) -> str | None:
        return next((key for key, regex in self.alpha_keys if regex.match(name) is not None), None)

    def _layer_index(self, name: str) -> int | None:
        if self.layers is None:
            # Lazy ".*?" takes the first numbered segment, the layer, not a nested one (an MoE expert index), as peft
            # does. This expression is ours, not uploaded: Python's re (peft's engine) backtracks only within the name.
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
            return int(match["idx"]) if match is not None else None
        for regex in self.layers:
            match = regex.match(name)
            if match is not None:
                # An entry with a top-level "|" can match without the index group; peft then finds no index either.
                index = match["idx"]
                return int(index) if index is not None else None
        return None


def _ends_with_entry(name: str, entries: frozenset[str]) -> bool:
    """``any(name.endswith("." + e) for e in entries)`` with one set lookup per dot in ``name``, not per entry."""
    dot = name.find(".")
    while dot != -1:
        if name[dot + 1 :] in entries:
            return True
        dot = name.find(".", dot + 1)
    return False
