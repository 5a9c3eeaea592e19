"""Infinity's side of benchmarks/embeddings.py: runs in Infinity's own virtual environment.

Infinity (`infinity-emb` 0.0.78) needs sentence-transformers < 4 and numpy < 2, so it cannot share
the test environment; create it once with

    python -m venv .venv-infinity
    .venv-infinity/bin/pip install torch==2.13.0 "infinity-emb[torch,server]==0.0.78" \
        "sentence-transformers<4" "numpy<2"

This process loads the model into Infinity's `AsyncEmbeddingEngine` (torch engine, on the CPU),
prints one line "ready", then reads one JSON request per line from stdin and answers each with
one JSON line: {"total": seconds, "latencies": [seconds from the common start, per call]}.

Each call does what Infinity's own server (`infinity_emb.infinity_server`, its /embeddings route)
does around `engine.embed` but the HTTP exchange, as the worker's side pays for the SDK's
validation and the `json.dumps` of its result: the request body validated by its pydantic model,
the response shaped by `to_embeddings_response`, validated and serialized as FastAPI does with a
route's `response_model`, and rendered by `ORJSONResponse` (orjson: about 20 µs for 384 floats,
where the SDK's json.dumps takes 120).

    {"mode": "concurrent", "texts": [...], "in_flight": n}   one embed call per text, at most n at
                                                            a time (null or absent: all at once)
    {"mode": "one_call", "texts": [...]}                     one embed call with every text
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from fastapi.responses import ORJSONResponse
from infinity_emb import AsyncEmbeddingEngine, EngineArgs
from infinity_emb.fastapi_schemas.pymodels import MultiModalOpenAIEmbedding, OpenAIEmbeddingResult
from pydantic import TypeAdapter

# What FastAPI makes of the route's response_model=OpenAIEmbeddingResult.
RESPONSE = TypeAdapter(OpenAIEmbeddingResult)


async def embed_as_served(engine: AsyncEmbeddingEngine, model: str, texts: list[str]) -> bytes:
    """One /embeddings request as Infinity's server handles it, from the parsed body to the bytes it sends."""
    request = MultiModalOpenAIEmbedding.model_validate({"model": model, "input": texts}).root
    embeddings, usage = await engine.embed(sentences=request.input, matryoshka_dim=request.dimensions)
    content = OpenAIEmbeddingResult.to_embeddings_response(
        embeddings=embeddings, engine_args=engine.engine_args, encoding_format=request.encoding_format, usage=usage
    )
    return ORJSONResponse(RESPONSE.dump_python(RESPONSE.validate_python(content), mode="json")).body


async def serve(model: str, batch_size: int) -> None:
    args = EngineArgs(
        model_name_or_path=model,
        engine="torch",
        device="cpu",
        batch_size=batch_size,
        bettertransformer=False,  # its CPU path is what Infinity's own docs advise; fp32 on CPU
        model_warmup=True,
    )
    engine = AsyncEmbeddingEngine.from_args(args)
    async with engine:
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            request = json.loads(line)
            texts = request["texts"]
            started = time.perf_counter()
            # The next call starts the moment one in flight finishes, as the worker's jobs do.
            slots = asyncio.Semaphore(request.get("in_flight") or len(texts))

            async def one(batch: list[str], started: float = started, slots: asyncio.Semaphore = slots) -> float:
                async with slots:
                    await embed_as_served(engine, model, batch)
                return time.perf_counter() - started

            if request["mode"] == "concurrent":
                latencies = await asyncio.gather(*(one([text]) for text in texts))
            else:
                latencies = [await one(texts)]
            print(json.dumps({"total": time.perf_counter() - started, "latencies": list(latencies)}), flush=True)


if __name__ == "__main__":
    asyncio.run(serve(sys.argv[1], int(sys.argv[2])))
