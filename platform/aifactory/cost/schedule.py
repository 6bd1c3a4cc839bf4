"""Price books over time: usage is priced by the book in force when it happened.

Without dates, replacing ``<home>/pricebook.yaml`` repriced the whole ledger: last month's bill changed when
this month's rates did. A :class:`PriceSchedule` is the base book (the home's ``pricebook.yaml``, else the
packaged default; in force since forever unless it carries ``effective_from``) plus the dated books under
``<home>/pricebooks/``. A record is priced by the book in force at its ``window_start`` (meter windows are
about a minute, so a window straddling a change is priced whole by the earlier book). Adding a book with
:func:`add_price_book` (``factory costs pricebook add FILE``) takes effect now by default, so it changes
only later usage; :meth:`PriceSchedule.with_book` answers "what if" without writing anything.

Pricing stays pure: :func:`aifactory.cost.pricing.price` takes a schedule as it takes a book.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aifactory.config import read_yaml
from aifactory.cost.pricebook import DEFAULT_PATH, PriceBook, parse_price_book
from aifactory.cost.records import DEFAULT_POOL, PricingClass, Resource
from aifactory.exceptions import ConfigError, FactoryError

DATED_DIR = "pricebooks"


class NoPriceBookInForce(FactoryError):
    """Usage happened before the earliest book of the schedule: it has no price, and must not get zero."""

    def __init__(self, t: float, earliest: str, version: str):
        self.t, self.earliest, self.version = t, earliest, version
        when = _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).isoformat()
        super().__init__(f"no price book was in force at {when}: the earliest, {version!r}, takes effect "
                         f"{earliest}; give the base book no effective_from (in force since forever) or an "
                         "earlier one")

    def __reduce__(self):
        return (self.__class__, (self.t, self.earliest, self.version))


def _when(book: PriceBook) -> str:
    return "forever" if book.effective_from is None else book.effective_from.isoformat()


@dataclass(frozen=True)
class PriceSchedule:
    """Price books ordered by ``effective_from``; build it with :meth:`of`."""

    books: tuple[PriceBook, ...]
    sources: tuple[str, ...]

    @classmethod
    def of(cls, books: Sequence[PriceBook], sources: Sequence[str] | None = None) -> PriceSchedule:
        """Validate and order ``books``: at least one, distinct versions, distinct effective_from, at most one
        book without a date (the base). Raises one ConfigError listing every problem."""
        sources = list(sources) if sources is not None else [f"<book {b.version}>" for b in books]
        problems = []
        if not books:
            problems.append("<schedule>: at least one price book is required")
        seen_version: dict[str, str] = {}
        seen_when: dict[float, str] = {}
        for b, src in zip(books, sources):
            if b.version in seen_version:
                problems.append(f"{src}: version {b.version!r} is also the version of {seen_version[b.version]}; "
                                "bump version on every change")
            seen_version.setdefault(b.version, src)
            if b.effective_from_ts in seen_when:
                problems.append(f"{src}: effective_from {_when(b)} is also that of {seen_when[b.effective_from_ts]}")
            seen_when.setdefault(b.effective_from_ts, src)
        if problems:
            raise ConfigError("price books", problems)
        order = sorted(range(len(books)), key=lambda i: books[i].effective_from_ts)
        return cls(books=tuple(books[i] for i in order), sources=tuple(sources[i] for i in order))

    def at(self, t: float) -> PriceBook:
        """The book in force at Unix time ``t``: the latest whose effective_from is not after ``t``."""
        starts = [b.effective_from_ts for b in self.books]
        i = bisect.bisect_right(starts, t) - 1
        if i < 0:
            first = self.books[0]
            raise NoPriceBookInForce(t, _when(first), first.version)
        return self.books[i]

    @property
    def version(self) -> str:
        """What reports quote: the one version, or each version with the time it takes effect."""
        if len(self.books) == 1:
            return self.books[0].version
        return ", ".join(f"{b.version} (from {_when(b)})" for b in self.books)

    def usd_per_hour(self, resource: Resource | str, sku: str, region: str, *, at: float,
                     pricing_class: PricingClass | str | None = None, pool: str = DEFAULT_POOL) -> float:
        return self.at(at).usd_per_hour(resource, sku, region, pricing_class=pricing_class, pool=pool)

    def with_book(self, book: PriceBook, source: str = "<what if>") -> PriceSchedule:
        """The schedule as it would be with ``book`` added: an undated book is in force always (it alone
        prices everything); a dated one replaces the book of the same effective_from, if any."""
        if book.effective_from is None:
            return PriceSchedule.of([book], [source])
        keep = [(b, s) for b, s in zip(self.books, self.sources)
                if b.effective_from_ts != book.effective_from_ts and b.version != book.version]
        return PriceSchedule.of([b for b, _ in keep] + [book], [s for _, s in keep] + [source])

    def rows(self) -> list[dict]:
        """One row per book: version, in force from, until, source."""
        out = []
        for i, (b, src) in enumerate(zip(self.books, self.sources)):
            nxt = self.books[i + 1] if i + 1 < len(self.books) else None
            out.append({"version": b.version, "effective_from": _when(b),
                        "until": "-" if nxt is None else _when(nxt), "source": src})
        return out


def dated_dir(home) -> Path:
    return Path(home.root) / DATED_DIR


def load_prices(path: str | Path | None = None, *, home=None) -> PriceSchedule:
    """The schedule: the book at ``path`` alone, if given; else the base book (``<home>/pricebook.yaml``, else
    the packaged default) and every dated book under ``<home>/pricebooks/``."""
    if path is not None:
        return PriceSchedule.of([parse_price_book(read_yaml(path), source=str(path))], [str(path)])
    base = DEFAULT_PATH
    if home is not None and (Path(home.root) / "pricebook.yaml").is_file():
        base = Path(home.root) / "pricebook.yaml"
    books, sources = [parse_price_book(read_yaml(base), source=str(base))], [str(base)]
    problems = []
    if home is not None and dated_dir(home).is_dir():
        for f in sorted(dated_dir(home).glob("*.yaml")):
            b = parse_price_book(read_yaml(f), source=str(f))
            if b.effective_from is None:
                problems.append(f"{f}: effective_from: a book under {DATED_DIR}/ needs one (only the base book "
                                "is in force since forever)")
            books.append(b)
            sources.append(str(f))
    if problems:
        raise ConfigError("price books", problems)
    return PriceSchedule.of(books, sources)


def add_price_book(home, book: PriceBook, *, now: float | None = None, backdate: bool = False) -> Path:
    """Write ``book`` under ``<home>/pricebooks/`` so that it prices usage from its effective_from on.

    A book without effective_from takes effect ``now``. One dated before ``now`` would reprice usage already
    recorded (and maybe billed): refused unless ``backdate``. The new schedule is validated before writing."""
    import yaml

    now = time.time() if now is None else now
    dated = book.effective_from is not None
    if not dated:
        book = book.model_copy(update={"effective_from": _dt.datetime.fromtimestamp(now, tz=_dt.timezone.utc)})
    # Only a date the caller gave can be in the past ("now" rounds to microseconds and may land just below).
    if dated and book.effective_from_ts < now and not backdate:
        raise ConfigError("price book", [
            (f"effective_from: {_when(book)} is in the past; it would reprice usage recorded since then. Give a "
             "time from now on, or pass --backdate to correct history on purpose")])
    current = load_prices(home=home)
    current.with_book(book)  # validates: distinct versions and dates
    if any(b.version == book.version for b in current.books):
        raise ConfigError("price book", [f"version: {book.version!r} is already in the schedule; bump it"])
    out = dated_dir(home)
    out.mkdir(parents=True, exist_ok=True)
    stamp = book.effective_from.astimezone(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = out / f"{stamp}-{re.sub(r'[^A-Za-z0-9._-]', '_', book.version)}.yaml"
    path.write_text(yaml.safe_dump(book.model_dump(mode="json", exclude_none=True), sort_keys=False))
    return path


__all__ = ["NoPriceBookInForce", "PriceSchedule", "add_price_book", "dated_dir", "load_prices"]
