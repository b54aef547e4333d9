"""Deployments from a TOML file, validated, every mistake named by its file and line.

The file lists ``[[deployment]]`` tables (and an optional ``[router]`` table)::

    [router]
    strategy = "priority"        # priority | weighted | least_loaded

    [[deployment]]
    name = "relay-a"
    base_url = "http://127.0.0.1:8001/v1"
    api_key_env = "RELAY_A_KEY"  # or a pool: ["KEY_1", "KEY_2"], with shared_quota = true
    rpm = 600
    tpm = 100000
    priority = 1
    [deployment.models]          # the name callers use = the name this deployment knows
    "gpt-4o-mini" = "gpt-4o-mini-2024-07-18"
    [deployment.prices]          # USD per million tokens
    as_of = 2026-11-01
    input = 0.38
    output = 0.38

Keys are named by environment variable only: a file holding a key (``api_key = ...``) is
refused, so a deployments file can be committed and shared. ``tomllib`` parses it (``tomli``
before Python 3.11), and a small index of where each key was written turns every problem into
``FILE:LINE: what is wrong``; all of them are reported at once.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from corral.core._errors import InvalidInput
from corral.middleware._breaker import BreakerConfig
from corral.middleware._budget import Budget
from corral.middleware._metrics import Price
from corral.middleware._prices import DEFAULT_PRICE_TABLE, PriceTable
from corral.middleware._router import STRATEGIES, Deployment, Router

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["DeploymentsFile", "load_router", "read_deployments"]

_DEPLOYMENT_KEYS = (
    "name",
    "base_url",
    "api_key_env",
    "models",
    "rpm",
    "tpm",
    "concurrency",
    "priority",
    "weight",
    "shared_quota",
    "context_window",
    "prices",
    "breaker",
    "emulator",
)
_ROUTER_KEYS = ("strategy", "cooldown", "allowed_fails", "max_wait", "max_attempts")
_PRICE_KEYS = ("input", "output", "cached_input", "reasoning")
_BREAKER_KEYS = ("window", "min_calls", "threshold", "cooldown", "probes")
_KEY = re.compile(
    r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)
_PART = re.compile(r""""([^"]*)"|'([^']*)'|([A-Za-z0-9_-]+)""")

Path_ = tuple[str | int, ...]


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(a or b or c for a, b, c in _PART.findall(dotted))


class _Lines:
    """Where each table and key of a TOML text was written: (path) -> line number.

    Array-of-tables elements are numbered (``("deployment", 0, "rpm")``); a key inside an
    inline table is found at the line of the key that holds the table.
    """

    def __init__(self, text: str) -> None:
        self.at: dict[Path_, int] = {}
        table: Path_ = ()
        counts: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("[["):
                name = _parts(stripped[2 : stripped.find("]]")])
                counts[name[0]] = counts.get(name[0], -1) + 1
                table = (name[0], counts[name[0]], *name[1:])
            elif stripped.startswith("["):
                name = _parts(stripped[1 : stripped.find("]")])
                table = (name[0], counts[name[0]], *name[1:]) if name[0] in counts else name
            else:
                match = _KEY.match(line)
                if match is None:
                    continue
                self.at.setdefault((*table, *_parts(match.group(1))), number)
                continue
            self.at.setdefault(table, number)

    def line(self, path: Path_) -> int:
        for end in range(len(path), 0, -1):
            found = self.at.get(path[:end])
            if found is not None:
                return found
        return 1


@attrs.frozen
class DeploymentsFile:
    """A read and validated deployments file."""

    path: Path
    deployments: tuple[Deployment, ...]
    #: Keyword arguments for ``Router`` from the ``[router]`` table.
    router: Mapping[str, Any]
    #: Each deployment's ``[deployment.emulator]`` table (for ``corral serve --deployments``).
    emulators: tuple[Mapping[str, Any], ...]
    lines: _Lines = attrs.field(eq=False, repr=False)

    def where(self, *path: str | int) -> str:
        """``FILE:LINE`` of a table or key, e.g. ``where("deployment", 0, "rpm")``."""
        return f"{self.path}:{self.lines.line(path)}"


class _Problems:
    """Collects every mistake in a file, each with its line."""

    def __init__(self, path: Path, lines: _Lines) -> None:
        self.path, self.lines = path, lines
        self.found: list[str] = []

    def add(self, at: Path_, message: str) -> None:
        self.found.append(f"{self.path}:{self.lines.line(at)}: {message}")

    def unknown(
        self, table: Mapping[str, Any], known: tuple[str, ...], at: Path_, what: str
    ) -> None:
        for key in table:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}"
                self.add((*at, key), f"{what}: unknown key {key!r}{hint}")

    def raise_if_any(self) -> None:
        if self.found:
            shown = self.found[:20]
            more = len(self.found) - len(shown)
            tail = [f"... and {more} more"] if more else []
            raise InvalidInput("\n".join([*shown, *tail]))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_deployments(path: str | os.PathLike[str], *, check_env: bool = True) -> DeploymentsFile:
    """Read and validate a deployments file; ``InvalidInput`` lists every problem as
    ``FILE:LINE: ...``. ``check_env``: every key variable must be set (not for serving)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"{file}: cannot read the deployments file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise InvalidInput(f"{file}: not UTF-8 text; save it as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        where = f"{file}:{found.group(1)}" if found else str(file)
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise InvalidInput(f"{where}: not valid TOML: {message}") from None
    lines = _Lines(text)
    problems = _Problems(file, lines)
    problems.unknown(data, ("deployment", "router"), (), "the file")
    router = _router(data.get("router", {}), problems)
    tables = data.get("deployment")
    if not isinstance(tables, list) or not tables:
        problems.add((), "no [[deployment]] tables: list at least one deployment")
        problems.raise_if_any()
    assert isinstance(tables, list)
    deployments: list[Deployment] = []
    emulators: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    for index, table in enumerate(tables):
        deployment = _deployment(file, table, ("deployment", index), problems, lines, check_env)
        emulator = table.get("emulator", {})
        if not isinstance(emulator, dict):
            problems.add(("deployment", index, "emulator"), "emulator must be a table")
            emulator = {}
        emulators.append(emulator)
        if deployment is None:
            continue
        if deployment.name in seen:
            problems.add(
                ("deployment", index, "name"), f"a second deployment named {deployment.name!r}"
            )
        seen.add(deployment.name)
        deployments.append(deployment)
    problems.raise_if_any()
    return DeploymentsFile(file, tuple(deployments), router, tuple(emulators), lines)


def _router(table: object, problems: _Problems) -> dict[str, Any]:
    at: Path_ = ("router",)
    if not isinstance(table, dict):
        problems.add(at, "router must be a table: [router]")
        return {}
    problems.unknown(table, _ROUTER_KEYS, at, "[router]")
    out: dict[str, Any] = {}
    strategy = table.get("strategy")
    if strategy is not None:
        if strategy not in STRATEGIES:
            problems.add(
                (*at, "strategy"),
                f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}",
            )
        else:
            out["strategy"] = strategy
    for key in ("cooldown", "max_wait"):
        if key in table:
            value = table[key]
            if not _is_number(value) or value < 0:
                problems.add((*at, key), f"{key} must be a number of seconds >= 0, got {value!r}")
            else:
                out[key] = float(value)
    for key, minimum in (("allowed_fails", 0), ("max_attempts", 1)):
        if key in table:
            value = table[key]
            if not _is_int(value) or value < minimum:
                problems.add((*at, key), f"{key} must be an integer >= {minimum}, got {value!r}")
            else:
                out[key] = value
    return out


def _deployment(
    file: Path,
    table: object,
    at: Path_,
    problems: _Problems,
    lines: _Lines,
    check_env: bool,
) -> Deployment | None:
    if not isinstance(table, dict):
        problems.add(at, "each deployment must be a table: [[deployment]]")
        return None
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        problems.add((*at, "name"), 'every deployment needs a name = "..."')
        name = f"#{at[1]}"
    what = f"deployment {name!r}"
    before = len(problems.found)
    problems.unknown({k: v for k, v in table.items() if k != "api_key"}, _DEPLOYMENT_KEYS, at, what)
    if "api_key" in table:
        problems.add(
            (*at, "api_key"),
            f"{what}: keys are named by environment variable only; write "
            'api_key_env = "NAME" and export NAME (a deployments file never holds a key)',
        )
    base_url = table.get("base_url")
    if not isinstance(base_url, str) or not re.match(r"^https?://[^/\s]+", base_url):
        problems.add(
            (*at, "base_url"),
            f"{what}: base_url must be an http:// or https:// URL, got {base_url!r}",
        )
    envs = table.get("api_key_env")
    names = [envs] if isinstance(envs, str) else envs
    if (
        not isinstance(names, list)
        or not names
        or not all(isinstance(n, str) and re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", n) for n in names)
    ):
        problems.add(
            (*at, "api_key_env"),
            f"{what}: api_key_env must name an environment variable (or a list of them for a "
            f"key pool), got {envs!r}",
        )
        names = []
    elif check_env:
        for env in names:
            if not (os.environ.get(env) or "").strip():
                problems.add(
                    (*at, "api_key_env"),
                    f"{what}: the environment variable {env} is not set; "
                    f"e.g. `export {env}=sk-...`",
                )
    models = table.get("models", {})
    if not isinstance(models, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in models.items()
    ):
        problems.add(
            (*at, "models"),
            f'{what}: models must be a table of "public name" = "deployment\'s name"',
        )
        models = {}
    numbers: dict[str, Any] = {}
    for key, minimum in (("rpm", 1), ("tpm", 1), ("concurrency", 1), ("context_window", 1)):
        if key in table:
            value = table[key]
            if not _is_int(value) or value < minimum:
                problems.add(
                    (*at, key), f"{what}: {key} must be an integer >= {minimum}, got {value!r}"
                )
            else:
                numbers[key] = value
    if "priority" in table:
        if not _is_int(table["priority"]):
            problems.add(
                (*at, "priority"), f"{what}: priority must be an integer (lower goes first)"
            )
        else:
            numbers["priority"] = table["priority"]
    if "weight" in table:
        weight = table["weight"]
        if not _is_number(weight) or not 0 < weight < float("inf"):
            problems.add((*at, "weight"), f"{what}: weight must be a number > 0, got {weight!r}")
        else:
            numbers["weight"] = float(weight)
    shared = table.get("shared_quota", False)
    if not isinstance(shared, bool):
        problems.add((*at, "shared_quota"), f"{what}: shared_quota must be true or false")
        shared = False
    prices = _prices(table.get("prices"), (*at, "prices"), what, problems)
    breaker = _breaker(table.get("breaker", {}), (*at, "breaker"), what, problems)
    if len(problems.found) > before:
        return None
    try:
        return Deployment(
            name=name,
            base_url=str(base_url),
            api_key_env=tuple(names),
            models=models,
            shared_quota=shared,
            prices=prices,
            breaker=breaker,
            where=f"{file}:{lines.line(at)}",
            **numbers,
        )
    except InvalidInput as exc:
        problems.add(at, f"{what}: {exc}")
        return None


def _prices(table: object, at: Path_, what: str, problems: _Problems) -> PriceTable:
    if table is None:
        return DEFAULT_PRICE_TABLE
    if not isinstance(table, dict):
        problems.add(at, f"{what}: prices must be a table: [deployment.prices]")
        return DEFAULT_PRICE_TABLE
    as_of = table.get("as_of")
    if isinstance(as_of, str):
        with contextlib.suppress(ValueError):
            as_of = datetime.date.fromisoformat(as_of)
    if as_of is not None and (
        not isinstance(as_of, datetime.date) or isinstance(as_of, datetime.datetime)
    ):
        problems.add(
            (*at, "as_of"), f"{what}: prices.as_of must be a date, e.g. as_of = 2026-11-01"
        )
        as_of = None
    rest = {k: v for k, v in table.items() if k != "as_of"}
    if any(k in rest for k in _PRICE_KEYS):
        price = _price(rest, at, what, problems)
        return PriceTable(as_of, default=price)
    models: dict[str, Price] = {}
    for model, entry in rest.items():
        if not isinstance(entry, dict):
            problems.add(
                (*at, model),
                f"{what}: prices needs input and output (USD per million tokens), or a table "
                f'per model ([deployment.prices."{model}"]); got {model} = {entry!r}',
            )
            continue
        price = _price(entry, (*at, model), what, problems)
        if price is not None:
            models[model] = price
    return PriceTable(as_of, models)


def _price(table: Mapping[str, Any], at: Path_, what: str, problems: _Problems) -> Price | None:
    problems.unknown(table, _PRICE_KEYS, at, f"{what} prices")
    values: dict[str, float] = {}
    for key in _PRICE_KEYS:
        if key not in table:
            if key in ("input", "output"):
                problems.add(at, f"{what}: prices need {key} (USD per million tokens)")
            continue
        value = table[key]
        if not _is_number(value) or not 0 <= value < float("inf"):
            problems.add(
                (*at, key),
                f"{what}: prices.{key} must be a number >= 0 (USD per million tokens), "
                f"got {value!r}",
            )
        else:
            values[key] = float(value)
    if "input" not in values or "output" not in values:
        return None
    return Price(**values)


def _breaker(table: object, at: Path_, what: str, problems: _Problems) -> BreakerConfig:
    if not isinstance(table, dict):
        problems.add(at, f"{what}: breaker must be a table: [deployment.breaker]")
        return BreakerConfig()
    problems.unknown(table, _BREAKER_KEYS, at, f"{what} breaker")
    try:
        return BreakerConfig(**{k: v for k, v in table.items() if k in _BREAKER_KEYS})
    except InvalidInput as exc:
        problems.add(at, f"{what}: {exc}")
        return BreakerConfig()


def load_router(
    path: str | os.PathLike[str], *, budget: Budget | None = None, **overrides: Any
) -> Router:
    """A ``Router`` over the deployments of a TOML file, with its ``[router]`` settings
    (``overrides`` win); ``budget`` caps what the calls cost."""
    file = read_deployments(path)
    return Router(file.deployments, budget=budget, **{**file.router, **overrides})
