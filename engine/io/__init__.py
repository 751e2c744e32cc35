"""Inputs from outside: image decoding and checkpoint loading."""
