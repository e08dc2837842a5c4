"""LiberTEM UDFs of stemlive (reductions only: per-block PACBED sums, virtual detectors)."""
