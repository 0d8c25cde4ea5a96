"""Models, health and metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.deps import engine as get_engine
from server.deps import require_api_key
from server.engine import Engine

router = APIRouter()


@router.get("/health/live")
async def live() -> dict:
    return {"status": "alive"}


@router.get("/health/ready")
async def ready(engine: Engine = Depends(get_engine)) -> JSONResponse:
    if engine.ready and not engine.draining:
        return JSONResponse({"status": "ready", "models": list(engine.models)})
    status = "draining" if engine.draining else "loading"
    return JSONResponse({"status": status}, status_code=503)


@router.get("/v1/models", dependencies=[Depends(require_api_key)])
async def models(engine: Engine = Depends(get_engine)) -> dict:
    data = []
    for served in engine.models.values():
        manifest = served.approx.manifest
        layers = manifest.layers
        recalls = [l.build_recall for l in layers if l.build_recall is not None]
        data.append({
            "id": served.name, "object": "model", "owned_by": "ann-mlp",
            "ann_mlp": {
                "family": manifest.family, "kind": manifest.kind, "backend": manifest.backend,
                "k": manifest.k, "target_recall": manifest.target_recall, "layers": len(layers),
                "effort_param": layers[0].effort_param, "effort_range": layers[0].effort_range,
                "tuned_search_params": [l.search_params for l in layers],
                "build_recall_mean": sum(recalls) / len(recalls) if recalls else None,
                "build_recall": [l.build_recall for l in layers],
                "live": served.live_summary(),
            },
        })
    return {"object": "list", "data": data}


@router.get("/metrics", dependencies=[Depends(require_api_key)])
async def metrics(engine: Engine = Depends(get_engine)) -> Response:
    return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)
