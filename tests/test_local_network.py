"""A run on one machine opens nothing to the network: every listening socket of its processes
(the launcher's rendezvous store, the ranks' gloo sockets; a test cluster's store and ranks)
is bound to a loopback address, read from /proc/net/tcp{,6} against the processes' socket
inodes. And a launcher killed outright takes its ranks with it."""

import os
import signal
import sys
import time

import pytest
from jobs import Job, descendants
from sockets import is_loopback, listening

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net (Linux)")


def test_a_local_run_listens_on_loopback_only_and_dies_with_its_launcher(tmp_path):
    job = Job(tmp_path / "run", timeout=60)
    try:
        job.wait_training(time.monotonic() + 120)
        ranks = job.ranks()
        sockets = listening(descendants(job.proc.pid))
        assert len(ranks) == 2
        assert any(pid == job.proc.pid for pid in sockets.values()), sockets  # the launcher's store
        assert {pid for pid in sockets.values()} >= set(ranks), sockets  # each rank's gloo listener
        assert all(is_loopback(address) for address in sockets), sockets
        job.proc.send_signal(signal.SIGKILL)  # no clean-up of its own: the ranks must still end
        job.proc.wait()
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{pid}") for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in ranks if os.path.exists(f"/proc/{pid}")], "ranks outlived their launcher"
    finally:
        job.end()


def test_a_test_cluster_listens_on_loopback_only(cluster):
    c = cluster(3)
    sockets = listening(descendants(os.getpid()))
    ranks = [p.pid for p in c._procs]
    assert c._store.port in {int(a.rsplit(":", 1)[1]) for a in sockets}, sockets  # held by this process
    assert {pid for pid in sockets.values()} >= set(ranks), sockets
    assert all(is_loopback(address) for address in sockets), sockets
