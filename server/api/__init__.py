"""The HTTP API: FastAPI app factory, routes and request/response schemas (all user-input validation)."""
