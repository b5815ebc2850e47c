"""``python -m clseg_jax.serve <command>``: serve, token, worker, reaper, example-data.

``serve`` starts the API on loopback (embedded mode by default: SQLite, a local folder and an
in-process worker under ``$CLSEG_HOME``); ``token --owner NAME [--admin] [--expires-in-days D]``
prints a new API token;
``worker`` runs a Celery worker (``CLSEG_QUEUE=redis://...``); ``reaper`` requeues jobs of dead
workers when no API process runs one; ``gc`` deletes objects no row references (``garbage.py``);
``example-data`` writes example uploads.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m clseg_jax.serve")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the API (and, embedded, its worker)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p = sub.add_parser("token", help="create an API token for an owner; prints it once")
    p.add_argument("--owner", required=True)
    p.add_argument("--admin", action="store_true", help="may list and revoke every token")
    p.add_argument("--expires-in-days", type=float, default=None, help="default: never")
    sub.add_parser("worker", help="run a Celery worker (CLSEG_QUEUE=redis://...)")
    sub.add_parser("reaper", help="requeue jobs whose worker died (Celery deployments)")
    p = sub.add_parser("gc", help="delete stored objects that no row references (serve/garbage.py)")
    p.add_argument("--grace-s", type=float, default=None, help="minimum age (default 3600)")
    p = sub.add_parser("example-data", help="write example experiences as upload zips")
    p.add_argument("--out", default="serve_data/example")
    p.add_argument("--experiences", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command in ("serve", "worker"):
        from clseg_jax import hostmem

        print(hostmem.keep_freed_memory(), file=sys.stderr)  # before JAX's threads allocate

    from clseg_jax.serve import db
    from clseg_jax.serve.settings import Settings

    settings = Settings.from_env()
    if args.command == "serve":
        import uvicorn

        from clseg_jax.serve import api

        uvicorn.run(api.create_app(settings), host=args.host, port=args.port, log_level="info")
    elif args.command == "token":
        from clseg_jax.serve import api

        settings.prepare()
        db.migrate(settings.db_url)
        days = args.expires_in_days
        expires = None if days is None else days * 86400.0
        engine = db.make_engine(settings.db_url)
        print(api.create_token(engine, args.owner, admin=args.admin, expires_in_s=expires))
    elif args.command == "worker":
        from clseg_jax.serve import tasks

        app = tasks.make_celery(settings.queue)
        tasks.register(app, settings)
        settings.prepare()
        db.migrate(settings.db_url)
        app.worker_main(
            [
                "worker",
                "--pool=solo",
                "--concurrency=1",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                f"--hostname=clseg-{os.getpid()}@%h",
            ]
        )
    elif args.command == "reaper":
        from clseg_jax.serve import tasks

        engine = db.make_engine(settings.db_url)
        reaper = tasks.Reaper(settings, engine, tasks.make_celery(settings.queue))
        while True:
            reaper.once()
            time.sleep(reaper.period)
    elif args.command == "gc":
        from clseg_jax.serve import garbage, store

        db.migrate(settings.db_url)
        grace = garbage.GRACE_S if args.grace_s is None else args.grace_s
        gone = garbage.orphans(
            db.make_engine(settings.db_url), store.make_store(settings.store_url), grace
        )
        print(f"deleted {len(gone)} unreferenced objects older than {grace:g} s")
    elif args.command == "example-data":
        from clseg_jax.serve import example

        for path in example.write_zips(args.out, n=args.experiences):
            print(path)
    else:  # pragma: no cover - argparse rejects it first
        sys.exit(2)


if __name__ == "__main__":
    main()
