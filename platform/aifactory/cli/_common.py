"""Arguments shared by several verbs: the factory home, the cluster address, the tenant."""

from __future__ import annotations

import argparse
import re

from aifactory.config import parse_config
from aifactory.exceptions import ConfigError
from aifactory.home import FactoryHome
from aifactory.tenancy import TenantRef


def home_of(args: argparse.Namespace) -> FactoryHome:
    return FactoryHome.from_env(getattr(args, "home", None))


def add_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        help="the Ray cluster: http://HOST:8265 (dashboard) or HOST:6379; default $RAY_ADDRESS, "
        "then the `factory up` cluster",
    )


def add_tenant(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--tenant", required=required, help="tenant the work belongs to (lowercase DNS label)")
    parser.add_argument("--project", default="default", help="project within the tenant")
    parser.add_argument("--cost-center", dest="cost_center", help="optional finance cost center")


def tenant_of(args: argparse.Namespace) -> TenantRef | None:
    if getattr(args, "tenant", None) is None:
        return None
    data = {"tenant": args.tenant, "project": args.project}
    if getattr(args, "cost_center", None):
        data["cost_center"] = args.cost_center
    return parse_config(TenantRef, data, source="tenant (--tenant/--project/--cost-center)")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def parse_bytes(text: str) -> int:
    """``"2GiB"`` -> 2147483648; ``"500M"`` -> 500000000; plain numbers are bytes."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError("--memory", [f"{text!r} is not a size; use e.g. 512MiB, 2GiB or a number of bytes"])
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])
