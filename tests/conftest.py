"""Shared fixtures: live local clusters (one per world size, reused across tests), and grids of
cases run as one cluster job per world size."""

import os
import threading

# Inductor's pool of compile workers (one per core, per rank) only contends for two cores here.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
# One intra-op thread per process: the suite's process computes its references while the
# clusters' ranks (one thread each) work on the same cores; a second OpenMP thread that spins
# after each small op only takes a core from a rank (the suite: 3:10 -> 2:45 on two cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# ringwise's cache (finetune's token cache) in a folder of this session, not the user's ~/.cache
if "RINGWISE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["RINGWISE_CACHE"] = tempfile.mkdtemp(prefix="ringwise-test-cache-")
    atexit.register(shutil.rmtree, os.environ["RINGWISE_CACHE"], True)

import pytest  # noqa: E402
from helpers import run_each  # noqa: E402

from ringwise.testing.cluster import ClusterError, LocalCluster  # noqa: E402

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
    # close them all at once: each close waits for its ranks to leave their process group
    closers = [threading.Thread(target=c.close) for c in _CLUSTERS.values()]
    for t in closers:
        t.start()
    for t in closers:
        t.join()


# Deadline of one batched job: a base plus this much per case (about 10x a case's time on two
# busy cores); a job that overruns fails fast and its cases rerun one job each, each with
# cluster.run's own deadline.
BATCH_BASE_S, BATCH_PER_CASE_S = 60.0, 3.0


@pytest.fixture(scope="session")
def grid_results(cluster, request):
    """grid_results(fn, grid, case) -> the per-rank results of fn(case) on a cluster of
    case["world"] ranks, the same as cluster(W).run(fn, case), but the first case of each
    world size runs every selected case of `grid` with that world size in ONE job (start-up
    and round-trips paid once; fn must be importable by name). Each test still checks its own
    case. A case the batch did not complete on every rank (it raised, or the job died or hung)
    is run again on its own, on a fresh cluster, so it fails with every rank's traceback."""
    selected = {
        id(item.callspec.params["case"])
        for item in request.session.items
        if hasattr(item, "callspec") and "case" in item.callspec.params
    }
    cache = {}

    def run(fn, grid, case):
        W = case["world"]
        key = (fn.__module__, fn.__qualname__, id(grid), W)
        if key not in cache:
            batch = [c for c in grid if c["world"] == W and (id(c) in selected or c is case)]
            try:
                per_rank = cluster(W).run(run_each, fn, batch, timeout=BATCH_BASE_S + BATCH_PER_CASE_S * len(batch))
            except ClusterError:
                per_rank = [[] for _ in range(W)]
            done = min(len(r) for r in per_rank)
            if done < len(batch):  # a case failed in the batch: the group may be out of step
                cluster(W).close()
            cache[key] = {id(c): [r[i] for r in per_rank] for i, c in enumerate(batch[:done])}
        got = cache[key].get(id(case))
        return got if got is not None else cluster(W).run(fn, case)

    return run
