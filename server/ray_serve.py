"""`ann-mlp serve --replicas N`: the same FastAPI app as a Ray Serve deployment of N replicas.

Each replica builds the app (`create_app`) on its own worker, so each has its own engine, loaded
through the app's lifespan as in a plain process; Ray Serve's HTTP proxy on HOST:PORT routes every
request to a replica with room. A replica is sent at most `queue_size` requests at a time, what
its engine would queue, so Ray, not a replica, holds what no replica has room for: up to
`queue_size` more requests wait in Ray's queue, and beyond that Ray answers 429 with
Retry-After (its body is Ray's plain text, not the JSON error shape), so 429 means every
replica is full.

Without an address a local Ray instance starts on 127.0.0.1 and stops with the server; with one
(`--ray-address auto` on a node of a cluster started with `ray start`) the replicas spread over
the cluster's nodes, each of which needs ann-mlp installed and the stores at the same paths.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import threading

from ann_mlp.errors import AnnMlpError
from server.settings import ServerSettings, apply_serving_env

log = logging.getLogger(__name__)
APP_NAME = "ann-mlp"
DEPLOYMENT = "AnnMlpReplica"


def build_replica_app(settings_json: str):
    """On a replica: the app of one engine, reporting Ray Serve's live replica count."""
    apply_serving_env()  # a Ray worker has not imported torch yet
    from server.app import create_app

    return create_app(ServerSettings.model_validate_json(settings_json), replica_count=live_replicas)


async def live_replicas() -> int:
    """Replicas of the deployment that Ray Serve's controller reports running, asked each time."""
    return await asyncio.to_thread(running_replicas)


def running_replicas() -> int:
    from ray import serve
    from ray.serve.schema import ReplicaState

    application = serve.status().applications.get(APP_NAME)
    if application is None or DEPLOYMENT not in application.deployments:
        return 0
    return application.deployments[DEPLOYMENT].replica_states.get(ReplicaState.RUNNING, 0)


def settings_json(settings: ServerSettings) -> str:
    """The settings as replicas receive them: store paths absolute, the API key itself (not masked)."""
    values = settings.model_dump(mode="json")
    values["stores"] = [str(path.resolve()) for path in settings.stores]
    values["api_key"] = None if settings.api_key is None else settings.api_key.get_secret_value()
    return json.dumps(values)


def deployment_options(settings: ServerSettings) -> dict:
    """Ray Serve's options for the replicas: count or autoscaling, admission limits, CPUs, drain."""
    from ray.serve.config import AutoscalingConfig, BackpressureConfig

    options = dict(
        name=DEPLOYMENT,
        max_ongoing_requests=settings.queue_size,
        max_queued_requests=settings.queue_size,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=settings.retry_after_s),
        ray_actor_options={"num_cpus": settings.torch_threads},
        graceful_shutdown_timeout_s=settings.drain_timeout_s,
        # A log line per request costs a busy replica more than its routing: the app's metrics count them.
        logging_config={"enable_access_log": False},
        health_check_timeout_s=max(30.0, settings.request_timeout_s),
    )
    if settings.autoscaled:
        low, high = settings.replica_bounds
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=low,
            initial_replicas=settings.replicas,
            max_replicas=high,
            target_ongoing_requests=settings.target_ongoing_requests,
        )
    else:
        options["num_replicas"] = settings.replicas
    return options


def serve_replicas(settings: ServerSettings) -> None:
    """Start (or join) Ray, deploy the replicas behind Ray Serve's proxy on HOST:PORT, and serve
    until SIGTERM or SIGINT; then take the deployment down, replicas draining as a plain server
    does (and a local Ray with it)."""
    try:
        import ray
        from ray import serve
    except ImportError as err:
        raise AnnMlpError(f"--replicas needs Ray Serve ({err.name} is missing): pip install 'ann-mlp[ray]'") from err

    local = settings.ray_address is None
    if local:
        ray.init(
            num_cpus=os.cpu_count(),
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            logging_level=logging.WARNING,
        )
    else:
        ray.init(address=settings.ray_address, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        values = settings_json(settings)

        def build_app():  # a plain function: Ray Serve calls a builder on each replica (a partial would pass as an app)
            return build_replica_app(values)

        replica = serve.deployment(**deployment_options(settings))(serve.ingress(build_app)())
        serve.run(replica.bind(), name=APP_NAME, route_prefix="/", blocking=False)
        log.warning("serving on http://%s:%d with %d replica(s)", settings.host, settings.port, running_replicas())
        stop.wait()
    finally:
        if local:
            serve.shutdown()
            ray.shutdown()
        else:  # a shared cluster: take down this deployment only, not the other applications on it
            serve.delete(APP_NAME)
