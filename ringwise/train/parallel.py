"""Transitional: parallel.py was split into launcher.py (the local launcher, torchrun's environment),
mesh.py (devices, groups, the mesh, FSDP2) and watchdog.py (heartbeats, failed peers, /proc).
Only config.py still imports `placement` from here; this module goes once it imports mesh.py."""
from .mesh import placement

__all__ = ["placement"]
