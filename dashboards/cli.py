"""`stemlive dashboard`: the operator's page against a running engine or a result store (followed while written)."""
from __future__ import annotations

import os
from pathlib import Path


def add_parser(sub) -> None:
    ap = sub.add_parser("dashboard", help="the operator dashboard (Bokeh server) for a live engine or a result store")
    ap.add_argument("store", nargs="?", type=Path, default=None, help="a result store to open read-only (followed while its run is still writing it)")
    ap.add_argument("--sub", default="tcp://127.0.0.1:5557", help="the engine's PUB address")
    ap.add_argument("--req", default="tcp://127.0.0.1:5558", help="the engine's REP address")
    ap.add_argument("--port", type=int, default=5006)
    ap.add_argument("--address", default="127.0.0.1", help="listen address (other than loopback: needs --token)")
    ap.add_argument("--token", default=os.environ.get("STEMLIVE_TOKEN"), help="access token (default: $STEMLIVE_TOKEN)")
    ap.add_argument("--holder-axis-deg", type=float, default=None,
                    help="the holder's α axis on the detector, degrees from detector axis 1 towards axis 0: "
                         "region statistics then give the tilt correction as holder α/β (default: the run's, if stored)")
    ap.set_defaults(func=run)


def run(args) -> int:
    from .feed import LiveFeed, StoreFeed
    from .server import make_server, signed_url

    feed = StoreFeed(args.store) if args.store else LiveFeed(args.sub, args.req, token=args.token)
    server = make_server(feed, args.port, args.address, args.token, holder_axis_deg=args.holder_axis_deg)
    port = server.port
    url = signed_url(port, args.address, args.token) if args.token else f"http://{args.address}:{port}/"
    print(f"dashboard: {url}", flush=True)
    try:
        server.io_loop.start()
    except KeyboardInterrupt:
        pass
    finally:
        feed.close()
    return 0
