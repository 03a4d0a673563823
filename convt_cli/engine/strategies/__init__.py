"""The strategies, one object each behind the interface in base.py; STRATEGIES names them in a fixed order."""

from __future__ import annotations

from .base import Strategy
from .dense import Dense
from .folded import Folded
from .offsets import Offsets
from .phases import Phases
from .taps import Taps
from .winograd import Winograd

REGISTRY: dict[str, Strategy] = {s.name: s for s in (Phases(), Taps(), Offsets(), Folded(), Dense(), Winograd())}
STRATEGIES = tuple(REGISTRY)  # ("phases", "taps", "offsets", "folded", "dense", "winograd")
OFFSETS, TAPS = REGISTRY["offsets"], REGISTRY["taps"]  # the fallbacks: see execute.dispatch
