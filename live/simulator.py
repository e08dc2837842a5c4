"""`stemlive sim-detector`: any dataset served as a DECTRIS detector (SIMPLON REST API + ZMQ stream).

The dataset is written once as a stream dump (`dectris_dump`) and replayed by LiberTEM-live's own
`DectrisSim` (a Flask copy of the REST API and the Rust replayer), so LiberTEM-live's real
`dectris` connection consumes it exactly as it would a DCU, in active and passive mode; every
arm replays the acquisition again.  Frames are paced by the dwell time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dectris_dump import detector_dtype, iter_frames, write_dump

log = logging.getLogger(__name__)


def input_array(path: Path, scan_shape: tuple[int, int] | None = None, cache: Path | None = None) -> np.ndarray:
    """The frames of INPUT as an (H, W, h, w) array (memory-mapped where possible).

    INPUT: a .npy, a synthetic-scan directory (frames.npy inside), or any dataset LiberTEM can
    read (exported once to .npy in the cache).
    """
    path = Path(path)
    if path.is_dir() and (path / "frames.npy").exists():
        path = path / "frames.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.suffix == ".npy":
        data = np.load(path, mmap_mode="r")
    else:
        data = _export_with_libertem(path, scan_shape, cache)
    if scan_shape is not None:
        n = int(np.prod(data.shape[:-2]))
        if int(np.prod(scan_shape)) != n:
            raise ValueError(f"--scan-shape {tuple(scan_shape)} holds {int(np.prod(scan_shape))} frames, {path} has {n}")
        data = data.reshape(*scan_shape, *data.shape[-2:])
    if data.ndim != 4:
        raise ValueError(f"{path}: need a 2D scan of 2D frames, got shape {data.shape} (give --scan-shape)")
    return data


def _export_with_libertem(path: Path, scan_shape, cache: Path | None) -> np.ndarray:
    from libertem.api import Context

    from .replay import open_dataset

    cache = Path(cache) if cache else _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_mtime_ns}:{scan_shape}".encode()).hexdigest()[:12]
    out = cache / f"{path.stem}-{key}.npy"
    if not out.exists():
        with Context.make_with("inline") as ctx:
            ds = open_dataset(ctx, path, scan_shape)
            tmp = out.with_name(out.name + ".part.npy")
            ctx.export_dataset(ds, path=tmp, overwrite=True, progress=True)
            tmp.replace(out)
    return np.load(out, mmap_mode="r")


def _cache_dir() -> Path:
    from ..simulate.cli import default_cache_dir

    d = default_cache_dir() / "sim-detector"
    d.mkdir(parents=True, exist_ok=True)
    return d


def dump_for(data: np.ndarray, source: Path, encoding: str = "bslz4", cache: Path | None = None,
             progress: bool = True) -> Path:
    """The stream dump of ``data`` in the cache (written once per source file and encoding)."""
    cache = Path(cache) if cache else _cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    st = Path(source).stat()
    key = hashlib.sha256(json.dumps([str(Path(source).resolve()), st.st_size, st.st_mtime_ns, encoding,
                                     list(data.shape), str(data.dtype)]).encode()).hexdigest()[:16]
    out = cache / f"stream-{key}-{encoding}.dump"
    if not out.exists():
        n = int(np.prod(data.shape[:-2]))
        write_dump(iter_frames(data), n, data.shape[-2:], detector_dtype(data.dtype), out, encoding=encoding,
                   progress=progress)
    return out


def _port_safe_sim(path: Path, port: int, zmqport: int, dwelltime: int | None):
    """LiberTEM-live's DectrisSim, with the stream headers read from the dump file.

    LiberTEM-live 0.3's replayer reads the headers by opening its ZMQ socket twice in a row; with a
    fixed port (DESIGN.md: 9999) the second bind panics because ZMQ frees ports asynchronously.
    Reading the two header records from the file instead binds the socket once, when it serves.
    """
    import multiprocessing

    from libertem_live.detectors.dectris import sim as lsim

    class FileHeaderReplay(lsim.RustedReplay):
        def read_headers(self):
            return lsim.read_headers(self._path)

    class PortSafeDectrisSim(lsim.DectrisSim):
        def __init__(self):  # DectrisSim.__init__ with FileHeaderReplay (path replay only)
            arm_event, trigger_event = multiprocessing.Event(), multiprocessing.Event()
            self.stop_event = multiprocessing.Event()
            self.api_listen_event = multiprocessing.Event()
            self.api_port = multiprocessing.Value("l", -1)
            self.dwelltime, self.verbose, self._num_mock_frames = dwelltime, False, None
            self.zmq_replay = FileHeaderReplay(
                uri=f"tcp://127.0.0.1:{zmqport}" if zmqport else "tcp://127.0.0.1", random_port=not bool(zmqport),
                path=str(path), name="zmq_replay", arm_event=arm_event, trigger_event=trigger_event,
                stop_event=self.stop_event, dwelltime=dwelltime, tolerate_timeouts=True, verbose=False)
            headers = _paced_headers(self.zmq_replay.read_headers(), dwelltime)
            self.zmq_replay.daemon = True
            self.api_server = multiprocessing.Process(
                target=_run_api_with_parent, daemon=True,
                kwargs={"port": port, "headers": headers, "arm_event": arm_event, "trigger_event": trigger_event,
                        "listen_event": self.api_listen_event, "port_value": self.api_port})

    return PortSafeDectrisSim()


UNPACED_FRAME_TIME_S = 1e-6  # what an unpaced simulator reports: faster than any detector


def _paced_headers(headers, dwell_us: int | None) -> list:
    """The detector config the REST API reports, with the frame time the replay keeps: clients
    size their work by it (stemlive: partitions), so it must be the pace, not the dump's value."""
    frame_time = dwell_us * 1e-6 if dwell_us else UNPACED_FRAME_TIME_S
    return [headers[0], {**headers[1], "frame_time": frame_time, "count_time": frame_time}, *headers[2:]]


def _run_api_with_parent(**kwargs) -> None:
    """LiberTEM-live's REST API process, gone with the simulator even if that is SIGKILLed."""
    from libertem_live.detectors.dectris import sim as lsim

    from .processes import exit_with_parent

    exit_with_parent()
    lsim.run_api(**kwargs)


def _check_free(port: int) -> None:
    import socket

    if port == 0:
        return
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise OSError(f"port {port} on 127.0.0.1 is in use (another simulator or stemlive?); "
                          "choose another port (0: any free one)") from None


@dataclass
class SimDetector:
    """A running simulated DCU; use as a context manager.  Ports 0 pick free ones."""

    dump: Path
    api_port: int = 8910
    data_port: int = 9999
    dwell_us: int | None = None

    def __enter__(self) -> "SimDetector":
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per REST call
        _check_free(self.api_port)
        _check_free(self.data_port)
        self._sim = _port_safe_sim(self.dump, self.api_port, self.data_port, self.dwell_us or None)
        self._sim.start()
        self._sim.wait_for_listen()
        self.api_port, self.data_port = int(self._sim.port), int(self._sim.zmqport)
        return self

    def alive(self) -> bool:
        return self._sim.is_alive()

    def __exit__(self, *exc) -> None:
        try:
            self._sim.stop()
        except Exception as e:  # a stuck replay thread is a daemon; do not mask the real error
            log.warning("simulator did not stop cleanly: %s", e)


def add_parser(sub) -> None:
    ap = sub.add_parser("sim-detector", help="serve a dataset as a DECTRIS detector (REST API + ZMQ stream)")
    ap.add_argument("input", type=Path,
                    help=".npy, synthetic scan directory, any dataset LiberTEM reads, or a .dump written before")
    ap.add_argument("--dwell-us", type=int, default=None, help="frame time in µs (default: as fast as possible)")
    ap.add_argument("--api-port", type=int, default=8910)
    ap.add_argument("--data-port", type=int, default=9999)
    ap.add_argument("--encoding", choices=("bslz4", "lz4"), default="bslz4")
    ap.add_argument("--scan-shape", type=int, nargs=2, default=None, metavar=("H", "W"))
    ap.add_argument("--cache", type=Path, default=None, help="where the stream dump is kept (default: user cache)")
    ap.set_defaults(func=run_cli)


def run_cli(args) -> int:
    if Path(args.input).suffix == ".dump":  # a stream dump written before: served as it is
        dump, what = Path(args.input), f"stream dump {args.input}"
        if not dump.exists():
            raise FileNotFoundError(f"{dump} does not exist")
    else:
        data = input_array(args.input, args.scan_shape, args.cache)
        dump = dump_for(data, args.input if not Path(args.input).is_dir() else Path(args.input) / "frames.npy",
                        args.encoding, cache=args.cache)
        what = (f"scan {data.shape[0]}×{data.shape[1]}, frames {data.shape[2]}×{data.shape[3]} "
                f"{detector_dtype(data.dtype)}, {args.encoding}")
    with SimDetector(dump, args.api_port, args.data_port, args.dwell_us) as sim:
        print(f"simulated DECTRIS detector: REST http://127.0.0.1:{sim.api_port}, stream tcp://127.0.0.1:{sim.data_port}",
              flush=True)
        print(f"  {what}; each arm replays it. Ctrl-C stops.", flush=True)
        try:
            while sim.alive():
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0
