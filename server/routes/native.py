"""POST /v1/infer: the native route, with modes, knobs and the fidelity report."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from server import ops
from server.deps import engine as get_engine
from server.deps import require_api_key
from server.engine import Engine, Knobs, Run
from server.errors import InvalidRequest
from server.schemas import AnnMlpOptions, InferRequest, InferResponse, error_responses

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 404, 413, 422, 429, 499, 503, 504),
)


@router.post("/infer", response_model=InferResponse)
async def infer(request: InferRequest, http: Request, engine: Engine = Depends(get_engine)) -> dict:
    http.state.mode = request.mode
    served = engine.model(request.model)
    if (request.texts is None) == (request.token_ids is None):
        raise InvalidRequest("give exactly one of texts or token_ids", param="texts")
    param = "texts" if request.texts is not None else "token_ids"
    inputs = request.texts or request.token_ids
    knobs = Knobs(**request.model_dump(include=set(AnnMlpOptions.model_fields)))

    compare = request.mode == "compare"
    checked = ops.checked_token_ids(served, inputs, engine.settings, param, compare=compare)

    def prepare() -> list[list[int]]:
        return checked or ops.tokenize(served, inputs, engine.settings, param, compare=compare)

    def finish(run: Run):
        if served.kind == "encoder":
            outputs = [{"embedding": v.tolist()} for v in ops.pooled_embeddings(run)]
        elif served.kind == "causal_lm":
            logprobs = ops.last_position_logprobs(run)
            outputs = []
            for row in logprobs:
                best = int(row.argmax())
                outputs.append(
                    {
                        "next_token_id": best,
                        "next_token": served.tokenizer.decode([best]),
                        "next_token_logprob": float(row[best]),
                        "top_logprobs": ops.top_alternatives(served, row, request.top_logprobs),
                    }
                )
        else:  # seq2seq: teacher-forced reconstruction loss of each input
            outputs = [
                {"decoder_argmax_ids": row[mask].tolist()}
                for row, mask in zip(run.output.logits.argmax(-1), run.batch.mask)
            ]
        return run.batch.num_tokens, outputs, ops.run_info(served, knobs, run)

    tokens, outputs, info = await engine.batches.forward(
        served, knobs, len(inputs), prepare, finish, http.is_disconnected
    )
    return {
        "model": served.name,
        "kind": served.kind,
        "outputs": outputs,
        "tokens": tokens,
        **info.model_dump(),
    }
