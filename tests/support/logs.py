"""What tests read of the proxy's logs."""

from __future__ import annotations

import logging
from collections.abc import Callable

# The access records logged so far in a test, in order (the ``access`` fixture).
Records = Callable[[], list[logging.LogRecord]]
