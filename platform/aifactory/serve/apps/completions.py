"""The completions application: an OpenAI-compatible ingress in front of per-SLO-class model deployments.

Deployments (one application)::

    Ingress (FastAPI)  tenancy, rate limits, validation, caches, canary split, per-tenant usage
      |-- Interactive  ModelServer: small batches, short window, tight queue, own autoscaling
      |-- Batch        ModelServer: large batches, long window, deep queue, own autoscaling
      `-- Canary       ModelServer: the canary version (or the stable one while no canary runs)

``POST /v1/completions`` and ``POST /v1/chat/completions`` (messages through the chat template of
:mod:`aifactory.serve.chat`) share one request path; :mod:`aifactory.serve.openai_api` holds what differs.
Each ModelServer replica runs one continuous-batching engine loop (``engine: continuous``, the default;
:mod:`aifactory.serve.engine_loop`): every request of the replica joins the running batch at the next decode
step and leaves it when it ends (``engine: static`` keeps the ``@serve.batch`` window of earlier releases).
``stream: true`` requests forward each step's text as an SSE chunk at once, plain requests wait for the
last step; both share the same batch. The SLO class comes from the ``X-SLO-Class`` header or the route
(``/batch/v1/...``) and orders admission and preemption inside the engine. Rollout (canary percentage, promote, rollback) and weight swaps are
``user_config`` changes applied by declarative updates (``aifactory.serve.deploy``), which reconfigure
replicas in place instead of restarting them.
"""


import asyncio
import itertools
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from aifactory.config import parse_config
from aifactory.exceptions import FactoryError
from aifactory.serve.cache import ExactCache, PrefixCache, SemanticCache, flush_requests
from aifactory.serve.config import INGRESS_NUM_CPUS, CompletionsArgs
from aifactory.serve.engine import Decoder, GenDelta, GenItem, GenResult, LoadedModel, load_version
from aifactory.serve.engine_loop import EngineLoop
from aifactory.serve.http import error_response, install_error_handlers
from aifactory.serve.metrics import EngineMetrics, LatencyWindow, UsageRecorder
from aifactory.serve.openai_api import CHAT, COMPLETIONS, CompletionsAPI, apply_stop
from aifactory.serve.ratelimit import TenantRateLimiter
from aifactory.serve.routing import RolloutState, pick_target
from aifactory.serve.schemas import (
    APIError, CompletionRequest, ModelCard, ModelList, Usage, check_completion_limits, parse_body, read_body,
)
from aifactory.serve.streaming import DONE, TextStream, sse_error
from aifactory.serve.tenants import TenantResolver, resolve_slo_class

logger = logging.getLogger("ray.serve")

INGRESS, INTERACTIVE, BATCH, CANARY = "Ingress", "Interactive", "Batch", "Canary"
TARGETS = {"interactive": INTERACTIVE, "batch": BATCH}
_REPLICA_GONE = ("ActorDiedError", "ActorUnavailableError", "RayActorError", "ActorUnschedulableError")


# Helpers come before the deployments: Serve pickles a deployment class by value when it is
# decorated, so names defined later in this module would be missing in the replica.
async def _awaitable(response):
    return await response


_DRAINING: set = set()


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def _drain_later(stream) -> None:
    """Let the batch's generator end this caller's stream (its StopIteration comes with the next decode step):
    a stream left unconsumed leaves a future whose StopAsyncIteration nobody retrieves, which asyncio logs."""
    task = asyncio.get_running_loop().create_task(_drain(stream))
    _DRAINING.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_DRAINING.discard)


def _row_failed(result: GenResult) -> APIError:
    """This request's row failed in the engine (the other rows of its batch were answered): a 500 for it alone,
    naming only the error's type, as the app's handler of unexpected errors does; the log has the rest."""
    logger.error("one row of a batch failed: %s", result.error)
    return APIError(500, f"internal error while generating this request: {result.error.partition(':')[0]}",
                    code="generation_failed")


def _cache_info(cache, tenant: str | None = None) -> dict | None:
    """Entries and hit counts of one response cache: all tenants', or only ``tenant``'s."""
    if cache is None:
        return None
    st = cache.stats
    lookups = sum(st.lookups.values()) if tenant is None else st.lookups.get(tenant, 0)
    hits = sum(st.hits.values()) if tenant is None else st.hits.get(tenant, 0)
    return {"entries": cache.entries(tenant), "hit_ratio": st.hit_ratio(tenant), "lookups": lookups, "hits": hits}


@serve.deployment
class ModelServer:
    """One model version behind the continuous engine's loop (``engine: continuous``: every request of the
    replica joins one running batch, :mod:`aifactory.serve.engine_loop`) or ``@serve.batch`` (``static``);
    ``user_config`` swaps the version or the static batch window."""

    def __init__(self, *, registry: str, model_name: str, model_version: str, cache: dict, torch_threads: int,
                 engine: str = "continuous", continuous: dict | None = None):
        import torch

        from aifactory.serve.config import CacheConfig, ContinuousBatchingConfig

        torch.set_num_threads(torch_threads)
        self.registry = registry
        self.model_name = model_name
        cache_cfg = CacheConfig.model_validate(cache)
        self.prefix_cache = (
            PrefixCache(max_entries=cache_cfg.prefix_max_entries, block_tokens=cache_cfg.prefix_block_tokens)
            if cache_cfg.prefix_enabled else None
        )
        self.loaded: LoadedModel = load_version(registry, model_name, model_version)
        self.decoder = Decoder(self.loaded, prefix_cache=self.prefix_cache)
        self.last_error: str | None = None
        self.latency = LatencyWindow()
        ctx = serve.get_replica_context()
        self.usage = UsageRecorder(ctx.app_name, ctx.deployment)  # exports the prefix cache's hit ratio
        self.engine_metrics = EngineMetrics(ctx.app_name, ctx.deployment)
        self.loop = EngineLoop(self.loaded, config=ContinuousBatchingConfig.model_validate(continuous or {}),
                               prefix_cache=self.prefix_cache, on_step=self.engine_metrics.step) \
            if engine == "continuous" else None
        logger.info("loaded %s (sha256 %s) in %.2fs", self.loaded.ref, self.loaded.sha256[:12], self.loaded.load_s)

    def reconfigure(self, user_config: dict) -> None:
        version = user_config.get("model_version")
        if version and version != self.loaded.version:
            try:
                loaded = load_version(self.registry, self.model_name, version)
            except FactoryError as err:
                # A tampered or missing artifact is refused; the loaded version keeps serving.
                self.last_error = f"refused {self.model_name}:{version}: {err}"
                logger.error(self.last_error)
            else:
                self.loaded, self.last_error = loaded, None
                self.decoder = Decoder(loaded, prefix_cache=self.prefix_cache)
                if self.loop is not None:
                    self.loop.swap(loaded)
                logger.info("swapped to %s (sha256 %s)", loaded.ref, loaded.sha256[:12])
        if "max_batch_size" in user_config:
            self._steps.set_max_batch_size(int(user_config["max_batch_size"]))
        if "batch_wait_timeout_s" in user_config:
            self._steps.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _steps(self, items: list[GenItem]):
        """The batched decode: yields, per step, each request's :class:`GenDelta` (``None``: nothing new yet).

        Streamed and non-streamed requests share this batch queue, window and engine. The decode runs in
        one worker thread (torch's inference mode is per thread) and hands each step to the event loop.
        A row that fails on its own ends with a result carrying ``error``, which only its caller sees
        (:meth:`stream`, :meth:`generate`); only a failure of the whole batch is raised to every caller."""
        t0 = time.monotonic()
        decoder = self.decoder  # a swap during this call affects only the next batch
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()

        def run() -> None:
            try:
                for deltas in decoder.stream(items):
                    loop.call_soon_threadsafe(steps.put_nowait, deltas)
            except BaseException as err:  # re-raised in the loop, so every caller of the batch sees it
                loop.call_soon_threadsafe(steps.put_nowait, err)
            else:
                loop.call_soon_threadsafe(steps.put_nowait, None)

        worker = asyncio.create_task(asyncio.to_thread(run))
        finished = [False] * len(items)
        results: list[GenResult | None] = [None] * len(items)
        while (deltas := await steps.get()) is not None:
            if isinstance(deltas, BaseException):
                raise deltas
            out = []
            for i, d in enumerate(deltas):
                if finished[i]:
                    out.append(StopIteration)  # serve.batch's sentinel: this caller's stream is over
                    continue
                out.append(d)
                if d is not None and d.result is not None:
                    finished[i], results[i] = True, d.result
            yield out
        await worker
        self.latency.observe(time.monotonic() - t0)
        if self.prefix_cache is not None:
            self.usage.start()
            for item, res in zip(items, results):
                if res is not None and res.error is None:
                    self.usage.cache(item.tenant, "prefix", res.prefix_hit_tokens > 0)

    async def _engine_steps(self, item: GenItem):
        """One request's deltas from the replica's engine loop; its end is counted (prefix cache, latency, TTFT)."""
        self.usage.start()
        self.engine_metrics.start()
        async for delta in self.loop.stream(item):
            res = delta.result
            if res is not None and res.error is None:
                self.latency.observe(res.timings.get("total_s", 0.0))
                self.engine_metrics.request(item.tenant, res.timings, len(res.tokens))
                if self.prefix_cache is not None:
                    self.usage.cache(item.tenant, "prefix", res.prefix_hit_tokens > 0)
            yield delta

    def _deltas(self, item: GenItem):
        return self._steps(item) if self.loop is None else self._engine_steps(item)

    async def stream(self, item: GenItem):
        """One request's deltas as they are decoded (``handle.options(stream=True).stream.remote``)."""
        steps = self._deltas(item)
        async for delta in steps:
            if delta is None:
                continue
            if delta.result is not None and delta.result.error is not None:
                _drain_later(steps)
                raise _row_failed(delta.result)
            yield delta

    async def generate(self, item: GenItem) -> GenResult:
        steps = self._deltas(item)
        async for delta in steps:
            if delta is not None and delta.result is not None:
                _drain_later(steps)  # answer now; the batch's generator ends this caller's stream
                if delta.result.error is not None:
                    raise _row_failed(delta.result)
                return delta.result
        raise RuntimeError("the decoder ended without a result")  # the engine always finishes each row

    def info(self) -> dict[str, Any]:
        engine = {"kind": "static"}
        if self.loop is not None:
            st = self.loop.engine.stats
            engine = {"kind": "continuous", "steps": st.steps, "largest_batch": st.largest_batch,
                      "preemptions": st.preemptions, **self.engine_metrics.snapshot()}
        return {"version": self.loaded.version, "sha256": self.loaded.sha256, "last_error": self.last_error,
                "prefix_cache_hit_ratio": self.prefix_cache.stats.hit_ratio() if self.prefix_cache else None,
                "p95_latency_s": self.latency.p95(), "engine": engine}

    def record_autoscaling_stats(self) -> dict[str, float]:
        stats = {"p95_latency_s": self.latency.p95()}
        if self.loop is not None:
            stats["engine_waiting_seqs"] = float(self.engine_metrics.snapshot()["waiting"])
        return stats


api = FastAPI(title="aifactory completions", docs_url=None, redoc_url=None)
install_error_handlers(api)


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, args: dict, interactive: DeploymentHandle, batch: DeploymentHandle, canary: DeploymentHandle):
        from aifactory.data.tokenizer import ByteTokenizer

        self.args = CompletionsArgs.model_validate(args)

        self.tenants = TenantResolver(auth=self.args.auth, api_keys=self.args.api_keys, home=self.args.home,
                                      tenants=self.args.tenants)
        self.handles = {INTERACTIVE: interactive, BATCH: batch, CANARY: canary}
        self.tokenizer = ByteTokenizer()
        a = self.args
        self.limiter = TenantRateLimiter(a.admission.default_rate_limit, a.admission.tenant_rate_limits)
        self.exact = ExactCache(ttl_s=a.cache.exact_ttl_s, max_entries=a.cache.exact_max_entries) \
            if a.cache.exact_enabled else None
        self.semantic = SemanticCache(threshold=a.cache.semantic_threshold, ttl_s=a.cache.semantic_ttl_s,
                                      max_entries=a.cache.semantic_max_entries) if a.cache.semantic_enabled else None
        self.embedder = None
        if self.semantic is not None:
            from aifactory.serve.apps.embeddings import load_minilm

            self.embedder = load_minilm()
        self.rollout = RolloutState(stable_version=a.model_version or "", canary_version=a.canary_version,
                                    canary_percent=a.canary_percent)
        self.counter = itertools.count()
        ctx = serve.get_replica_context()
        self.usage = UsageRecorder(ctx.app_name, ctx.deployment)
        self.seq_len: int | None = None
        self._flushes_seen: dict[str, str] = {}  # cache_flush tokens already applied (see reconfigure)

    def reconfigure(self, user_config: dict) -> None:
        if "rollout" in user_config:
            self.rollout = parse_config(RolloutState, user_config["rollout"], source="Ingress user_config.rollout")
        wanted = {str(k): str(v) for k, v in (user_config.get("cache_flush") or {}).items()}
        for tenant in flush_requests(self._flushes_seen, wanted):
            for cache in (self.exact, self.semantic):
                if cache is not None:
                    cache.drop(tenant)
        self._flushes_seen = wanted

    def cache_info(self, tenant: str | None = None) -> dict:
        """This replica's response caches, for the control API (through a handle; ``tenant`` None = all)."""
        return {"exact": _cache_info(self.exact, tenant), "semantic": _cache_info(self.semantic, tenant)}

    # ---- routes -------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"ok": True}

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            await self.tenants.caller(request.headers)  # the caller's key (or, in header mode, tenant) first
        except APIError as err:
            return error_response(err)
        ids = [self.args.model_name, f"{self.args.model_name}:{self.rollout.stable_version}"]
        if self.rollout.canary_version:
            ids.append(f"{self.args.model_name}:{self.rollout.canary_version}")
        return JSONResponse(ModelList(data=[ModelCard(id=i) for i in ids]).model_dump())

    async def deployment_infos(self) -> dict:
        """What each model deployment holds (version, sha256, last refused load): for the rollout steps of
        ``aifactory.serve.deploy``, through a handle (operators only: the HTTP status page needs a key)."""
        infos = {}
        for name, h in self.handles.items():
            try:
                infos[name] = await asyncio.wait_for(h.info.remote(), timeout=10)
            except Exception as err:  # status is informational: show the problem, do not fail
                infos[name] = {"error": f"{type(err).__name__}: {err}"}
        return infos

    @api.get("/v1/status")
    async def status(self, request: Request):
        """The rollout and the deployments' versions, and the caller's own cache counters (a key is needed;
        no other tenant's counters, no shared prefix-cache ratio)."""
        try:
            tenant = await self.tenants.caller(request.headers)
        except APIError as err:
            return error_response(err)
        infos = {name: {k: v for k, v in info.items() if k != "prefix_cache_hit_ratio"}
                 for name, info in (await self.deployment_infos()).items()}
        return JSONResponse({
            "tenant": tenant,
            "rollout": self.rollout.model_dump(),
            "deployments": infos,
            "exact_cache": _cache_info(self.exact, tenant),
            "semantic_cache": _cache_info(self.semantic, tenant),
        })

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, COMPLETIONS)

    @api.post("/batch/v1/completions")
    async def batch_completions(self, request: Request):
        return await self._serve(request, COMPLETIONS)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, CHAT)

    @api.post("/batch/v1/chat/completions")
    async def batch_chat_completions(self, request: Request):
        return await self._serve(request, CHAT)

    # ---- the request path (both APIs: `api` holds what differs) ---------------------------------------
    async def _serve(self, request: Request, api: CompletionsAPI):
        self.usage.start()
        t0 = time.monotonic()
        tenant = "unattributed"
        status = 200
        streaming = False
        try:
            tenant = await self.tenants.resolve(request.headers)
            retry = self.limiter.check(tenant)
            if retry:
                raise APIError(429, f"tenant {tenant!r} is over its rate limit; retry in {retry:.0f}s",
                               param="X-Tenant", code="rate_limited", type_="rate_limit_error",
                               headers={"Retry-After": str(int(retry))})
            slo = resolve_slo_class(request.headers, request.url.path, self.args.default_slo_class)
            max_body_bytes = self.args.limits.max_body_bytes
            req = parse_body(api.request_cls, await read_body(request, max_body_bytes=max_body_bytes),
                             max_body_bytes=max_body_bytes)
            if req.stream:
                # Errors up to the first chunk are still plain 4xx/5xx JSON; the stream counts the request
                # (status, time to its last chunk) when it ends.
                body = await self._stream(api, req, tenant=tenant, slo=slo, t0=t0)
                streaming = True
                return StreamingResponse(body, media_type="text/event-stream")
            resp = await self._complete(api, req, tenant=tenant, slo=slo)
            return JSONResponse(resp.model_dump())
        except APIError as err:
            status = err.status
            return error_response(err)
        finally:
            if not streaming:
                self.usage.request(tenant, status, time.monotonic() - t0)

    def _target(self, req: CompletionRequest) -> tuple[str, str]:
        """(deployment, version) for this request: pinned by ``model=name:version`` or by the canary split."""
        name, _, pinned = req.model.partition(":")
        if name not in (self.args.model_name, self.args.model_name.rpartition("/")[2]):  # tenant/name or name
            raise APIError(404, f"model: {req.model!r} is not served here; GET /v1/models lists the models",
                           param="model", code="model_not_found")
        r = self.rollout
        if pinned:
            if pinned == r.stable_version:
                return "stable", pinned
            if pinned == r.canary_version:
                return "canary", pinned
            raise APIError(404, f"model: version {pinned!r} is not served here (stable {r.stable_version!r}, "
                                f"canary {r.canary_version!r})", param="model", code="model_not_found")
        if pick_target(next(self.counter), r.canary_percent) == "canary":
            return "canary", r.canary_version or r.stable_version
        return "stable", r.stable_version

    async def _prepare(self, api: CompletionsAPI, req: CompletionRequest, *, tenant: str, slo: str) -> dict[str, Any]:
        """Validate, pick the target and look in the caches: ``hit`` is a cached answer or None."""
        prompt = api.prompt(req)
        tokens = self.tokenizer.encode(prompt)
        limits = self.args.limits
        check_completion_limits(req, prompt_tokens=len(tokens), max_prompt_tokens=limits.max_prompt_tokens,
                                max_tokens_limit=limits.max_tokens, prompt_param=api.prompt_param)
        target, version = self._target(req)
        # `api` in the key: a chat answer and a completion of the same prompt text are different answers.
        fields = {"api": api.name, "prompt": prompt, "max_tokens": req.max_tokens, "temperature": req.temperature,
                  "seed": req.seed, "stop": api.stops(req)}
        p = {"tokens": tokens, "fields": fields, "cacheable": req.deterministic, "emb": None, "hit": None}
        key = ExactCache.key(tenant, version, **fields) if p["cacheable"] and self.exact is not None else None
        if key is not None:
            hit = self.exact.get(key)
            self.usage.cache(tenant, "exact", hit is not None)
            if hit is not None:
                return p | {"hit": api.cached(hit, "exact")}
        if p["cacheable"] and self.semantic is not None:
            p["emb"] = emb = (await asyncio.to_thread(self.embedder.encode, [prompt], normalize_embeddings=True))[0]
            scope_fields = {k: v for k, v in fields.items() if k != "prompt"}
            found = self.semantic.get(SemanticCache.scope(tenant, version, **scope_fields), emb)
            self.usage.cache(tenant, "semantic", found is not None)
            if found is not None:
                return p | {"hit": api.cached(found[0], "semantic")}
        p["handle"] = self.handles[CANARY if target == "canary" else TARGETS[slo]]
        p["item"] = GenItem(tokens=tokens, max_tokens=req.max_tokens, temperature=req.temperature, seed=req.seed,
                            tenant=tenant, slo_class=slo)
        return p

    def _finish(self, api: CompletionsAPI, req: CompletionRequest, p: dict[str, Any], result: GenResult, *,
                tenant: str, text: str, finish: str, head: dict[str, Any] | None = None):
        """The answer of a generated request: counts its tokens for the tenant and fills the caches."""
        tokens = p["tokens"]
        resp = api.response(  # a stream's answer keeps the id its chunks carried
            req, text=text, finish=finish, head=head, fingerprint=f"{self.args.model_name}:{result.version}",
            usage=Usage(prompt_tokens=len(tokens), completion_tokens=len(result.tokens),
                        total_tokens=len(tokens) + len(result.tokens)))
        self.usage.tokens(tenant, prompt=len(tokens), completion=len(result.tokens))
        if p["cacheable"]:
            # Stored under the version that actually answered (it may lag the rollout during a swap).
            fields = p["fields"]
            if self.exact is not None:
                self.exact.put(ExactCache.key(tenant, result.version, **fields), resp.model_dump())
            if self.semantic is not None and p["emb"] is not None:
                scope_fields = {k: v for k, v in fields.items() if k != "prompt"}
                self.semantic.put(SemanticCache.scope(tenant, result.version, **scope_fields), p["emb"],
                                  resp.model_dump())
        return resp

    async def _complete(self, api: CompletionsAPI, req: CompletionRequest, *, tenant: str, slo: str):
        p = await self._prepare(api, req, tenant=tenant, slo=slo)
        if p["hit"] is not None:
            return p["hit"]
        result = await self._call(p["handle"], p["item"], slo)
        text, finish = apply_stop(self.tokenizer.decode(result.tokens), api.stops(req), result.finish_reason)
        return self._finish(api, req, p, result, tenant=tenant, text=text, finish=finish)

    async def _stream(self, api: CompletionsAPI, req: CompletionRequest, *, tenant: str, slo: str, t0: float):
        """Open the token stream and wait for its first step, so errors before it are still JSON; then
        return the SSE body, which sends each step's text as soon as the engine decodes it."""
        p = await self._prepare(api, req, tenant=tenant, slo=slo)
        if p["hit"] is not None:
            stream, first = None, None
        else:
            stream, first = await self._call(p["handle"], p["item"], slo, stream=True)
        return self._sse_body(api, req, p, stream, first, tenant=tenant, t0=t0)

    async def _sse_body(self, api: CompletionsAPI, req: CompletionRequest, p: dict[str, Any], stream,
                        first: GenDelta | None, *, tenant: str, t0: float):
        status = 200
        received, billed = 0, False
        timeout = self.args.admission.request_timeout_s
        try:
            if p["hit"] is not None:
                async for chunk in api.replay(p["hit"]):
                    yield chunk
                return
            head = api.head(req)
            if (opening := api.opening(head)) is not None:
                yield opening
            text = TextStream(api.stops(req))
            delta = first
            while True:
                received += len(delta.tokens)
                piece = text.feed(delta.tokens, final=delta.result is not None)
                if piece:
                    yield api.chunk(head, piece)
                if delta.result is not None:
                    break
                delta = await asyncio.wait_for(stream.__anext__(), timeout=timeout)
            result = delta.result
            finish = "stop" if text.stopped else result.finish_reason
            resp = self._finish(api, req, p, result, tenant=tenant, text=text.answer, finish=finish, head=head)
            billed = True
            yield api.chunk(head | {"system_fingerprint": resp.system_fingerprint}, "", finish,
                            usage=resp.usage.model_dump())
            yield DONE
        except asyncio.TimeoutError:
            status = 504
            yield sse_error(f"the model did not answer within request_timeout_s={timeout:g}s", "timeout")
        except (GeneratorExit, asyncio.CancelledError):
            status = 499  # the client went away mid-stream
            raise
        except Exception as err:  # the status line went out already: report in the stream, then end it
            status = 500
            logger.exception("stream failed after its first chunk")
            yield sse_error(f"internal error: {type(err).__name__}", "internal_error")
        finally:
            if p["hit"] is None and not billed:
                # Cut short (timeout, error, disconnect): the tokens decoded so far were still spent.
                self.usage.tokens(tenant, prompt=len(p["tokens"]), completion=received)
            self.usage.request(tenant, status, time.monotonic() - t0)

    async def _call(self, handle: DeploymentHandle, item: GenItem, slo: str, *, stream: bool = False):
        """The model's answer (a GenResult), or with ``stream`` the open delta stream and its first delta."""
        from ray.serve.exceptions import BackPressureError

        cls = self.args.interactive if slo == "interactive" else self.args.batch
        timeout = self.args.admission.request_timeout_s
        for attempt in range(3):
            try:
                if not stream:
                    return await asyncio.wait_for(_awaitable(handle.generate.remote(item)), timeout=timeout)
                gen = handle.options(stream=True).stream.remote(item)
                return gen, await asyncio.wait_for(gen.__anext__(), timeout=timeout)
            except BackPressureError:
                raise APIError(429, f"the {slo} queue is full; retry later", param=None, code="queue_full",
                               type_="rate_limit_error",
                               headers={"Retry-After": str(max(1, int(round(cls.retry_after_s))))}) from None
            except asyncio.TimeoutError:
                raise APIError(504, f"the model did not answer within request_timeout_s={timeout:g}s",
                               code="timeout", type_="timeout_error") from None
            except Exception as err:
                # A replica that died before answering (killed, OOM): generation is idempotent, so retry on
                # another. A stream is retried only here, before its first chunk went out.
                if type(err).__name__ in _REPLICA_GONE and attempt < 2:
                    logger.warning("replica gone (%s); retrying", type(err).__name__)
                    await asyncio.sleep(0.2 * (attempt + 1))
                    continue
                raise
        raise AssertionError("unreachable")


def build(args: CompletionsArgs):
    """The application: resolves the versions now, so the rollout state is explicit from the start."""
    from aifactory.home import FactoryHome
    from aifactory.registry import ModelRegistry

    home = FactoryHome.from_env(args.home)
    registry = ModelRegistry(home)
    stable = registry.get(args.model_name, args.model_version).version
    canary = registry.get(args.model_name, args.canary_version).version if args.canary_version else None
    # Token limits default from the model (`factory serve deploy` resolved and checked them already).
    # Both versions serve the same requests: the limits fit the shorter context.
    configs = [registry.get(args.model_name, v).model_config for v in filter(None, (stable, canary))]
    args = args.fitted_to(min(configs, key=lambda c: int(c.get("seq_len") or 0)))
    args = args.model_copy(update={"model_version": stable, "canary_version": canary})
    common = {"registry": home.registry, "model_name": args.model_name, "cache": args.cache.model_dump(),
              "torch_threads": int(os.environ.get("AIFACTORY_SERVE_TORCH_THREADS", "1"))}

    def server(name: str, cls, version: str):
        return ModelServer.options(
            name=name, user_config={"model_version": version, **cls.batching.model_dump()},
            **cls.deployment_options(),
        ).bind(model_version=version, engine=cls.engine, continuous=cls.continuous.model_dump(), **common)

    interactive = server(INTERACTIVE, args.interactive, stable)
    batch = server(BATCH, args.batch, stable)
    canary_d = server(CANARY, args.canary, canary or stable)
    from ray.serve.config import BackpressureConfig

    rollout = RolloutState(stable_version=stable, canary_version=canary, canary_percent=args.canary_percent)
    return Ingress.options(
        name=INGRESS,
        num_replicas=args.ingress_replicas,
        max_ongoing_requests=args.ingress_max_ongoing_requests,
        max_queued_requests=args.ingress_max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        ray_actor_options={"num_cpus": INGRESS_NUM_CPUS},
        user_config={"rollout": rollout.model_dump()},
    ).bind(args.model_dump(mode="json"), interactive, batch, canary_d)


def app_builder(args: CompletionsArgs) -> Application:
    """``serve run aifactory.serve.apps.completions:app_builder`` or a Serve config's ``args`` (validated by Ray)."""
    return build(args)
