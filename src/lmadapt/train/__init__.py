"""The training loop (`loop`), its checkpoints and the distributed strategies: import each by its
dotted name; the package itself imports nothing, so reading a checkpoint never loads the loop."""
