"""Acquisition side of stemlive: the `stemlive` entry point and (from issue 4) the live engine."""
