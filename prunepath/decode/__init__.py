"""Decoding: the KV-cache decode loop (`loop`), used by `prunepath generate` and the benchmarks."""
