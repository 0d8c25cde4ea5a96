"""Request and response bodies. OpenAI-compatible where the route is, plus our `ann_mlp` options."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

Mode = Literal["auto", "approx", "exact", "compare"]
# Strict: true and false are not token ids.
TextOrTokens = str | list[str] | list[StrictInt] | list[list[StrictInt]]


class AnnMlpOptions(BaseModel):
    """Per-request knobs, within the bounds the store's manifest records."""

    model_config = ConfigDict(extra="forbid")
    mode: Mode = "auto"
    k: int | None = Field(None, ge=1, description="keys retrieved per token [the store's k]")
    effort: int | None = Field(
        None,
        ge=0,
        description="search effort, the store's effort_param (nprobe, efSearch, rerank, margin, ...) [tuned]",
    )
    candidate_factor: float | None = Field(
        None,
        ge=1.0,
        allow_inf_nan=False,
        description="retrieve this many times k by key score, keep "
        "the k largest |contributions| (gated: "
        "|act(gate)*up|) [as built: 1 but for gated layers]",
    )


class EmbeddingRequest(BaseModel):
    input: TextOrTokens
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    ann_mlp: AnnMlpOptions = AnnMlpOptions()


class CompletionRequest(BaseModel):
    prompt: TextOrTokens
    model: str | None = None
    max_tokens: int = Field(16, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="absent or 0: greedy")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    logprobs: int | None = Field(None, ge=0, le=5)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: Literal[False] = False
    echo: Literal[False] = False
    user: str | None = None
    ann_mlp: AnnMlpOptions = AnnMlpOptions()


class InferRequest(AnnMlpOptions):
    """The native route: the knobs at the top level, beside the inputs."""

    model: str | None = None
    texts: list[str] | None = None
    token_ids: list[list[StrictInt]] | None = None
    top_logprobs: int = Field(5, ge=0, le=20, description="causal LMs: alternatives at the last position")


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for routes that can answer these errors, every one in ErrorResponse's shape."""
    meaning = {
        400: "Invalid request (input beyond a limit, a knob out of range, the wrong route for the model)",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body too large",
        422: "Body does not match the schema",
        429: "Queue full (see Retry-After)",
        499: "The client disconnected; its work was stopped",
        503: "Not ready, or shutting down (see Retry-After)",
        504: "No answer within the request deadline",
    }
    return {status: {"model": ErrorResponse, "description": meaning[status]} for status in statuses}


class RunInfo(BaseModel):
    """What every answer tells about how it was computed."""

    mode: Mode
    k: int | list[int]  # one k, or one per layer when the store chose k per layer
    search_params: dict[str, Any] | list[dict[str, Any]]  # one for every layer, or one per layer
    candidate_factor: float | None  # neurons retrieved per kept neuron, as asked (None: as built)
    candidates: int | list[int]  # neurons retrieved per token, one number or one per layer
    scanned_fraction: float | None  # keys scored / keys of the dense MLP, planner's dense layers included
    dense_fraction: float | None  # share of (layer, token) pairs the planner ran dense (mode auto)
    timing: dict[str, float]  # total_ms, index_search_ms, rest_ms (of the shared pass, when merged)
    batch_size: int  # inputs of the forward pass this request shared (completions: the most rows in a step)
    report: dict[str, Any] | None = None  # compare mode: per-layer and end-to-end metrics


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format "base64"


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    model: str
    data: list[EmbeddingData]
    usage: Usage
    ann_mlp: RunInfo


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"]


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    ann_mlp: list[RunInfo]  # one per prompt


class InferResponse(RunInfo):
    model: str
    kind: Literal["encoder", "causal_lm", "seq2seq"]
    outputs: list[dict[str, Any]]  # per input: embedding, next-token prediction or decoder argmax ids
    tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    ann_mlp: dict[str, Any]  # the manifest's summary and live recall


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    replicas: int  # live replicas serving these models (1: a single process)


class Health(BaseModel):
    status: Literal["alive", "ready", "draining", "loading"]
    models: list[str] | None = None
    replicas: int | None = None  # live replicas (ready only)
