"""ONNX Runtime on the CPU: the default backend, and the one the tests use."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Backend


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, session, path: Path):
        inp = session.get_inputs()[0]
        shape = tuple(d if isinstance(d, int) else None for d in inp.shape[1:])  # named axes are free
        super().__init__(path, inp.name, shape, [o.name for o in session.get_outputs()])
        self.session = session

    @classmethod
    def load(cls, path: str | Path, threads: int | None = None, spin: bool = False, **options) -> "OnnxRuntimeBackend":
        """``threads``: intra-op threads (None: ONNX Runtime's default, one per core).  Threads are
        set deliberately: one inter-op thread (the networks are single chains), and no spinning
        between runs (``spin``), so idle inference threads do not take the cores frame ingest
        runs on -- measured on 2 shared cores, spinning threads made a batch of 64 30-50 %
        slower whenever another process was busy."""
        import onnxruntime as ort

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"model file {path} does not exist")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        return cls(sess, path)

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.output_names, {self.input_name: batch})
        return dict(zip(self.output_names, outs))

    def metadata(self) -> dict[str, str]:
        """The ONNX file's ``metadata_props`` (the card id and input contract travel there)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)
