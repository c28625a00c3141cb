"""Subnet construction (paper Fig. 3): the public names of :mod:`nni_steppingnet.construction`,
kept importable from here for users of the first release."""

from __future__ import annotations

from .construction.loop import CONSTRUCTION_FORMAT, ConstructionConfig, ConstructionResult, Constructor

__all__ = ["ConstructionConfig", "ConstructionResult", "Constructor", "CONSTRUCTION_FORMAT"]
