"""Multi-process tests: torchrun with the gloo backend on CPU."""
