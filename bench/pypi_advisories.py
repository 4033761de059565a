"""Known vulnerabilities of the locked Python packages, from PyPI's JSON API (its advisories come from OSV).

PyPI answers two ways. `/pypi/NAME/VERSION/json` lists the advisories of that exact release; where it is
not served (these machines get HTTP 404 for it), `/pypi/NAME/json` still lists those of the project's
latest release, which settles a pin only when the pin is that latest release. A pin older than its
latest release is then reported as not checked, never as clean. Standard library only: no client to
install, and nothing but PyPI is asked.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PYPI = "https://pypi.org/pypi"
TIMEOUT = 20  # seconds per request: torch's project page is a few MB


class PyPIUnreachable(Exception):
    """PyPI did not answer (no route, DNS, TLS, timeout, 5xx)."""


@dataclass(frozen=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]
    link: str

    @property
    def ids(self) -> set[str]:
        return {self.id, *self.aliases}

    @property
    def cve(self) -> str:
        """The CVE alias where there is one: the id people search for."""
        return next((a for a in sorted(self.aliases) if a.startswith("CVE-")), self.id)


@dataclass
class PinStatus:
    name: str
    version: str
    source: str | None = None  # "release", "latest", or None: not checked
    latest: str | None = None
    advisories: list[Advisory] = field(default_factory=list)
    error: str | None = None


def normalize(name: str) -> str:
    """PEP 503: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(*locks: Path) -> dict[str, str]:
    """`name==version` pins of pip-compile lock files, by normalized name (the later file wins a clash)."""
    pins: dict[str, str] = {}
    for lock in locks:
        for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", lock.read_text(), re.M):
            pins[normalize(name)] = version
    return pins


def fetch(url: str) -> dict[str, Any] | None:
    """The JSON at `url`; None for a 404."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return json.load(response)
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise PyPIUnreachable(f"{url}: HTTP {err.code}") from err
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise PyPIUnreachable(f"{url}: {getattr(err, 'reason', err)}") from err


def advisories_of(data: dict[str, Any]) -> list[Advisory]:
    return [Advisory(v["id"], tuple(v.get("aliases") or ()), tuple(v.get("fixed_in") or ()), v.get("link") or "")
            for v in data.get("vulnerabilities") or [] if not v.get("withdrawn")]


def check_pin(name: str, version: str, base: str = PYPI) -> PinStatus:
    status = PinStatus(name, version)
    try:
        if (release := fetch(f"{base}/{name}/{version}/json")) is not None:
            status.source, status.advisories = "release", advisories_of(release)
            return status
        if (project := fetch(f"{base}/{name}/json")) is None:
            status.error = "not on PyPI"
            return status
    except PyPIUnreachable as err:
        status.error = str(err)
        return status
    status.latest = project["info"]["version"]
    if status.latest == version:
        status.source, status.advisories = "latest", advisories_of(project)
    return status


def check_pins(pins: dict[str, str], base: str = PYPI) -> list[PinStatus]:
    """Every pin's status, in name order. Raises PyPIUnreachable when PyPI does not answer at all."""
    first = sorted(pins)[0]
    fetch(f"{base}/{first}/json")  # one probe: offline, fail once and fast instead of once per pin
    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(lambda name: check_pin(name, pins[name], base), sorted(pins)))
