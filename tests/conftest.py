"""Shared test settings (offline, quiet Ray, no auth) and the shared fixtures: tests/fixtures/."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

pytest_plugins = ["tests.fixtures.models", "tests.fixtures.corpora", "tests.fixtures.services", "tests.fixtures.cluster", "tests.fixtures.sd"]
