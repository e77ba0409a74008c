"""Decoding: the KV-cache decode loop (`loop`), used by `prunepath generate` and the benchmarks, and the
compiled one-token step for Llama-architecture models on a GPU (`compiled`)."""
