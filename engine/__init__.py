"""Runtime for the SHARP inference service: network, checkpoints, pre- and post-processing."""
