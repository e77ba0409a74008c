"""Evaluation: results and routing statistics (`result`), perplexity, classification (`nlu`, `scoring`),
instruction following (`ifeval`), the `prunepath eval` entry (`tasks`), the baselines PrunePath is compared
against (`baselines`), and sparsity/accuracy sweeps (`sweep`, `sweep_cli`; their views: `prunepath.report`)."""
