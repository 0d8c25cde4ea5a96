"""`ann-mlp serve`: the server's command, added to ann_mlp's command line.

The console script starts here so that the library (`ann_mlp`) never imports the server: every
other command works without the server extra installed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import typer
from pydantic import ValidationError

from ann_mlp.cli import app, progress_bars
from ann_mlp.cli import main as run_cli
from ann_mlp.config import DEFAULT_SERVED, DEFAULT_STORE_ROOT, PRESET_BUILDS
from ann_mlp.errors import AnnMlpError


def bound_socket(host: str, port: int) -> socket.socket:
    """The listening address, taken before any store loads: a port in use is one line at once,
    not an exit after minutes of loading (and no other process can take it meanwhile)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as err:
        raise AnnMlpError(f"cannot bind to {host}: {err.strerror}") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise AnnMlpError(
            f"cannot listen on {host}:{port}: {err.strerror} (another server may hold it; choose one with --port)"
        ) from None
    return sock


def settings_problems(err: ValidationError, flags: set[str]) -> str:
    """A settings error in one line: each field, as its flag (`flags` have one) or ANN_MLP_ variable,
    and what is wrong with it."""
    problems = []
    for problem in err.errors():
        field = str(problem["loc"][0]) if problem["loc"] else ""
        message = problem["msg"].removeprefix("Value error, ")
        if not field:
            problems.append(message)
            continue
        named = f"--{field.replace('_', '-')} or " if field in flags else ""
        problems.append(f"{named}ANN_MLP_{field.upper()}: {message}")
    return "invalid settings: " + "; ".join(problems)


@app.command()
def serve(
    stores: list[Path] = typer.Argument(
        None, help=f"Index stores to serve [default: indexes/{DEFAULT_SERVED}, built on first run]."
    ),
    host: str | None = typer.Option(None, help="Bind address [127.0.0.1]."),
    port: int | None = typer.Option(None, help="Port [8000]."),
    shadow_rate: float | None = typer.Option(
        None, help="Share of requests re-run exactly, off the request path, for live recall."
    ),
    replicas: int | None = typer.Option(
        None, help="Serve N replicas, each with its own engine, on Ray Serve [one plain process]."
    ),
    ray_address: str | None = typer.Option(
        None, help="With --replicas: an existing Ray cluster ('auto', HOST:6379) [a local Ray on 127.0.0.1]."
    ),
    min_replicas: int | None = typer.Option(None, help="With --replicas: autoscale down to this many."),
    max_replicas: int | None = typer.Option(None, help="With --replicas: autoscale up to this many."),
    target_ongoing_requests: float | None = typer.Option(
        None, help="With autoscaling: requests in progress per replica to aim at [8]."
    ),
) -> None:
    """Serve approximate-MLP inference over HTTP (OpenAI-compatible and native routes)."""
    try:
        from server.settings import ServerSettings, apply_serving_env

        apply_serving_env()  # before anything imports torch
        import uvicorn

        from server.app import create_app
    except ImportError as err:
        raise AnnMlpError(
            f"serving needs the server extra ({err.name} is missing): pip install 'ann-mlp[server]'"
        ) from err

    given = {
        "stores": stores or None,
        "host": host,
        "port": port,
        "shadow_rate": shadow_rate,
        "replicas": replicas,
        "ray_address": ray_address,
        "min_replicas": min_replicas,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target_ongoing_requests,
    }
    try:
        settings = ServerSettings(**{name: value for name, value in given.items() if value is not None})
        if settings.replicas is not None and "torch_threads" not in settings.model_fields_set:
            # Replicas share this machine's cores, unless a cluster spreads them.
            share = max(1, (os.cpu_count() or 1) // settings.replicas)
            settings = settings.model_copy(update={"torch_threads": share})
    except ValidationError as err:
        raise AnnMlpError(settings_problems(err, set(given))) from err
    if settings.ray_address is not None and settings.replicas is None:
        raise AnnMlpError("--ray-address needs --replicas")
    from ann_mlp.store import Store

    sock = bound_socket(settings.host, settings.port)
    if settings.replicas is not None:
        sock.close()  # Ray Serve's proxy listens there; the check above gave a taken port its one line
    for path in settings.stores:  # fail fast, with one line, before the server starts
        if not (path / "manifest.json").exists() and path.parent == DEFAULT_STORE_ROOT and path.name in PRESET_BUILDS:
            from ann_mlp.build import build_store

            typer.echo(f"building the store {path} (first run)", err=True)
            build_store(path.name, path, PRESET_BUILDS[path.name], progress=progress_bars())
        Store.open(path)
    if settings.replicas is not None:
        from server.ray_serve import serve_replicas

        serve_replicas(settings)
        return
    app_ = create_app(settings)
    engine = app_.state.engine

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            engine.begin_drain()  # readiness goes 503 and new requests are refused at once
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app_,
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=int(settings.drain_timeout_s),
    )
    if not DrainingServer(config).run(sockets=[sock]):
        raise AnnMlpError("the server did not start (see the log above)")


def main() -> None:
    run_cli()
