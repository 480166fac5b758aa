"""``/v1/adapters``: upload (multipart: two PEFT files or one archive), list, show and delete adapters."""

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from server.adapters.errors import AdapterError
from server.adapters.registry import (
    AdapterExists,
    AdapterNotFound,
    AdapterRecord,
    BadArchive,
    InvalidAdapterName,
    RegistryError,
    StorageFull,
    StoreUnavailable,
    UploadTooLarge,
)
from server.api.auth import require_admin, require_inference
from server.api.errors import ApiError
from server.api.schemas import AdapterInfo, AdapterList, error_responses
from server.service import Service

router = APIRouter()
_ERRORS = error_responses(400, 401, 403, 404, 409, 413, 422, 503, 507)


def _info(service: Service, record: AdapterRecord) -> AdapterInfo:
    return AdapterInfo.model_validate({**record.to_json(), "state": service.adapter_state(record.name)})


def as_api_error(exc: Exception) -> ApiError:
    match exc:
        case InvalidAdapterName() | BadArchive():
            return ApiError(400, "invalid_request", str(exc))
        case AdapterExists():
            return ApiError(409, "conflict", str(exc))
        case AdapterNotFound():
            return ApiError(404, "not_found", str(exc).strip("'\""))
        case UploadTooLarge():
            return ApiError(413, "too_large", str(exc))
        case StorageFull():
            return ApiError(507, "insufficient_storage", str(exc))
        case StoreUnavailable():
            return ApiError(503, "unavailable", str(exc))
        case AdapterError():
            return ApiError(422, "invalid_adapter", str(exc))
        case _:
            return ApiError(400, "invalid_request", str(exc))


@router.post(
    "/v1/adapters",
    status_code=201,
    response_model=AdapterInfo,
    responses=_ERRORS,
    dependencies=[Depends(require_admin)],
)
async def upload_adapter(
    request: Request,
    name: Annotated[str, Form(description="adapter name: letters, digits, '.', '_' and '-', at most 64")],
    adapter_config: Annotated[UploadFile | None, File(description="the PEFT adapter_config.json")] = None,
    adapter_model: Annotated[UploadFile | None, File(description="the PEFT adapter_model.safetensors")] = None,
    archive: Annotated[UploadFile | None, File(description="a .zip or .tar.gz of a PEFT save folder")] = None,
) -> AdapterInfo:
    """Register an adapter; it is validated against the base model before anything is stored."""
    service: Service = request.app.state.service
    files = adapter_config is not None and adapter_model is not None
    if files == (archive is not None) or (not files and (adapter_config or adapter_model)):
        raise ApiError(400, "invalid_request", "send either adapter_config and adapter_model, or one archive")
    try:
        if archive is not None:
            record = await run_in_threadpool(service.registry.add_archive, name, archive.file)
        else:
            assert adapter_config is not None and adapter_model is not None
            record = await run_in_threadpool(service.registry.add_files, name, adapter_config.file, adapter_model.file)
    except (RegistryError, AdapterError) as exc:
        raise as_api_error(exc) from None
    return _info(service, record)


@router.get("/v1/adapters", response_model=AdapterList, dependencies=[Depends(require_inference)])
async def list_adapters(request: Request) -> AdapterList:
    service: Service = request.app.state.service
    return AdapterList(adapters=[_info(service, r) for r in service.registry.list()])


@router.get(
    "/v1/adapters/{name}", response_model=AdapterInfo, responses=_ERRORS, dependencies=[Depends(require_inference)]
)
async def get_adapter(name: str, request: Request) -> AdapterInfo:
    service: Service = request.app.state.service
    try:
        return _info(service, service.registry.get(name))
    except RegistryError as exc:
        raise as_api_error(exc) from None


@router.delete("/v1/adapters/{name}", status_code=204, responses=_ERRORS, dependencies=[Depends(require_admin)])
async def delete_adapter(name: str, request: Request) -> Response:
    """Remove an adapter. Requests already running with it finish; new ones get 404. A disk too full to write the
    new index answers 507 with nothing changed (the adapter stays registered and intact)."""
    service: Service = request.app.state.service
    try:
        await run_in_threadpool(service.delete_adapter, name)
    except RegistryError as exc:
        raise as_api_error(exc) from None
    return Response(status_code=204)
