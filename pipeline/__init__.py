"""The sortline runtime shared by every node: messages, transport, nodes, config, supervisor."""

import os as _os

# One process per node is the parallelism: a numpy BLAS call that spreads over
# every core (and spins there waiting for work) only steals time from the
# other nodes. Set before numpy is imported; an explicit setting wins.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    _os.environ.setdefault(_var, "1")
