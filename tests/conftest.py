"""Shared fixtures: live local clusters (one per world size, reused across tests)."""
import pytest

from ringwise.lab.cluster import LocalCluster

_CLUSTERS: dict[int, LocalCluster] = {}


def get_cluster(world_size: int) -> LocalCluster:
    """A live gloo cluster of world_size ranks; a new one replaces a failed one."""
    c = _CLUSTERS.get(world_size)
    if c is None or c.closed:
        c = _CLUSTERS[world_size] = LocalCluster(world_size, threads_per_rank=1, pg_timeout=30)
    return c


@pytest.fixture(scope="session")
def cluster():
    yield get_cluster
    for c in _CLUSTERS.values():
        c.close()
