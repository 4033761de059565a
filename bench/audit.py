"""Known vulnerabilities in what the project ships: `make audit`.

Two sources, both as reachable from a machine that sees only PyPI and Debian's mirrors:
- the locked Python packages (requirements.lock, requirements-dev.lock) against PyPI's advisories
  (bench/pypi_advisories.py; a pin PyPI cannot answer for is listed as not checked);
- the libraries bundled in TorchServe's frontend jar against the fixes in bench/jar_inventory.py's table
  (offline: no Java vulnerability database is reachable).
Every finding needs an entry in configs/accepted-risks.yaml (why it is accepted, what mitigates it); the
exit status is 1 while one has none. Prints one screen and writes a results record (bench/record.py).
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from bench.jar_inventory import Inventory, JarError, JarFinding, check, installed_jar, read_inventory
from bench.pypi_advisories import PYPI, PinStatus, PyPIUnreachable, check_pins, normalize, read_pins
from training.cli import ArgumentParser

ROOT = Path(__file__).resolve().parent.parent
LOCKS = [ROOT / "requirements.lock", ROOT / "requirements-dev.lock"]
ACCEPTED = ROOT / "configs" / "accepted-risks.yaml"
FIELDS = ("id", "package", "why", "mitigation")


class AuditError(Exception):
    """The allow-list or the jar cannot be read: the audit cannot say anything."""


@dataclass(frozen=True)
class AcceptedRisk:
    id: str
    package: str
    why: str
    mitigation: str


def load_accepted(path: Path) -> list[AcceptedRisk]:
    """The allow-list: a YAML list of {id, package, why, mitigation}, every field a non-empty string."""
    try:
        data = yaml.safe_load(path.read_text()) or []
    except (OSError, yaml.YAMLError) as err:
        raise AuditError(f"{path}: {err}") from err
    if not isinstance(data, list):
        raise AuditError(f"{path}: expected a list of entries, got {type(data).__name__}")
    risks, seen = [], set()
    for n, entry in enumerate(data, 1):
        if not isinstance(entry, dict):
            raise AuditError(f"{path}: entry {n} is not a mapping")
        if unknown := sorted(set(entry) - set(FIELDS)):
            raise AuditError(f"{path}: entry {n} has unknown keys {unknown} (allowed: {', '.join(FIELDS)})")
        if bad := [k for k in FIELDS if not isinstance(entry.get(k), str) or not entry[k].strip()]:
            raise AuditError(f"{path}: entry {n} needs {', '.join(bad)} (a non-empty string each)")
        key = (entry["id"], normalize(entry["package"]))
        if key in seen:
            raise AuditError(f"{path}: entry {n} repeats {entry['id']} for {entry['package']}")
        seen.add(key)
        risks.append(AcceptedRisk(*(entry[k].strip() for k in FIELDS)))
    return risks


def verdicts(statuses: list[PinStatus], jar: list[JarFinding], accepted: list[AcceptedRisk]) -> list[dict[str, Any]]:
    """One row per finding (jar rows that are fixed included): id, package, version, fixed in, status."""
    allowed = {(r.id, normalize(r.package)) for r in accepted}
    rows = []
    for pin in statuses:
        for adv in pin.advisories:
            ok = any((i, pin.name) in allowed for i in adv.ids)
            rows.append({"id": adv.cve, "package": pin.name, "version": pin.version,
                         "fixed in": ", ".join(adv.fixed_in) or "none yet", "status": "accepted" if ok else "FAIL",
                         "what": adv.link, "ids": sorted(adv.ids)})
    for f in jar:
        status = ("accepted" if (f.id, f.package) in allowed else "FAIL") if f.affected else "fixed"
        rows.append({"id": f.id, "package": f.package, "version": f.version, "fixed in": ", ".join(f.fixed_in),
                     "status": status, "what": f.summary, "ids": [f.id]})
    return rows


def stale_entries(accepted: list[AcceptedRisk], rows: list[dict[str, Any]], statuses: list[PinStatus],
                  jar_names: set[str]) -> list[AcceptedRisk]:
    """Entries that match no finding, where the audit did look (an unchecked pin proves nothing)."""
    found = {(i, normalize(r["package"])) for r in rows if r["status"] != "fixed" for i in r["ids"]}
    looked = {s.name for s in statuses if s.source} | jar_names
    return [r for r in accepted if (r.id, normalize(r.package)) not in found and normalize(r.package) in looked]


def wrap(text: str) -> str:
    return textwrap.fill(text, 110, initial_indent="  ", subsequent_indent="    ", break_on_hyphens=False)


def python_lines(locks: list[Path], pins: dict[str, str], statuses: list[PinStatus] | None,
                 skipped: str | None) -> list[str]:
    out = [f"Python: {len(pins)} pins ({', '.join(p.name for p in locks)})"]
    if statuses is None:
        return [*out, wrap(f"SKIPPED: {skipped}. None of the {len(pins)} pins was checked.")]
    by = {k: [s for s in statuses if s.source == k] for k in ("release", "latest", None)}
    served = "" if by["release"] or not any(s.latest for s in statuses) else "; not served here: HTTP 404"
    out += [f"  checked {len(by['release']):4} by their own release's advisories (/pypi/NAME/VERSION/json{served})",
            f"  checked {len(by['latest']):4} as their project's latest release (/pypi/NAME/json lists its advisories)"]
    if by[None]:
        nvidia = [s for s in by[None] if s.name.startswith("nvidia-")]
        names = [f"{s.name}" + (f" ({s.error})" if s.error else "") for s in by[None] if s not in nvidia]
        names += [f"{len(nvidia)} nvidia-* CUDA wheels"] if nvidia else []
        out.append(wrap(f"NOT checked {len(by[None])}, older than their latest release: {', '.join(names)}"))
    return out


def jar_lines(inventory: Inventory, torchserve: str) -> list[str]:
    known = [lib for lib in inventory.libraries if lib.version]
    unknown = [lib.name for lib in inventory.libraries if not lib.version]
    absent = [name for name, has in inventory.rst_limit.items() if not has]
    out = [f"TorchServe {torchserve} frontend jar: {inventory.entries} entries ({inventory.jar.name})",
           "  bundles " + ", ".join(f"{lib.name} {lib.version}" for lib in known)]
    if unknown:
        out.append(f"  version not recorded, not checked: {', '.join(unknown)}")
    if absent:
        out.append(f"  HTTP/2 RST_STREAM limit (Rapid Reset fix, netty 4.1.100): missing from {' and '.join(absent)}")
    return out


def finding_lines(rows: list[dict[str, Any]], stale: list[AcceptedRisk], allow_list: str) -> list[str]:
    failed, accepted = (sum(r["status"] == k for r in rows) for k in ("FAIL", "accepted"))
    return [*(f"  {r['status']:8} {r['id']:15} {r['package']} {r['version']}, fixed in {r['fixed in']}: {r['what']}"
              for r in rows),
            *(f"  stale    {e.id:15} {e.package}: in {allow_list} but no longer found: delete it" for e in stale),
            "Never checked: Java libraries or advisories beyond bench/jar_inventory.py's table (no Java database",
            "  is reachable), the Docker image's Debian packages.",
            f"\nresult: {failed} without an accepted-risk entry, {accepted} accepted ({allow_list}), "
            f"{len(stale)} stale entries: exit {int(bool(failed))}"]


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bench.audit", description=__doc__.splitlines()[0])
    parser.add_argument("--accepted", type=Path, default=ACCEPTED, help="the allow-list (YAML)")
    parser.add_argument("--lock", type=Path, action="append", help="a lock file (repeatable; default: both)")
    parser.add_argument("--jar", type=Path, default=None, help="TorchServe's frontend jar (default: the installed one)")
    parser.add_argument("--pypi-url", default=PYPI, help=f"PyPI's JSON API (default {PYPI})")
    parser.add_argument("--offline", action="store_true", help="skip PyPI: the jar only")
    parser.add_argument("--no-record", action="store_true", help="print only; write no results record")
    args = parser.parse_args(argv)
    locks = args.lock or LOCKS
    try:
        accepted = load_accepted(args.accepted)
        inventory = read_inventory(args.jar or installed_jar())
    except (AuditError, JarError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    pins = read_pins(*locks)
    statuses: list[PinStatus] | None = None
    skipped = "--offline" if args.offline else None
    if not args.offline:
        try:
            statuses = check_pins(pins, args.pypi_url)
        except PyPIUnreachable as err:
            skipped = f"PyPI is unreachable ({err})"
    rows = verdicts(statuses or [], check(inventory), accepted)
    stale = stale_entries(accepted, rows, statuses or [], {lib.name for lib in inventory.libraries})
    print("make audit: locked Python packages vs PyPI's advisories; TorchServe's jar vs a table of fixes\n")
    print("\n".join([*python_lines(locks, pins, statuses, skipped), *jar_lines(inventory, version("torchserve")),
                     *finding_lines(rows, stale, args.accepted.name)]))
    if not args.no_record:
        from bench.record import write_record  # imports torch: only when recording
        path = write_record("audit", figures(pins, statuses, skipped, inventory, rows, stale))
        print(f"record: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return int(any(r["status"] == "FAIL" for r in rows))


def figures(pins: dict[str, str], statuses: list[PinStatus] | None, skipped: str | None, inventory: Inventory,
            rows: list[dict[str, Any]], stale: list[AcceptedRisk]) -> dict[str, Any]:
    counts = {k: sum(s.source == k for s in statuses or []) for k in ("release", "latest")}
    python = {"pins": len(pins), "checked (own release)": counts["release"],
              "checked (is the latest release)": counts["latest"],
              "not checked": len(pins) - sum(counts.values()), "skipped": skipped or "no"}
    return {"tables": {"python": [python],
                       "jar": [{"library": lib.name, "version": lib.version or "not recorded",
                                "read from": lib.evidence} for lib in inventory.libraries],
                       "findings": [{k: r[k] for k in ("id", "package", "version", "fixed in", "status")}
                                    for r in rows]},
            "not_checked": [f"{s.name}=={s.version}" for s in statuses or [] if not s.source],
            "rst_limit": inventory.rst_limit, "stale": [r.id for r in stale],
            "unaccepted": sum(r["status"] == "FAIL" for r in rows)}


if __name__ == "__main__":
    sys.exit(main())
