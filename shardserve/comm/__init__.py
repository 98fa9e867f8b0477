"""Collectives between ranks.

In: tensors / picklable objects of one rank. Out: reduced / gathered / broadcast tensors, or an
error (`CommError`: `CollectiveTimeoutError`, `RankFailedError`) whose message starts with
"rank <r>: " and whose `.ranks` names the global ranks that did not arrive or died.

`init_world(WorldSpec(...))` sets a rank up (MPI or gloo on CPU) and returns a `World` with a
`world` and a `tp` `Communicator` and the `RankBoard` (heartbeats, progress). The backends
(`mpi`, `gloo`) are imported lazily, so importing this package needs neither mpi4py nor a world.
"""

from shardserve.comm.base import (
    DEFAULT,
    DEFAULT_TIMEOUT_S,
    CollectiveTimeoutError,
    CommError,
    Communicator,
    PendingSend,
    RankFailedError,
    ShapeOnlyCommunicator,
    SingleRankCommunicator,
    Timeout,
)
from shardserve.comm.board import RankBoard
from shardserve.comm.world import World, WorldSpec, init_world

__all__ = [
    "DEFAULT",
    "DEFAULT_TIMEOUT_S",
    "CollectiveTimeoutError",
    "CommError",
    "Communicator",
    "PendingSend",
    "RankBoard",
    "RankFailedError",
    "ShapeOnlyCommunicator",
    "SingleRankCommunicator",
    "Timeout",
    "World",
    "WorldSpec",
    "init_world",
]
