"""Hypothesis settings for the property tests: few examples, no deadline (the machine
is shared and slow at times), no example database written into the tree."""
from __future__ import annotations

from hypothesis import HealthCheck, settings

settings.register_profile("sorna", max_examples=150, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("sorna")
