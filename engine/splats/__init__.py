"""Gaussians after the network: geometry, colour, pruning and every file format."""
