"""Models, health and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import engine as get_engine
from server.deps import require_api_key
from server.engine import Engine, ServedModel
from server.schemas import Health, ModelCard, ModelList, error_responses

router = APIRouter()


@router.get("/health/live", response_model=Health, response_model_exclude_none=True)
async def live() -> dict:
    return {"status": "alive"}


@router.get(
    "/health/ready",
    response_model=Health,
    response_model_exclude_none=True,
    responses={503: {"model": Health, "description": "Loading or draining"}},
)
async def ready(http: Request, engine: Engine = Depends(get_engine)) -> JSONResponse:
    if engine.ready and not engine.draining:
        replicas = await http.app.state.replica_count()
        return JSONResponse({"status": "ready", "models": list(engine.models), "replicas": replicas})
    status = "draining" if engine.draining else "loading"
    return JSONResponse({"status": status}, status_code=503)


def model_card(served: ServedModel) -> dict:
    """OpenAI's model object, with the manifest summary and live recall under `ann_mlp`."""
    manifest = served.approx.manifest
    layers = manifest.layers
    recalls = [entry.build_recall for entry in layers if entry.build_recall is not None]
    return {
        "id": served.name,
        "object": "model",
        "owned_by": "ann-mlp",
        "ann_mlp": {
            "family": manifest.family,
            "kind": manifest.kind,
            "backend": manifest.backend,
            "k": manifest.k,
            "layer_k": [entry.k or manifest.k for entry in layers],
            "target_recall": manifest.target_recall,
            "layers": len(layers),
            "effort_param": layers[0].effort_param,
            "effort_range": layers[0].effort_range,
            "tuned_search_params": [entry.search_params for entry in layers],
            "build_recall_mean": sum(recalls) / len(recalls) if recalls else None,
            "build_recall": [entry.build_recall for entry in layers],
            "live": served.live_summary(),
        },
    }


@router.get(
    "/v1/models", dependencies=[Depends(require_api_key)], response_model=ModelList, responses=error_responses(401)
)
async def models(http: Request, engine: Engine = Depends(get_engine)) -> dict:
    cards = [model_card(served) for served in engine.models.values()]
    return {"object": "list", "data": cards, "replicas": await http.app.state.replica_count()}


@router.get(
    "/v1/models/{model}",
    dependencies=[Depends(require_api_key)],
    response_model=ModelCard,
    responses=error_responses(401, 404, 422),
)
async def model(model: str, engine: Engine = Depends(get_engine)) -> dict:
    return model_card(engine.model(model))


@router.get(
    "/metrics",
    dependencies=[Depends(require_api_key)],
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition",
        },
        **error_responses(401),
    },
)
async def metrics(engine: Engine = Depends(get_engine)) -> Response:
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
