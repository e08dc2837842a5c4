"""ResultStore layout and crash behaviour, the wire format, and the publisher's sockets."""
from __future__ import annotations

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
import zmq

from stemlive.live.publisher import Publisher
from stemlive.live.state import LiveState
from stemlive.live.store import STORE_FLAGS, ResultStore, StoreLayout, flag_bits, flag_names, read_store
from stemlive.protocol import RequestError, WireError, decode, encode, parse_request
from stemlive.models.pacbed_analysis import PacbedEstimate

LAYOUT = StoreLayout(scan_shape=(10, 12), block_shape=(4, 4), sig_shape=(6, 5))


def est(t=12.5, flags=("low-confidence",)):
    return PacbedEstimate(center_px=(2.5, 2.0), radius_px=1.5, rotation_deg=3.0, thickness_nm=t,
                          thickness_sigma_nm=0.8, tilt_mrad=(0.5, -1.0), tilt_sigma_mrad=(0.1, 0.2),
                          tilt_crystal_mrad=(0.4, -1.1), background=7.0, in_range=True, flags=list(flags))


def make_store(tmp_path, **kw):
    return ResultStore.create(tmp_path / "r.h5", LAYOUT, alpha_mrad=13.6, kv=200, mrad_per_px=1.3,
                              scan_step_nm=0.05, models=[{"id": "m1"}], rings={"bf": [0, 0.5, "alpha"]}, **kw)


def test_store_layout_and_attributes(tmp_path):
    s = make_store(tmp_path)
    with h5py.File(s.path, "r") as f:
        a = f.attrs
        assert a["state"] == "running" and list(a["scan_shape"]) == [10, 12] and list(a["block_shape"]) == [4, 4]
        for k in ("alpha_mrad", "kv", "mrad_per_px", "scan_step_nm", "scan_rotation_deg", "models",
                  "stemlive_version", "started", "finished"):
            assert k in a, k
        assert f["maps/thickness_nm"].shape == (3, 3) and np.isnan(f["maps/thickness_nm"][()]).all()
        assert f["maps/tilt_mrad"].shape == (3, 3, 2) and f["maps/center_px"].shape == (3, 3, 2)
        assert f["virtual/haadf"].shape == (10, 12) and f["blocks/pacbed"].shape == (3, 3, 6, 5)
        assert set(f["blocks"]) == {"pacbed", "counts", "done", "partial"}
    with pytest.raises(FileExistsError):
        make_store(tmp_path)


def test_store_blocks_readable_by_plain_h5py_during_the_run_and_abort_is_honest(tmp_path):
    s = make_store(tmp_path)
    pac = np.ones((2, 6, 5), np.float32)
    s.write_blocks(np.array([[0, 0], [2, 1]]), pac, np.array([16, 8]), [est(), PacbedEstimate(error="bad")],
                   np.array([False, True]), frames_seen=40)
    code = ("import h5py, sys; f = h5py.File(sys.argv[1], 'r'); m = f['maps/thickness_nm'][()]; "
            "print(f.attrs['state'], m[0, 0], int(f['blocks/done'][()].sum()), int(f['maps/flags'][2, 1]))")
    out = subprocess.run([sys.executable, "-c", code, str(s.path)], capture_output=True, text=True, check=True).stdout
    state, t, done, flags = out.split()
    assert state == "running" and float(t) == 12.5 and done == "2"
    assert set(flag_names(int(flags))) == {"error", "partial"}
    # another process holding the file open (a dashboard, a notebook) does not stop the writer
    hold = ("import h5py, sys; f = h5py.File(sys.argv[1], 'r'); print('open', flush=True); sys.stdin.read(); "
            "print(int(f['blocks/done'][()].sum()))")
    reader = subprocess.Popen([sys.executable, "-c", hold, str(s.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "open"
    s.write_blocks(np.array([[1, 1]]), pac[:1], np.array([16]), [est(30.0)], np.array([False]), 60)
    s.finish("aborted", "detector stopped at frame 60")
    out, _ = reader.communicate("", timeout=30)
    assert out.strip() == "3"
    r = read_store(s.path)
    assert r["attrs"]["state"] == "aborted" and "frame 60" in r["attrs"]["reason"] and r["attrs"]["finished"]
    assert r["maps"]["thickness_nm"][1, 1] == 30.0 and r["maps"]["in_range"][0, 0] == 1
    assert r["maps"]["in_range"][2, 1] == -1 and np.isnan(r["maps"]["thickness_nm"][2, 1])
    assert r["blocks"]["counts"][0, 0] == 16 and r["blocks"]["partial"][2, 1]
    assert flag_names(r["maps"]["flags"][0, 0]) == ["low-confidence"]
    with pytest.raises(RuntimeError, match="closed"):
        s.write_blocks(np.array([[0, 1]]), pac[:1], np.array([16]), [est()], np.array([False]), 70)


def test_flag_bits_round_trip_and_unknown_flag():
    assert flag_names(flag_bits(["vacuum", "partial"])) == ["vacuum", "partial"]
    assert len(STORE_FLAGS) <= 32
    with pytest.raises(ValueError, match="unknown flag"):
        flag_bits(["sunburn"])


def test_wire_round_trip_and_malformed():
    arrays = {"a": np.arange(6, dtype=">f4").reshape(2, 3), "b": np.array([True, False])}
    header, back = decode(encode({"type": "x", "n": float("nan")}, arrays))
    assert header["type"] == "x" and header["schema"] == 1
    np.testing.assert_array_equal(back["a"], arrays["a"]) and np.testing.assert_array_equal(back["b"], arrays["b"])
    assert back["a"].dtype.str == "<f4"
    frames = encode({"type": "x"}, {"a": np.zeros(4)})
    with pytest.raises(WireError, match="bytes for shape"):
        decode([frames[0], frames[1][:-3]])
    with pytest.raises(WireError, match="not JSON"):
        decode([b"\x00{", frames[1]])
    with pytest.raises(WireError, match="announces 1 arrays"):
        decode(frames[:1])
    with pytest.raises(WireError, match="schema"):
        decode([json.dumps({"schema": 99}).encode()])
    with pytest.raises(WireError, match="object"):
        encode({}, {"o": np.array([object()])})


def test_publisher_pub_and_rep():
    state = LiveState(LAYOUT, {"alpha_mrad": 13.6})
    pub = Publisher(state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub.pub_address)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    req = ctx.socket(zmq.REQ)
    req.connect(pub.rep_address)
    req.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        import time

        time.sleep(0.3)  # slow joiner: let the subscription arrive
        rows = {"thickness_nm": np.array([12.5], np.float32)}
        seq = state.apply_blocks(np.array([[1, 2]]), {"thickness_nm": rows["thickness_nm"]},
                                 np.full((1, 6, 5), 32.0, np.float32), np.array([16]), np.array([False]))
        pub.blocks(seq, np.array([[1, 2]]), rows)
        sub.setsockopt(zmq.RCVTIMEO, 5000)
        header, arrays = decode(sub.recv_multipart())
        assert header["type"] == "blocks" and arrays["indices"].tolist() == [[1, 2]]
        assert arrays["maps/thickness_nm"][0] == 12.5
        req.send_json({"type": "state"})
        header, arrays = decode(req.recv_multipart())
        assert header["status"]["blocks_done"] == 1 and arrays["maps/thickness_nm"][1, 2] == 12.5
        assert arrays["blocks/done"].sum() == 1 and header["meta"]["alpha_mrad"] == 13.6
        req.send_json({"type": "pacbed", "block": [1, 2]})
        header, arrays = decode(req.recv_multipart())
        assert header["frames"] == 16 and np.allclose(arrays["pacbed"], 2.0)
        req.send_json({"type": "pacbed", "block": [9, 9]})
        header, _ = decode(req.recv_multipart())
        assert header["type"] == "error" and "outside" in header["error"]
        req.send(b"not json")
        header, _ = decode(req.recv_multipart())
        assert header["type"] == "error"
    finally:
        sub.close()
        req.close()
        pub.close()


def test_publisher_binds_loopback_by_default():
    state = LiveState(LAYOUT, {})
    pub = Publisher(state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    try:
        assert pub.pub_address.startswith("tcp://127.0.0.1:") and pub.rep_address.startswith("tcp://127.0.0.1:")
        with pytest.raises(OSError, match="cannot bind"):
            Publisher(state, pub.pub_address, "tcp://127.0.0.1:0")
    finally:
        pub.close()


def test_beyond_loopback_needs_a_token_and_the_token_guards_the_sockets():
    from stemlive.protocol.security import is_loopback, secure_client

    assert is_loopback("tcp://127.0.0.1:5557") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:1")
    assert not is_loopback("tcp://0.0.0.0:5557") and not is_loopback("tcp://*:5557")
    state = LiveState(LAYOUT, {"alpha_mrad": 13.6})
    with pytest.raises(PermissionError, match="access token"):
        Publisher(state, "tcp://0.0.0.0:0", "tcp://127.0.0.1:0")
    pub = Publisher(state, "tcp://0.0.0.0:0", "tcp://0.0.0.0:0", token="s3cret-Qx7vL2pN9wKd")
    rep_port = pub.rep_address.rsplit(":", 1)[1]
    ctx = zmq.Context.instance()
    good, bad = ctx.socket(zmq.REQ), ctx.socket(zmq.REQ)
    try:
        secure_client(good, "s3cret-Qx7vL2pN9wKd")
        secure_client(bad, "wrong")
        for s in (good, bad):
            s.setsockopt(zmq.RCVTIMEO, 3000)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(f"tcp://127.0.0.1:{rep_port}")
            s.send_json({"type": "state"})
        header, _ = decode(good.recv_multipart())
        assert header["type"] == "state"
        with pytest.raises(zmq.Again):  # the handshake never completes: no reply
            bad.recv_multipart()
    finally:
        good.close()
        bad.close()
        pub.close()


def test_atom_table_is_cut_at_finish_and_marked_when_full(tmp_path):
    """Rows beyond the pre-allocation are not written (the run goes on) and the table says so."""
    import h5py

    from stemlive.models.atom_regions import AtomRows

    layout = StoreLayout((8, 8), (4, 4), (5, 5), atoms="haadf")
    store = ResultStore.create(tmp_path / "s.h5", layout, alpha_mrad=13.6, kv=200)
    rows = AtomRows(np.arange(6, dtype=np.float32).reshape(3, 2), np.ones(3, np.float32),
                    np.full(3, 2.0, np.float32), np.zeros((3, 2), np.int32))
    store.write_atoms(rows, np.eye(2, dtype=bool))
    assert read_store(tmp_path / "s.h5")["atoms"]["positions"].shape == (3, 2)  # readable mid-run
    n = layout.max_atoms
    many = AtomRows(np.zeros((n, 2), np.float32), np.ones(n, np.float32), np.ones(n, np.float32),
                    np.zeros((n, 2), np.int32))
    store.write_atoms(many, np.ones((2, 2), bool))
    store.finish()
    r = read_store(tmp_path / "s.h5")
    assert len(r["atoms"]["positions"]) == n and r["atoms"]["analysed"].all()
    np.testing.assert_array_equal(r["atoms"]["positions"][:3], rows.positions_px)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["atoms"].attrs["truncated"] and f["atoms/positions"].shape == (n, 2)


def test_requests_checked_on_arrival_and_old_import_paths_kept():
    import stemlive.live.security as old_security
    import stemlive.live.wire as old_wire
    from stemlive.protocol import pacbed_request, security, state_request, wire

    assert parse_request(json.dumps(state_request()).encode()) == ("state", ())
    assert parse_request(json.dumps(pacbed_request(3, 4)).encode()) == ("pacbed", (3, 4))
    for raw, why in ((b"{", "not JSON"), (b'{"type": "atoms"}', "unknown request type"),
                     (b'{"type": "pacbed", "block": [1]}', "two integers"), (b"[1]", "unknown request type")):
        with pytest.raises(RequestError, match=why):
            parse_request(raw)
    assert old_wire.encode is wire.encode and old_security.check_bind is security.check_bind


def test_dashboards_do_not_import_live():
    """The dashboard speaks to the engine through stemlive.protocol only."""
    import ast
    from pathlib import Path

    import stemlive.dashboards as d

    for path in Path(d.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.level == 2 and (node.module or "").startswith("live")), f"{path.name} imports live"
                assert not (node.module or "").startswith("stemlive.live"), f"{path.name} imports live"


def column_rows(n=3, k=5):
    from stemlive.models.atom_regions import AtomRows

    rows = AtomRows(np.arange(2 * n, dtype=np.float32).reshape(n, 2), np.ones(n, np.float32),
                    np.full(n, 2.0, np.float32), np.zeros((n, 2), np.int32))
    rows.species = np.array([0, 1, -1][:n], np.int8)
    rows.species_prob = np.full((n, k), 1.0 / k, np.float32)
    rows.species_prob[2:] = np.nan
    rows.anomaly = np.array([0.5, 4.0, np.nan][:n], np.float32)
    rows.anomaly_flag = np.array([False, True, False][:n])
    return rows


def test_column_species_and_anomaly_in_store_state_and_atoms_message(tmp_path):
    """/atoms/{species, species_prob, anomaly, anomaly_flag}: stored (cut at finish, attributes
    kept), in the full state and on the atoms message (header + raw arrays, no pickle)."""
    names = ("Sr", "Ti-O", "O", "vacant", "partial")
    layout = StoreLayout((8, 8), (4, 4), (5, 5), atoms="haadf", atom_classes=names, anomaly_threshold=3.2)
    store = ResultStore.create(tmp_path / "s.h5", layout, alpha_mrad=13.6, kv=200)
    rows = column_rows()
    store.write_atoms(rows, np.eye(2, dtype=bool))
    mid = read_store(tmp_path / "s.h5")["atoms"]  # readable mid-run
    np.testing.assert_array_equal(mid["species"], rows.species)
    store.finish()
    a = read_store(tmp_path / "s.h5")["atoms"]
    assert a["species_names"] == list(names) and a["anomaly_threshold"] == pytest.approx(3.2)
    assert a["species"].dtype == np.int8 and a["species_prob"].shape == (3, 5)
    np.testing.assert_array_equal(a["anomaly"], rows.anomaly)
    np.testing.assert_array_equal(a["anomaly_flag"], rows.anomaly_flag)
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert json.loads(f["atoms/species"].attrs["names"]) == list(names)
        assert f["atoms/anomaly_flag"].attrs["threshold"] == pytest.approx(3.2)

    state = LiveState(layout, {"alpha_mrad": 13.6})
    header, arrays = state.full_state()  # on, but no column yet: empty arrays of the right shape
    assert arrays["atoms/species_prob"].shape == (0, 5) and header["atoms"]["species_names"] == list(names)
    pub = Publisher(state, "tcp://127.0.0.1:0", "tcp://127.0.0.1:0")
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.connect(pub.pub_address)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    try:
        import time

        time.sleep(0.3)
        seq = state.apply_atoms(rows, [(0, 0)])
        pub.atoms(seq, rows, [(0, 0)])
        header, arrays = decode(sub.recv_multipart())
        assert header["type"] == "atoms" and header["species_names"] == list(names)
        assert header["anomaly_threshold"] == pytest.approx(3.2)
        np.testing.assert_array_equal(arrays["atoms/species"], rows.species)
        np.testing.assert_array_equal(arrays["atoms/anomaly"], rows.anomaly)
        np.testing.assert_array_equal(arrays["atoms/anomaly_flag"], rows.anomaly_flag)
        assert arrays["atoms/species_prob"].shape == (3, 5)
    finally:
        sub.close()
        pub.close()
    _, arrays = state.full_state()
    np.testing.assert_array_equal(arrays["atoms/species"], rows.species)


def test_old_store_without_column_analyses_reads(tmp_path):
    """A store written before species/anomaly (no such datasets) reads; the fields are absent."""
    layout = StoreLayout((8, 8), (4, 4), (5, 5), atoms="haadf")
    store = ResultStore.create(tmp_path / "old.h5", layout, alpha_mrad=13.6, kv=200)
    rows = column_rows()
    store.write_atoms(rows, np.eye(2, dtype=bool))  # analyses given, the store has no place: dropped
    store.finish()
    with h5py.File(tmp_path / "old.h5", "r") as f:
        assert "species" not in f["atoms"]
    a = read_store(tmp_path / "old.h5")["atoms"]
    assert len(a["positions"]) == 3 and "species" not in a and "anomaly" not in a
    state = LiveState(layout, {})
    state.apply_atoms(type(rows)(rows.positions_px, rows.confidence, rows.intensity, rows.block), [(0, 0)])
    header, arrays = state.full_state()
    assert "atoms/species" not in arrays and "atoms" not in header
