"""Training the routers (and optionally a LoRA adapter): configuration (`config`), text (`data`, `selfdata`),
what is trainable (`trainable`), the losses (`losses`), the loop (`trainer`), its command line (`cli`), and the
low-rank extraction of a full fine-tune (`lowrank`, `extract`)."""
