"""Results as data: every benchmark and report command writes one JSON record under results/.

A record names the machine it was measured on (CPU model, the ISA flags that change answers and speed,
any cap set with ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA, GPU), the software (commit, torch, ONNX
Runtime, TorchServe), the exact command, the load average and the date, beside the figures themselves.
File names: results/<date>-<command>-<cpu class>.json, so records from other machines sit side by side.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from training.core.precision import cpu_flags

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def isa_class(flags: list[str] | None = None) -> str:
    """The coarse class the int8/bf16 behaviour depends on: amx, avx512-vnni, avx512, avx2 or older."""
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower()
    if cap.startswith("avx2") or os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default"):
        return "avx2-capped"
    if "amx_tile" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx512f" in flags:
        return "avx512"
    return "avx2" if "avx2" in flags else "pre-avx2"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def _gpu() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # no torch, or a broken driver: the record says "no GPU"
        return None


def machine() -> dict[str, Any]:
    flags = cpu_flags()
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "isa_flags": flags, "isa_class": isa_class(flags),
        "caps": {name: os.environ[name] for name in CAP_VARIABLES if name in os.environ},
        "gpu": _gpu(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in ("torch", "onnxruntime", "torchserve", "kserve")},
    }


def _program() -> str:
    """How this process was started, as a user types it: `python -m bench.serve`, not `serve.py`."""
    script = Path(sys.argv[0]).resolve()
    if script.suffix == ".py" and script.is_relative_to(ROOT):
        return "python -m " + ".".join(script.relative_to(ROOT).with_suffix("").parts)
    return Path(sys.argv[0]).name


def record_order(path: Path) -> tuple[str, int]:
    """Sort key of a record file: by name, a day's second record (-2, -3...) after its first."""
    name, n = re.fullmatch(r"(.*?)(?:-(\d+))?", path.stem).groups()  # type: ignore[union-attr]
    return name, int(n or 1)


def write_record(command: str, figures: dict[str, Any], baseline: dict[str, Any] | None = None,
                 out_dir: Path | None = None) -> Path:
    """Write results/<date>-<command>-<cpu class>.json (a second one the same day gets -2, -3...)."""
    now = dt.datetime.now(dt.timezone.utc)
    facts = machine()
    # Paths inside the checkout are written relative to it: the command reads the same on any clone.
    args = [a.replace(f"{ROOT}/", "") for a in sys.argv[1:]]
    record = {"command": command, "argv": [_program(), *args],
              "date": now.isoformat(timespec="seconds"), "commit": _commit(), "machine": facts,
              "figures": figures, "baseline": baseline}
    folder = out_dir or RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{now:%Y-%m-%d}-{re.sub(r'[^a-z0-9]+', '-', command.lower())}-{facts['isa_class']}"
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def read_records(command: str, folder: Path | None = None) -> list[dict[str, Any]]:
    """Every record of `command`, oldest first, each with its file name under "file"."""
    slug = re.sub(r"[^a-z0-9]+", "-", command.lower())
    paths = sorted((folder or RESULTS).glob(f"*-{slug}-*.json"), key=record_order)
    return [{**json.loads(p.read_text()), "file": p.name} for p in paths]


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """The Markdown tables a benchmark printed, as rows keyed by header: its record holds the same cells."""
    tables: list[list[dict[str, str]]] = []
    header: list[str] | None = None
    for line in [*text.splitlines(), ""]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            header = None
        elif header is None:
            header = cells
            tables.append([])
        elif not all(set(c) <= set(":-") for c in cells):
            tables[-1].append(dict(zip(header, cells, strict=False)))
    return tables
