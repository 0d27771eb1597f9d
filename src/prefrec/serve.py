"""An HTTP service around a :class:`~prefrec.recommender.Recommender` (FastAPI + uvicorn).

Endpoints:

- ``POST /rank`` with ``{"history": [...], "candidates": [...], "task": "selection" |
  "pairwise", "domain": optional}`` returns the candidates best first, each with its
  summed and length-normalised log-prob and its probability over the candidates. Bad
  input (empty, duplicate or too many candidates, too-long titles, a missing field, a
  wrong type, an unknown task) is answered 422 with a message, never 500.
  Bodies are decoded by prefrec's own reader (:mod:`prefrec.data.reading`) before
  FastAPI parses them: Python's ``json`` accepts ``NaN`` and lone surrogates (which then
  fail as 500s) and raises on deep nesting, huge integers and non-UTF-8 bytes (400s);
  here each is a 422 naming what is wrong, as is a body larger than the limits allow.
- ``GET /health``: model, adapters, template, device and the input limits.
- ``GET /docs``: the OpenAPI page (the limits appear in the request schema).

Concurrency: the model runs in one worker thread, one batch at a time. A
:class:`MicroBatcher` collects the requests that arrive while the model is busy, or
within ``max_wait_ms`` of the first one, and scores them in a single ``rank_many`` call
(each request one packed row), so a burst of small requests costs a few forward passes
instead of one each. The event loop never blocks on the model.

Run it with ``prefrec serve`` or ``python -m prefrec.serve --model DIR --port 8000``.

(No ``from __future__ import annotations`` here: FastAPI reads the request model's type
from the endpoint's annotations at runtime, and the model is built inside
:func:`create_app`, where the limits are known.)
"""

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Annotated, Any, Literal

from prefrec.data.prompts import DOMAINS
from prefrec.data.reading import decode_json
from prefrec.errors import DataError, PrefrecError
from prefrec.recommender import (
    TASKS,
    Limits,
    RankedItem,
    RankRequest,
    Recommender,
    add_model_options,
    recommender_from_args,
    validate_request,
)

log = logging.getLogger(__name__)

RankMany = Callable[[Sequence[RankRequest]], list[list[RankedItem]]]


class MicroBatcher:
    """Gathers concurrent requests into batches for one ``rank_many`` call each.

    A batch starts with the first waiting request and takes every request that is
    already queued or arrives within ``max_wait_ms``, up to ``max_batch``. Batches run one
    at a time in a worker thread. If a batch fails, its requests are retried one by one so
    that one bad request cannot fail its neighbours.
    """

    def __init__(self, rank_many: RankMany, max_wait_ms: float = 5.0, max_batch: int = 64):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._rank_many = rank_many
        self._max_wait = max_wait_ms / 1000.0
        self._max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        # Counters for /health: how well requests are being batched.
        self.requests = self.batches = self.largest_batch = 0

    async def submit(self, request: RankRequest) -> list[RankedItem]:
        """Queue one request; return its ranking once its batch has been scored."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((request, future))
        return await future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._max_wait
            while len(batch) < self._max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            await self._score(batch)

    async def _score(self, batch: list[tuple[RankRequest, asyncio.Future]]) -> None:
        live = [(req, fut) for req, fut in batch if not fut.done()]  # drop cancelled clients
        if not live:
            return
        self.requests += len(live)
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(live))
        try:
            results = await asyncio.to_thread(self._rank_many, [req for req, _ in live])
        except Exception as err:
            if len(live) == 1:
                _settle(live[0][1], error=err)
                return
            log.warning("a batch of %d failed (%s); scoring its requests one by one",
                        len(live), err)
            for req, fut in live:
                try:
                    [result] = await asyncio.to_thread(self._rank_many, [req])
                except Exception as one_err:
                    _settle(fut, error=one_err)
                else:
                    _settle(fut, result)
            return
        for (_, fut), result in zip(live, results, strict=True):
            _settle(fut, result)


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None):
    """Resolve a client's future unless the client has gone (cancelled)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def max_body_bytes(limits: Limits) -> int:
    """The largest body a request within ``limits`` can need: every title at its longest,
    each character escaped (up to 12 bytes: a surrogate pair), plus room for the rest."""
    titles = limits.max_history + limits.max_candidates
    return titles * (12 * limits.max_title_chars + 4) + 4096


def body_error(body: bytes, max_bytes: int) -> str | None:
    """Why a request body is refused before it is parsed, or None (see the module
    docstring)."""
    if len(body) > max_bytes:
        return f"body: {len(body)} bytes, more than the limit {max_bytes}"
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"body: not valid UTF-8: byte 0x{body[err.start]:02x} at byte offset {err.start}"
    try:
        decode_json(text, "body", unit="body")
    except DataError as err:
        return str(err)
    return None


def _checked_body_route(max_bytes: int) -> type:
    """An ``APIRoute`` that answers 422 to a POST body :func:`body_error` refuses; other
    bodies go on to FastAPI (Starlette keeps the bytes, so they are read once)."""
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    class CheckedBodyRoute(APIRoute):
        def get_route_handler(self):
            handler = super().get_route_handler()

            async def checked(request):
                if request.method == "POST":
                    problem = body_error(await request.body(), max_bytes)
                    if problem is not None:
                        return JSONResponse(status_code=422, content={"detail": problem})
                return await handler(request)

            return checked

    return CheckedBodyRoute


def create_app(
    recommender: Recommender,
    limits: Limits | None = None,
    *,
    max_wait_ms: float = 5.0,
    max_batch: int = 64,
):
    """The FastAPI application serving ``recommender`` (see the module docstring).

    ``limits`` (default: the recommender's) bound list lengths and title lengths in the
    request schema; they should not exceed the recommender's own limits.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

    limits = limits or recommender.limits
    batcher = MicroBatcher(recommender.rank_many, max_wait_ms, max_batch)
    Title = Annotated[str, StringConstraints(min_length=1, max_length=limits.max_title_chars)]
    Domain = Literal[tuple(DOMAINS)]  # type: ignore[valid-type]

    class RankBody(BaseModel):
        """One user's history and the candidates to rank."""

        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={"examples": [{
                "history": ["Toy Story (1995)", "Heat (1995)", "Casino (1995)"],
                "candidates": ["GoldenEye (1995)", "Sabrina (1995)", "Jumanji (1995)"],
                "task": "selection",
            }]},
        )

        history: list[Title] = Field(
            min_length=1, max_length=limits.max_history,
            description="titles the user interacted with, oldest first",
        )
        candidates: list[Title] = Field(
            min_length=1, max_length=limits.max_candidates,
            description="distinct titles to rank (exactly 2 for the pairwise task)",
        )
        task: Literal[TASKS] = Field(  # type: ignore[valid-type]
            "selection", description="selection: one prompt listing every candidate; "
            "pairwise: the DMPO prompt for two candidates, both orderings scored",
        )
        domain: Domain | None = Field(
            None, description="pairwise wording; default: the server's "
            f"({recommender.domain})",
        )

        @model_validator(mode="after")
        def _semantics(self):
            # Duplicates, blank titles, control characters, the pairwise count: the same
            # checks and messages as the Python API.
            try:
                validate_request(self.history, self.candidates, self.task, self.domain, limits)
            except DataError as err:
                raise ValueError(str(err)) from None
            return self

    class RankedOut(BaseModel):
        title: str
        rank: int
        logp: float = Field(description="summed log-prob of the completion")
        logp_normalized: float = Field(description="log-prob per completion token")
        probability: float = Field(description="softmax of logp over the candidates")
        n_tokens: int

    class RankResponse(BaseModel):
        task: str
        ranking: list[RankedOut]

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await batcher.close()

    app = FastAPI(
        title="prefrec recommender",
        description="Rank candidate items for a user's history with a preference-tuned LM.",
        lifespan=lifespan,
    )
    app.router.route_class = _checked_body_route(max_body_bytes(limits))
    app.state.batcher = batcher
    app.state.recommender = recommender

    @app.exception_handler(PrefrecError)
    async def _user_error(_request, err: PrefrecError):
        # Input the schema let through but the recommender refused: still the client's fault.
        return JSONResponse(status_code=422, content={"detail": str(err)})

    @app.post("/rank", response_model=RankResponse)
    async def rank(body: RankBody) -> dict[str, Any]:
        """Rank the candidates for the history, best first."""
        request = RankRequest(tuple(body.history), tuple(body.candidates), body.task,
                              body.domain)
        ranking = await batcher.submit(request)
        return {"task": body.task, "ranking": [item.to_dict() for item in ranking]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """What is loaded, and the limits the request schema enforces."""
        return {
            "status": "ok",
            **recommender.info(),
            "limits": asdict(limits),
            "batching": {"requests": batcher.requests, "batches": batcher.batches,
                         "largest_batch": batcher.largest_batch},
        }

    return app


# --------------------------------------------------------------------------- CLI


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Options of ``prefrec serve``."""
    add_model_options(p)
    defaults = Limits()
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--max-history", type=int, default=defaults.max_history,
                   help="most history titles per request (default: %(default)s)")
    p.add_argument("--max-candidates", type=int, default=defaults.max_candidates,
                   help="most candidates per request (default: %(default)s)")
    p.add_argument("--max-title-chars", type=int, default=defaults.max_title_chars,
                   help="longest title in characters (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more requests (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="most requests scored together (default: %(default)s)")
    p.add_argument("--log-level", default="info", help="uvicorn log level (default: %(default)s)")


def serve_command(args: argparse.Namespace) -> None:
    """``prefrec serve``: load the model and serve it until interrupted."""
    import uvicorn

    for name in ("max_history", "max_candidates", "max_title_chars", "max_batch"):
        if getattr(args, name) < 1:
            raise PrefrecError(f"--{name.replace('_', '-')} must be at least 1")
    limits = Limits(args.max_history, args.max_candidates, args.max_title_chars)
    recommender = recommender_from_args(args, limits)
    app = create_app(recommender, limits, max_wait_ms=args.max_wait_ms,
                     max_batch=args.max_batch)
    log.info("serving %s on http://%s:%d (OpenAPI at /docs)", recommender.model_name,
             args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m prefrec.serve``: the same options as ``prefrec serve``."""
    parser = argparse.ArgumentParser(prog="python -m prefrec.serve",
                                     description="Serve a recommender over HTTP.")
    add_serve_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve_command(args)
    except PrefrecError as err:
        print(f"prefrec serve: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
