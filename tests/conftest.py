"""Settings every test folder shares.

Property-based tests (Hypothesis) run with a fixed budget and a fixed seed
(``derandomize``): the same examples on every run, so that a CI failure is
reproducible and the suite's time stays bounded. ``HYPOTHESIS_PROFILE=deep``
explores further by hand.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=150, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile(
    "deep", max_examples=5000, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
