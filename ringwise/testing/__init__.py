"""The process harness of the tests and benchmarks (as torch's common_distributed is torch's):
cluster.py (`LocalCluster`: W local processes in one process group, many jobs per start-up,
every failure reported with each rank's traceback), comms.py (`count_comms`: every
torch.distributed call a piece of code makes), memory.py (`PeakMemory`: peak memory of a piece
of work on CPU and CUDA).

Product code does not import it: inside ringwise/ only what measures does (the benchmark suites,
`ringwise demo`, and `ringwise generate`'s collective count), held by tests/test_imports.py.
"""
