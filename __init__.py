"""sortline: a streaming edge pipeline for sensor-based sorting machines.

One import name, in layers (docs/architecture.md), each importing only those
below it:

    sortline.cli           the `sortline` commands
    sortline.nodes         the node kinds a graph is made of
    sortline.models        the fusion network, its training and inference backends
    sortline.calibration   spectral and spatial calibration
    sortline.pipeline      the runtime every node shares
"""

import os as _os

# One process per node is the parallelism: a numpy BLAS call that spreads over
# every core (and spins there waiting for work) only steals time from the
# other nodes. Set before numpy is imported; an explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
