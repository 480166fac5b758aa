"""``/health``, ``/ready`` and ``/metrics``: what load balancers, orchestrators and Prometheus ask a server."""

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api.auth import require_health_key, require_metrics_key
from server.api.errors import error_response

router = APIRouter()


@router.get("/health", dependencies=[Depends(require_health_key)])
async def health() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get(
    "/ready",
    dependencies=[Depends(require_health_key)],
    responses={503: {"description": "model not loaded, engine not running, or draining"}},
)
async def ready(request: Request) -> JSONResponse:
    """The model is loaded and the engine loop is running; with the compute dtype, device and LoRA op it runs in
    (``--dtype auto`` resolves by the hardware, so this is where a client sees what it got)."""
    service = request.app.state.service
    if service.ready:
        model = service.lora_model
        runs = {"dtype": str(model.dtype).removeprefix("torch."), "device": model.device.type, "lora_op": model.op_name}
        return JSONResponse({"status": "ready", **runs})
    return error_response(503, "unavailable", "the engine is not running")


@router.get("/metrics", response_class=Response, dependencies=[Depends(require_metrics_key)])
async def metrics(request: Request) -> Response:
    """Prometheus metrics, text exposition format."""
    body = generate_latest(request.app.state.service.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
