"""Helpers of the method study and the replication benchmarks: measurements and baselines that are
experiments, not part of the library."""
