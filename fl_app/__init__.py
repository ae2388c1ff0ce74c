"""Shared core of the app: models, widths, data, device profiles, cost model, jobs, wire format.

Nothing here imports Flower's server or client side, so a Raspberry Pi needs only this
package and `client_app`.
"""

import os

# Clients measure a training step's peak memory with the PyTorch profiler; without this,
# its Kineto backend prints several lines to stderr on every measurement.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")
