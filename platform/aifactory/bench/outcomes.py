"""Cost per useful outcome: the price book applied to what a trial held while it measured.

Pure (no Ray, no I/O). The basis is what the meter read the trial's actors holding
(:class:`aifactory.cost.metered.Held`: the app's replicas over the measured load, the Train workers over
the run, each GPU-second at its node's SKU), priced with :func:`aifactory.cost.pricing.price`; only where
that could not be read (the reason is in ``unavailable["metered"]``) the declared resource-seconds the
trial records (``replica_cpu_s``, ``train_cpu_s``, ``gpu_s``: declared resources x wall time).
``cost_basis`` says which. The dollars are divided by the useful outcome:

- serving: ``cost_per_1k_requests_usd`` (replica resource-seconds over successful requests; the load
  generator is not part of the service), ``requests_per_usd``, and for token-generating apps
  ``cost_per_1m_tokens_usd`` (over ``tokens``, the answers' reported tokens: generated ones for completions,
  embedded ones for embeddings);
- training: ``cost_per_validated_checkpoint_usd`` (the run's resources until the validation-loss target
  was reached; None when it was not, since no validated checkpoint exists), ``samples_per_usd``;
- both: ``*_per_joule`` from NVML energy where a GPU measured it.

A figure that cannot be computed is ``None`` with the reason in ``unavailable``, never invented.
"""

from __future__ import annotations

from typing import Any

from aifactory.cost.metered import Held
from aifactory.cost.pricebook import PriceBook
from aifactory.cost.pricing import price
from aifactory.cost.records import SKU_CPU, Resource, UsageRecord


def _usd(book: PriceBook, *, resource: Resource, sku: str, quantity_s: float, region: str, tenant: str) -> float:
    record = UsageRecord(window_start=0.0, window_end=max(quantity_s, 1e-9), tenant=tenant, workload="bench",
                         resource=resource, sku=sku, region=region, quantity_s=quantity_s)
    return price(record, book).usd


def _metered_usd(held: Held, book: PriceBook, *, tenant: str, region: str, out: dict[str, Any]) -> float:
    out.update(metered_cpu_s=held.seconds("cpu"), metered_gpu_s=held.seconds("gpu"),
               metered_gpu_skus=held.skus("gpu") or None,
               cost_basis="metered (estimated edges)" if held.estimated else "metered")
    return held.usd(book, tenant=tenant, region=region)


def price_outcomes(metrics: dict[str, Any], *, family: str, book: PriceBook | None, region: str,
                   tenant: str, gpu_sku: str | None = None, unavailable_reason: str = "",
                   metered: Held | None = None, metered_reason: str = "") -> dict[str, Any]:
    """The priced figures of one trial's ``metrics`` (a new dict; ``metrics`` is not changed). ``metered``:
    what the meter read the trial holding; None falls back to the declared resource-seconds in ``metrics``,
    saying why (``metered_reason``)."""
    out: dict[str, Any] = {}
    missing: dict[str, str] = dict(metrics.get("unavailable") or {})  # what the trial itself could not measure
    if metered is None or not metered.spans:
        metered = None
        missing["metered"] = metered_reason or "the trial's actors were not found by the state API"
        out["cost_basis"] = "declared"
    energy = metrics.get("energy_j")
    if family == "serving":
        ok = metrics.get("num_ok") or 0
        cpu_s = metrics.get("replica_cpu_s")
        out["requests_per_joule"] = ok / energy if energy else None
        if energy is None:
            missing["requests_per_joule"] = metrics.get("energy_note") or "no NVML energy counter"
        cost = None
        if book is None:
            missing["cost_per_1k_requests_usd"] = unavailable_reason or "no price book"
        elif ok == 0:
            missing["cost_per_1k_requests_usd"] = "no successful requests"
        elif metered is not None:
            cost = _metered_usd(metered, book, tenant=tenant, region=region, out=out)
        elif cpu_s is None:
            missing["cost_per_1k_requests_usd"] = "resources not recorded"
        else:
            cost = _usd(book, resource=Resource.CPU, sku=SKU_CPU, quantity_s=cpu_s, region=region, tenant=tenant)
            if metrics.get("gpu_s"):
                cost += _usd(book, resource=Resource.GPU, sku=gpu_sku or "unknown-gpu",
                             quantity_s=metrics["gpu_s"], region=region, tenant=tenant)
        out["cost_usd"] = cost
        out["cost_per_1k_requests_usd"] = cost / ok * 1000 if cost is not None else None
        out["requests_per_usd"] = ok / cost if cost else None
        if cost is None:
            missing.setdefault("requests_per_usd", missing["cost_per_1k_requests_usd"])
        tokens = metrics.get("tokens")  # the app's unit of work: generated (completions) or embedded tokens
        out["cost_per_1m_tokens_usd"] = cost / tokens * 1e6 if cost is not None and tokens else None
        if out["cost_per_1m_tokens_usd"] is None:
            missing["cost_per_1m_tokens_usd"] = (
                "the app reports no token counts" if tokens is None else "no tokens processed" if not tokens
                else missing["cost_per_1k_requests_usd"])
    else:
        samples = metrics.get("samples") or 0
        out["samples_per_joule"] = samples / energy if energy else None
        if energy is None:
            missing["samples_per_joule"] = metrics.get("energy_note") or "no NVML energy counter"
        cost = cost_to_quality = None
        if book is None:
            missing["cost_per_validated_checkpoint_usd"] = unavailable_reason or "no price book"
        else:
            cpu_s = metrics.get("train_cpu_s")
            if metered is not None:
                cost = _metered_usd(metered, book, tenant=tenant, region=region, out=out)
            elif cpu_s is not None:
                cost = _usd(book, resource=Resource.CPU, sku=SKU_CPU, quantity_s=cpu_s, region=region, tenant=tenant)
            ttq, wall = metrics.get("time_to_quality_s"), metrics.get("train_wall_s")
            if cost is not None and ttq is not None and wall:
                cost_to_quality = cost * min(ttq / wall, 1.0)
            elif ttq is None:
                missing["cost_per_validated_checkpoint_usd"] = "validation-loss target not reached"
        out["cost_usd"] = cost
        out["cost_per_validated_checkpoint_usd"] = cost_to_quality
        out["samples_per_usd"] = samples / cost if cost else None
    out["unavailable"] = missing
    return out

