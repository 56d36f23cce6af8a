"""Generators of the test vectors in protocol/vectors/ (hard-coded keys, nonces and times)."""
