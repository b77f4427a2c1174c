"""A job on one machine opens nothing to the network.

torch's TCPStore server binds every interface whatever address its clients use, and gloo
(NCCL's bootstrap too) listens on the address the hostname resolves to: both accept anyone
who can reach the machine, without authentication. A job on one machine needs no network,
so its store is handed a socket bound to 127.0.0.1 (TCPStore's `master_listen_fd`), the
elastic launcher rendezvouses through that store (the `ringwise-loopback` backend: one
node, no second server), and a rank whose master address is a loopback address puts its
gloo and NCCL sockets on the loopback interface. A job over several machines (torchrun)
needs its stores reachable by the other nodes: there the network must be trusted, as
PyTorch says of its distributed stores.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from datetime import timedelta

import torch.distributed as dist
from torch.distributed.elastic.rendezvous import (
    RendezvousHandler,
    RendezvousInfo,
    RendezvousStoreInfo,
    rendezvous_handler_registry,
)

LOOPBACK = "127.0.0.1"
BACKEND = "ringwise-loopback"


def loopback_store(timeout: float) -> dist.TCPStore:
    """A TCPStore server listening on 127.0.0.1 alone (its port: `.port`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((LOOPBACK, 0))
        sock.listen(256)
        port = sock.getsockname()[1]
    except BaseException:
        sock.close()
        raise
    return dist.TCPStore(
        LOOPBACK,
        port,
        None,
        True,
        timedelta(seconds=timeout),
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=sock.detach(),
    )


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def loopback_interface() -> str:
    names = [name for _, name in socket.if_nameindex()]
    for name in ("lo", "lo0"):
        if name in names:
            return name
    raise RuntimeError(f"no loopback interface among {names}")


def keep_sockets_on_loopback() -> None:
    """Before this rank's process group starts: when its master is a loopback address (the whole
    job is on this machine), gloo and NCCL listen on the loopback interface, not on the
    hostname's address. A variable the user set is left as it is."""
    if is_loopback(os.environ.get("MASTER_ADDR", "")):
        interface = loopback_interface()
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(var, interface)


def register_rendezvous() -> str:
    """The elastic launcher's rendezvous for one node: its store is a loopback_store that the
    ranks share (as torchrun shares its store), so nothing else listens. Returns the backend's name."""
    rendezvous_handler_registry.register(BACKEND, LoopbackRendezvous.from_parameters)
    return BACKEND


class LoopbackRendezvous(RendezvousHandler):
    """One node, rank 0 of 1: the rendezvous is the store itself."""

    def __init__(self, run_id: str, timeout: float):
        self.run_id, self.timeout = run_id, timeout
        self._store: dist.TCPStore | None = None

    @classmethod
    def from_parameters(cls, params):
        if params.max_nodes != 1:
            raise ValueError(f"the {BACKEND} rendezvous serves one node, not {params.max_nodes}")
        return cls(params.run_id, float(params.config.get("timeout", 900)))

    def get_backend(self) -> str:
        return BACKEND

    @property
    def use_agent_store(self) -> bool:
        return True  # the ranks connect to this store as clients: no server of their own

    def next_rendezvous(self) -> RendezvousInfo:
        if self._store is None:
            self._store = loopback_store(self.timeout)
        return RendezvousInfo(
            dist.PrefixStore(self.run_id, self._store), 0, 1, RendezvousStoreInfo(LOOPBACK, self._store.port)
        )

    def is_closed(self) -> bool:
        return False

    def set_closed(self) -> None:
        pass

    def num_nodes_waiting(self) -> int:
        return 0

    def get_run_id(self) -> str:
        return self.run_id

    def shutdown(self) -> bool:
        return True
