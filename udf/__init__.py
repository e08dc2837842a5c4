"""LiberTEM UDFs of stemlive (reductions only: per-block PACBED sums, virtual detectors)."""
from .block_grid import BlockGrid
from .block_pacbed import BlockPacbedUDF
from .kernels import warm_up
from .virtual_detector import VirtualDetectorUDF

__all__ = ["BlockGrid", "BlockPacbedUDF", "VirtualDetectorUDF", "warm_up"]
