"""Testing helpers: the OpenAI-compatible emulator, its server, and a virtual-time simulator."""

from corral.testing.emulator import Emulator, EmulatorConfig, Fault, Latency
from corral.testing.server import RunningEmulator, serve_in_thread
from corral.testing.simulator import SimulatedProvider

__all__ = [
    "Emulator",
    "EmulatorConfig",
    "Fault",
    "Latency",
    "RunningEmulator",
    "SimulatedProvider",
    "serve_in_thread",
]
