"""Collectives between ranks.

In: tensors of one rank. Out: reduced / gathered / broadcast tensors, or an error naming the
rank that did not arrive within the timeout. Backends implement `Communicator`.
"""

from shardserve.comm.base import Communicator, SingleRankCommunicator

__all__ = ["Communicator", "SingleRankCommunicator"]
