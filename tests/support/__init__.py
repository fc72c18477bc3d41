"""Helpers the tests share: a fake clock, waiting, JWT minting, loopback servers, gateway processes
and Redis topologies."""
