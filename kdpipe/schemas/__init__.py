"""Typed configs and on-disk store contracts. Imports nothing from the rest of kdpipe."""
