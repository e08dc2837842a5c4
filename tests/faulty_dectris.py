"""A deliberately faulty DECTRIS detector: LiberTEM-live's REST shim plus a raw pyzmq PUSH stream
that breaks the SIMPLON protocol in one chosen way at one chosen frame."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading

import numpy as np
import zmq

from stemlive.live.dectris_dump import BitshuffleLZ4, detector_config

FAULTS = ("malformed-json", "wrong-shape", "wrong-dtype", "truncated", "out-of-order", "missing-frame",
          "stops", "never-starts")


class FaultyDetector:
    def __init__(self, frames: np.ndarray, fault: str, at: int, series: int = 7):
        from libertem_live.detectors.dectris import sim as lsim

        assert fault in FAULTS, fault
        self.frames = np.ascontiguousarray(frames.reshape(-1, *frames.shape[-2:]), np.uint16)
        self.fault, self.at, self.series = fault, at, series
        n, h, w = self.frames.shape
        self.headers = [{"htype": "dheader-1.0", "series": series, "header_detail": "basic"},
                        detector_config(n, (h, w), np.uint16, "bslz4")]
        self._arm = multiprocessing.Event()
        self._listen = multiprocessing.Event()
        self._port = multiprocessing.Value("l", -1)
        self._api = multiprocessing.Process(
            target=lsim.run_api, daemon=True,
            kwargs={"port": 0, "headers": self.headers, "arm_event": self._arm,
                    "trigger_event": multiprocessing.Event(), "listen_event": self._listen, "port_value": self._port})
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self.data_port = self._push.bind_to_random_port("tcp://127.0.0.1")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def api_port(self) -> int:
        return int(self._port.value)

    def __enter__(self):
        self._api.start()
        assert self._listen.wait(10)
        self._thread.start()
        return self

    def arm(self):
        self._arm.set()

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self._api.terminate()
        if not self._thread.is_alive():
            self._push.close()
            self._ctx.term()

    def _send(self, parts):
        """Send one (multipart) message; give up when stopped (the socket belongs to this thread)."""
        for i, p in enumerate(parts):
            data = p if isinstance(p, bytes) else json.dumps(p).encode()
            flags = zmq.SNDMORE if i < len(parts) - 1 else 0
            while not self._push.poll(100, zmq.POLLOUT):
                if self._stop.is_set():
                    return
            self._push.send(data, flags=flags)

    def _frame_parts(self, i: int, frame: np.ndarray, enc) -> list:
        h, w = frame.shape
        payload = enc(frame)
        image = {"htype": "dimage-1.0", "series": self.series, "frame": i, "hash": hashlib.md5(payload).hexdigest()}
        desc = {"htype": "dimage_d-1.0", "shape": [w, h], "type": "uint16", "encoding": "bs16-lz4<"}
        conf = {"htype": "dconfig-1.0", "start_time": i, "stop_time": i + 1, "real_time": 1}
        if i == self.at:
            if self.fault == "malformed-json":
                image = b'{"htype": "dimage-1.0", "series": ' + str(self.series).encode() + b', "frame": '
            elif self.fault == "wrong-shape":
                bigger = np.zeros((h, w + 3), np.uint16)
                payload = BitshuffleLZ4((h, w + 3), np.uint16)(bigger)
                desc["shape"] = [w + 3, h]
            elif self.fault == "wrong-dtype":
                payload = BitshuffleLZ4((h, w), np.uint32)(frame.astype(np.uint32))
                desc.update(type="uint32", encoding="bs32-lz4<")
            elif self.fault == "truncated":
                payload = payload[: len(payload) // 2]
        return [image, desc, payload, conf]

    def _run(self):
        if self.fault == "never-starts":
            return
        while not self._arm.wait(0.1):
            if self._stop.is_set():
                return
        enc = BitshuffleLZ4(self.frames.shape[1:], np.uint16)
        self._send([self.headers[0]])
        self._send([self.headers[1]])
        order = list(range(len(self.frames)))
        if self.fault == "out-of-order":
            order[self.at], order[self.at + 1] = order[self.at + 1], order[self.at]
        elif self.fault == "missing-frame":
            order.pop(self.at)
        for i in order:
            if self.fault == "stops" and i == self.at:
                return  # the detector goes silent: no more frames, no series end
            self._send(self._frame_parts(i, self.frames[i], enc))
        self._send([{"htype": "dseries_end-1.0", "series": self.series}])
