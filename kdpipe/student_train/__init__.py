"""Student builders (LRC, plain), losses, streaming loader, trainer, checkpoints, export, eval."""
