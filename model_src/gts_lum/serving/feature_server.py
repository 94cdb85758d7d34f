"""The Feast feature server, read-only: Feast's own app (`feast.feature_server.get_app`) with only its read routes.

    python -m gts_lum.serving.feature_server --repo feature_repo [--config production/feature_store.yaml] --host 127.0.0.1 --port 6566

`feast serve` also answers `/push`, `/write-to-online-store`, `/materialize` and `/materialize-incremental`
to anyone who can reach it, and Feast 0.67 has no switch to turn them off. Nothing of gts-lum writes
through the server (publishing materializes through the SDK, the scorer pushes through it), so this one
keeps only the routes in READ_ROUTES: every other path is a 404. Binds 127.0.0.1 unless told otherwise
(a container passes 0.0.0.0).
"""

from __future__ import annotations

import argparse

from gts_lum.serving.features import open_store

READ_ROUTES = ("/get-online-features", "/health")


def read_only_app(store):
    """Feast's feature-server app for `store` without the routes that write, materialize or chat."""
    from feast.feature_server import get_app  # lazy: the Feast side is optional

    app = get_app(store)
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) in READ_ROUTES]
    return app


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(prog="python -m gts_lum.serving.feature_server", description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, help="the Feast repository (feature_store.yaml and definitions)")
    p.add_argument("--config", help="a feature_store.yaml relative to the repository (default: its own)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (a container passes 0.0.0.0)")
    p.add_argument("--port", type=int, default=6566)
    args = p.parse_args(argv)
    uvicorn.run(read_only_app(open_store(args.repo, args.config)), host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
