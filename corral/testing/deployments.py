"""Several emulated deployments at once, each with its own port (or path), limits, prices and
faults, metered, so a router's failover and a budget's spend can be shown and checked.

A deployments file (``corral._deployments``) describes them: each ``[[deployment]]`` is served
at its ``base_url`` (deployments sharing a host and port are told apart by their path, e.g.
``http://127.0.0.1:8001/a/v1`` and ``.../b/v1``), with the deployment's ``rpm``/``tpm`` and
the settings of its ``[deployment.emulator]`` table::

    [deployment.emulator]
    latency = "0.02"             # as `corral serve --latency`
    faults = { "429" = 0.3 }     # kind = probability, as `corral serve --fault`
    fault_retry_after = 5
    seed = 1

Each emulator meters what it delivered: the usage of every answer that reached the client,
priced at its deployment's prices (``spent_usd``), the provider's own count of the bill.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs

from corral._deployments import DeploymentsFile
from corral.core import _jsonlib as jsonlib
from corral.core._errors import InvalidInput
from corral.core._wire import Usage
from corral.middleware._prices import NANO, PriceTable, usage_nano
from corral.testing.emulator import Emulator, EmulatorConfig, Fault, Latency, Plan
from corral.testing.server import RunningEmulator, ServerLimits, _new_loop, _start, serve_in_thread

__all__ = [
    "EmulatedDeployment",
    "MeteredEmulator",
    "RunningDeployment",
    "emulated_deployments",
    "serve_deployments",
    "serve_deployments_forever",
]

_KEYS = (
    "latency",
    "faults",
    "fault_retry_after",
    "seed",
    "rpm",
    "tpm",
    "window",
    "count",
    "tokens_per_second",
)


@attrs.frozen
class EmulatedDeployment:
    """One deployment to emulate: where, how, and at what prices."""

    name: str
    host: str
    port: int
    #: The path its API lives under, e.g. ``/v1`` or ``/a/v1``.
    prefix: str
    config: EmulatorConfig
    prices: PriceTable


class MeteredEmulator(Emulator):
    """An emulator under a path prefix that counts the usage it delivered and prices it."""

    def __init__(self, config: EmulatorConfig, prices: PriceTable, prefix: str = "/v1") -> None:
        super().__init__(config)
        self.prices, self.prefix = prices, prefix.rstrip("/")
        #: Nano-dollars of the answers delivered, at ``prices``.
        self.spent_nano = 0

    @property
    def spent_usd(self) -> float:
        """What the answers this emulator delivered cost, at its prices."""
        return self.spent_nano / NANO

    def handle(
        self, now: float, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Plan:
        """Answer as the emulator does for the path under ``prefix``; meter a delivered answer."""
        if path.startswith(self.prefix + "/"):
            path = "/v1" + path[len(self.prefix) :]
        plan = super().handle(now, method, path, headers, body)
        if plan.status == 200 and plan.fault is None and path.endswith("/chat/completions"):
            self._meter(plan, body)
        return plan

    def _meter(self, plan: Plan, body: bytes) -> None:
        raw = (
            plan.body
            if plan.events is None
            else next((e[6:].strip() for e in reversed(plan.events) if b'"usage"' in e), b"")
        )
        if not raw:
            return
        data = jsonlib.loads(raw)
        usage = Usage.parse(data.get("usage")) if isinstance(data, dict) else None
        model = jsonlib.loads(body).get("model")
        price = self.prices.get(model)
        if usage is None:
            return
        self.counts["prompt_tokens"] += usage.prompt_tokens
        self.counts["completion_tokens"] += usage.completion_tokens
        if price is not None:
            self.spent_nano += usage_nano(price, usage)


class _ByPath(Emulator):
    """Several metered emulators on one port, told apart by their path prefix."""

    def __init__(self, emulators: list[MeteredEmulator]) -> None:
        super().__init__(EmulatorConfig())
        self._by_prefix = sorted(emulators, key=lambda e: -len(e.prefix))

    def handle(
        self, now: float, method: str, path: str, headers: Mapping[str, str], body: bytes
    ) -> Plan:
        for emulator in self._by_prefix:
            if path.startswith(emulator.prefix + "/"):
                return emulator.handle(now, method, path, headers, body)
        return super().handle(now, method, path, headers, body)  # its 404 lists the routes


def _config(table: Mapping[str, Any], at: str, name: str) -> dict[str, Any]:
    """``[deployment.emulator]`` as ``EmulatorConfig`` fields; ``InvalidInput`` names the line."""
    what = f"{at}: deployment {name!r} emulator"
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in _KEYS:
            raise InvalidInput(f"{what}: unknown key {key!r}; known: {', '.join(_KEYS)}")
        if key == "latency":
            try:
                out[key] = Latency.parse(str(value))
            except ValueError:
                raise InvalidInput(
                    f"{what}: latency {value!r} is not like 0.05 or uniform:0.01,0.1"
                ) from None
        elif key == "faults":
            if not isinstance(value, dict):
                raise InvalidInput(f"{what}: faults must be a table of kind = probability")
            try:
                out[key] = {Fault(str(k)): float(v) for k, v in value.items()}
            except (ValueError, TypeError):
                kinds = ", ".join(f.value for f in Fault)
                raise InvalidInput(
                    f"{what}: faults must map one of {kinds} to a probability"
                ) from None
        elif key == "count":
            out[key] = str(value)
        elif key in ("rpm", "tpm", "seed"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidInput(f"{what}: {key} must be an integer, got {value!r}")
            out[key] = value
        else:
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise InvalidInput(f"{what}: {key} must be a number >= 0, got {value!r}")
            out[key] = float(value)
    return out


def emulated_deployments(file: DeploymentsFile) -> list[EmulatedDeployment]:
    """What to serve for each deployment of ``file`` (its base URL, limits, prices, faults)."""
    out = []
    for index, (deployment, table) in enumerate(zip(file.deployments, file.emulators, strict=True)):
        at = file.where("deployment", index, "emulator")
        url = urlsplit(deployment.base_url)
        if url.scheme != "http" or url.hostname is None:
            raise InvalidInput(
                f"{file.where('deployment', index, 'base_url')}: deployment {deployment.name!r}: "
                "the emulator serves plain http://host:port URLs only"
            )
        fields = {
            "rpm": deployment.rpm,
            "tpm": deployment.tpm,
            **_config(table, at, deployment.name),
        }
        try:
            config = EmulatorConfig(any_model=True, **fields)
            Emulator(config)  # validates the count and the fault rates
        except (ValueError, TypeError) as exc:
            raise InvalidInput(f"{at}: deployment {deployment.name!r} emulator: {exc}") from None
        out.append(
            EmulatedDeployment(
                deployment.name,
                url.hostname,
                80 if url.port is None else url.port,
                url.path.rstrip("/") or "/v1",
                config,
                deployment.prices,
            )
        )
    return out


@attrs.define
class RunningDeployment:
    """One emulated deployment, live: its URL, its meter, and ``kill()``."""

    name: str
    emulator: MeteredEmulator
    server: RunningEmulator

    @property
    def base_url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}{self.emulator.prefix}"

    def kill(self) -> None:
        """Crash its server (every deployment sharing the port goes down with it)."""
        self.server.kill()


def _groups(
    specs: list[EmulatedDeployment],
) -> dict[tuple[str, int], list[tuple[EmulatedDeployment, MeteredEmulator]]]:
    groups: dict[tuple[str, int], list[tuple[EmulatedDeployment, MeteredEmulator]]] = {}
    for spec in specs:
        emulator = MeteredEmulator(spec.config, spec.prices, spec.prefix)
        groups.setdefault((spec.host, spec.port), []).append((spec, emulator))
    return groups


def _one(members: list[tuple[EmulatedDeployment, MeteredEmulator]]) -> Emulator:
    if len(members) == 1:
        return members[0][1]
    return _ByPath([emulator for _, emulator in members])


@contextlib.contextmanager
def serve_deployments(
    specs: list[EmulatedDeployment], *, limits: ServerLimits | None = None
) -> Iterator[dict[str, RunningDeployment]]:
    """Serve ``specs`` in background threads (one per port; port 0 picks a free one each)."""
    with contextlib.ExitStack() as stack:
        running: dict[str, RunningDeployment] = {}
        for (host, port), members in _groups(specs).items():
            if port == 0:
                for spec, emulator in members:  # each its own free port
                    server = stack.enter_context(
                        serve_in_thread(host=host, port=0, emulator=emulator, limits=limits)
                    )
                    running[spec.name] = RunningDeployment(spec.name, emulator, server)
                continue
            server = stack.enter_context(
                serve_in_thread(host=host, port=port, emulator=_one(members), limits=limits)
            )
            for spec, emulator in members:
                running[spec.name] = RunningDeployment(spec.name, emulator, server)
        yield running


def serve_deployments_forever(
    specs: list[EmulatedDeployment], *, limits: ServerLimits | None = None
) -> None:
    """Serve ``specs`` in the foreground until interrupted (``corral serve --deployments``)."""
    loop = _new_loop(True)
    servers: list[tuple[asyncio.Server, Any]] = []
    try:
        for (host, port), members in _groups(specs).items():
            server, conns = loop.run_until_complete(
                _start(_one(members), host, port, limits=limits)
            )
            servers.append((server, conns))
            bound = server.sockets[0].getsockname()
            for spec, _ in members:
                print(f"{spec.name}: http://{bound[0]}:{bound[1]}{spec.prefix}", flush=True)
        loop.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for server, conns in servers:
            conns.stop()
            server.close()
        loop.close()
