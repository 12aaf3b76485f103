"""Relay: an observable HTTP reverse proxy."""

import os

__version__ = "0.1.0"

# prometheus-client switches to file-backed multiprocess values whenever this variable
# exists, even empty, and then writes its files into the working directory (or fails on a
# read-only one). Set but empty means unset here; this runs before it is imported.
if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == "":
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]
