"""The OpenAPI 3.1 document of the server (GET /openapi.json), generated from the schemas."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from pydantic.json_schema import models_json_schema

import edgeai
from edgeai.server import schemas as s

_REF = "#/components/schemas/{model}"


def _json(name: str) -> dict:
    return {"application/json": {"schema": {"$ref": _REF.format(model=name)}}}


def _errors(*codes: int) -> dict:
    why = {
        400: "invalid request",
        404: "unknown model",
        413: "body too large",
        503: "queue full (see Retry-After)",
        500: "generation failed",
        501: "the sentence encoder is not installed",
    }
    return {str(c): {"description": why[c], "content": _json("ErrorResponse")} for c in codes}


def _generation(summary: str, req: str, resp: str, chunk: str) -> dict:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": _json(req)},
            "responses": {
                "200": {
                    "description": f"one {resp} body, or (stream=true) "
                    f"server-sent events of {chunk} ending "
                    "with `data: [DONE]`",
                    "content": {**_json(resp), "text/event-stream": {"schema": {"type": "string"}}},
                },
                **_errors(400, 404, 413, 500, 503),
            },
        }
    }


def _get(summary: str, resp: str | None, media: str = "application/json") -> dict:
    content = _json(resp) if resp else {media: {"schema": {"type": "string"}}}
    return {
        "get": {"summary": summary, "responses": {"200": {"description": "OK", "content": content}}}
    }


@lru_cache(maxsize=1)
def document() -> dict[str, Any]:
    models = [
        s.ChatCompletionRequest,
        s.CompletionRequest,
        s.EmbeddingRequest,
        s.ChatCompletion,
        s.ChatCompletionChunk,
        s.Completion,
        s.EmbeddingList,
        s.ModelList,
        s.ErrorResponse,
        s.Health,
    ]
    _, defs = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    paths = {
        "/v1/chat/completions": _generation(
            "Chat completion (OpenAI-compatible)",
            "ChatCompletionRequest",
            "ChatCompletion",
            "ChatCompletionChunk",
        ),
        "/v1/completions": _generation(
            "Text completion (OpenAI-compatible)", "CompletionRequest", "Completion", "Completion"
        ),
        "/v1/embeddings": {
            "post": {
                "summary": "Sentence embeddings from the router's encoder",
                "requestBody": {"required": True, "content": _json("EmbeddingRequest")},
                "responses": {
                    "200": {"description": "OK", "content": _json("EmbeddingList")},
                    **_errors(400, 404, 413, 501, 503),
                },
            }
        },
        "/v1/models": _get("Models this server answers to", "ModelList"),
        "/health": _get("Liveness, loaded models and load", "Health"),
        "/api/ps": _get("Loaded models (edgeai ps)", None, "application/json"),
        "/metrics": _get("Prometheus metrics", None, "text/plain"),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "edgeai serve",
            "version": edgeai.__version__,
            "description": "OpenAI-compatible local inference over a Unix socket. "
            "Every answer carries "
            "an `edgeai` object: which tier answered, its confidence and why.",
        },
        "paths": paths,
        "components": {"schemas": defs["$defs"]},
    }
