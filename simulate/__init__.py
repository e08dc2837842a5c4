"""Offline simulation of training and test data.

abTEM is imported lazily (only by :mod:`stemlive.simulate.pacbed` and friends) so the
numpy-only parts -- library reading and synthetic-scan composition -- work in the live core,
which must not need abTEM.
"""
