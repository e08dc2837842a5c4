"""`Publisher`: ZMQ PUB of each analysed block batch, and a REP socket for late joiners.

PUB messages (wire format, `stemlive.protocol.wire`): ``blocks`` (indices and their map values; header
``stage`` "network" when the networks have read the blocks, "check" when the library check's
values replace them later -- ``maps/method`` says the same per block; ``completed``: when the
engine had the newest block's last frame, wall clock), ``virtual``
(rows of the virtual images), ``atoms`` (columns found in newly analysed blocks, with their
species and anomaly when the run has the per-column analyses), ``status``.  REP requests are JSON: ``{"type": "state"}`` returns the
full current state, ``{"type": "pacbed", "block": [i, j]}`` one block's mean PACBED and estimates,
``{"type": "rings", "rings": {name: [inner, outer, unit]}}`` the ring images of the whole scan for
the operator's rings (header ``rings``, ``seq``, ``radial``; arrays ``rings/<name>``, NaN where no
frame yet), summed from the state's per-frame profiles on this thread, never the engine's.
Both sockets bind 127.0.0.1 unless told otherwise; any other address needs an access token
(`stemlive.protocol.security`: CURVE keys derived from it).
"""
from __future__ import annotations

import logging
import threading
import time

import numpy as np
import zmq

from ..protocol import RequestError, check_bind, encode, parse_request, secure_server
from .state import LiveState

log = logging.getLogger(__name__)


class Publisher:
    def __init__(self, state: LiveState, pub: str = "tcp://127.0.0.1:5557", rep: str = "tcp://127.0.0.1:5558",
                 context: zmq.Context | None = None, token: str | None = None):
        check_bind(pub, token)
        check_bind(rep, token)
        self.state = state
        self.ctx = context or zmq.Context.instance()
        self._pub = self.ctx.socket(zmq.PUB)
        self._rep = self.ctx.socket(zmq.REP)
        if token:  # encrypted, and only clients that know the token can connect
            secure_server(self._pub, token)
            secure_server(self._rep, token)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 1000)  # a slow subscriber loses messages, never stalls us
        self.pub_address = self._bind(self._pub, pub)
        self._rep.setsockopt(zmq.LINGER, 0)
        self.rep_address = self._bind(self._rep, rep)
        self._pub_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="stemlive-rep", daemon=True)
        self._thread.start()

    @staticmethod
    def _bind(sock, address: str) -> str:
        """Bind; port 0 means any free port. Returns the address actually bound."""
        if address.endswith(":0"):
            port = sock.bind_to_random_port(address[: address.rindex(":")])
            return f"{address[: address.rindex(':')]}:{port}"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind {address}: {exc} (is another stemlive running? choose another port)") from None
        return address

    def send(self, header: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        with self._pub_lock:
            self._pub.send_multipart(encode(header, arrays), copy=False)

    def blocks(self, seq: int, indices: np.ndarray, rows: dict[str, np.ndarray], stage: str = "network",
               completed: float | None = None) -> None:
        """``completed``: when (``time.time()``) the engine had the last frame of the newest of
        these blocks; a dashboard on the same machine measures that frame -> its page from it."""
        header = {"type": "blocks", "seq": seq, "sent": time.time(), "stage": stage}
        if completed is not None:
            header["completed"] = float(completed)
        self.send(header, {"indices": np.asarray(indices, np.int32), **{f"maps/{k}": v for k, v in rows.items()}})

    def virtual(self, seq: int, rows: slice, images: dict[str, np.ndarray]) -> None:
        self.send({"type": "virtual", "seq": seq, "rows": [rows.start, rows.stop], "sent": time.time()},
                  {f"virtual/{k}": v for k, v in images.items()})

    def atoms(self, seq: int, rows, blocks: list[tuple[int, int]]) -> None:
        """Columns of newly analysed blocks; with the per-column analyses also ``atoms/species``
        (int8, -1 unknown), ``atoms/species_prob`` (n, k), ``atoms/anomaly`` (NaN unknown),
        ``atoms/anomaly_flag``, and the header's ``species_names`` and ``anomaly_threshold``."""
        header = {"type": "atoms", "seq": seq, "sent": time.time()}
        if rows.species is not None:
            header["species_names"] = list(self.state.layout.atom_classes)
            header["anomaly_threshold"] = self.state.layout.anomaly_threshold
        self.send(header, {**rows.arrays(), "atoms/analysed_blocks": np.asarray(blocks, np.int32).reshape(-1, 2)})

    def status(self, status: dict) -> None:
        self.send({"type": "status", "status": status})

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._rep, zmq.POLLIN)
        while not self._stop.is_set():
            if not dict(poller.poll(100)):
                continue
            raw = self._rep.recv_multipart()
            try:
                kind, args = parse_request(raw[0])
                if kind == "state":
                    header, arrays = self.state.full_state()
                elif kind == "rings":
                    header, arrays = self.state.ring_images(*args)
                else:  # "pacbed"
                    header, arrays = self.state.block_pacbed(*args)
                reply = encode(header, arrays)
            except RequestError as exc:
                reply = encode({"type": "error", "error": str(exc)})
            except Exception as exc:  # a failing answer gets an error reply, never kills the server
                reply = encode({"type": "error", "error": f"{type(exc).__name__}: {exc}"})
            self._rep.send_multipart(reply, copy=False)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._pub.close()
        self._rep.close()
