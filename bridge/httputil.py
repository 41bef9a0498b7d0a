"""Moved to :mod:`bridge.service.http`; kept only while the MPI routes move under ``bridge/service``."""

from bridge.service.http import *  # noqa: F403
