"""Moved to :mod:`bridge.stores.db`; kept only while the MPI package moves under ``bridge/stores``."""

from bridge.stores.db import *  # noqa: F403
from bridge.stores.db import WalCheckpointer, enable_wal  # noqa: F401
