"""Transitional: parallel.py was split into launcher.py (the local launcher, torchrun's environment),
mesh.py (devices, groups, the mesh, FSDP2) and watchdog.py (heartbeats, failed peers, /proc).
These names stay importable from here only while files with pending edits still import them
(config.py's placement, commands/train.py's under_torchrun); this module goes once they import
the new modules."""
from .launcher import under_torchrun
from .mesh import placement

__all__ = ["placement", "under_torchrun"]
