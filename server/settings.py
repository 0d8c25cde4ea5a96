"""Server settings: one typed place, read once at start (env prefix ANN_MLP_)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ann_mlp.config import DEFAULT_SERVED, DEFAULT_STORE_ROOT

# The environment a serving process needs before torch loads. Torch's OpenMP threads spin while
# they wait for work, by default; in a server they share the cores with the event loop (and, on one
# machine, the clients), which spinning starves between passes. libgomp reads this once, when torch
# is imported, so it cannot be a setting applied later. A value already in the environment wins.
SERVING_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply_serving_env() -> None:
    """SERVING_ENV into this process's environment, before anything imports torch."""
    for name, value in SERVING_ENV.items():
        os.environ.setdefault(name, value)


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ANN_MLP_", frozen=True)

    stores: list[Path] = Field(default_factory=lambda: [DEFAULT_STORE_ROOT / DEFAULT_SERVED])
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: SecretStr | None = None  # bearer token required on every route but health
    shadow_rate: float = Field(0.0, ge=0.0, le=1.0)  # share of requests re-run exactly, off the request path
    max_body_bytes: int = Field(2 * 1024 * 1024, gt=0)
    max_inputs: int = Field(64, gt=0)  # texts or token lists per request
    max_input_tokens: int = Field(512, gt=0)  # tokens per input
    max_new_tokens: int = Field(256, gt=0)  # completions
    # A request's whole work: its input tokens plus the new tokens of each input, counted twice in
    # compare mode (the exact and the approximate model both run).
    max_request_tokens: int = Field(32_768, gt=0)
    queue_size: int = Field(64, gt=0)  # requests waiting for the engine before 429
    # Compatible requests (one model, the same knobs, mode auto or approx) share the work: inputs
    # merged into one forward pass, and rows decoded together, up to this many.
    max_batch_inputs: int = Field(32, gt=0)
    max_batch_tokens: int = Field(8192, gt=0)  # padded tokens (rows x longest input) of one merged pass
    batch_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)  # how long a forward pass waits for company
    request_timeout_s: float = Field(60.0, gt=0)  # deadline per request before 504
    drain_timeout_s: float = Field(30.0, gt=0)  # SIGTERM: how long in-flight requests may finish
    retry_after_s: int = Field(1, ge=0)
    torch_threads: int = Field(2, gt=0)  # per engine (with replicas: per replica)
    # Replicas on Ray Serve (server/ray_serve.py); None: one plain uvicorn process, Ray never imported.
    replicas: int | None = Field(None, gt=0)  # replicas to start with (a fixed count without autoscaling)
    ray_address: str | None = None  # an existing cluster ("auto", "HOST:6379"); None: a local Ray on this machine
    min_replicas: int | None = Field(None, ge=0)  # autoscaling bounds: set either to autoscale
    max_replicas: int | None = Field(None, gt=0)
    target_ongoing_requests: float = Field(8.0, gt=0)  # autoscaling aims at this many requests per replica

    @field_validator("api_key")
    @classmethod
    def _real_key(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("api_key is empty: set a key, or unset ANN_MLP_API_KEY to serve without one")
        return key

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServerSettings:
        if self.autoscaled:
            if self.replicas is None:
                raise ValueError("min_replicas and max_replicas need replicas (the count to start with)")
            low, high = self.replica_bounds
            if not low <= self.replicas <= high:
                raise ValueError(f"replicas {self.replicas} must lie within min_replicas {low} and max_replicas {high}")
        return self

    @property
    def autoscaled(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def replica_bounds(self) -> tuple[int, int]:
        """(min, max) replicas of autoscaling: an unset min is 1, an unset max the larger of min and replicas."""
        low = self.min_replicas if self.min_replicas is not None else 1
        return low, self.max_replicas if self.max_replicas is not None else max(low, self.replicas or 1)

    @field_validator("stores")
    @classmethod
    def _non_empty(cls, stores: list[Path]) -> list[Path]:
        if not stores:
            raise ValueError("at least one index store is needed")
        return stores
