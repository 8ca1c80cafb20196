"""Suite-wide settings.

Under pytest-xdist (the README's `-n 2`) each worker runs torch on one thread: two workers on two cores
instead of four torch threads contending for them. Subprocesses the tests start inherit it.
"""

from __future__ import annotations

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
