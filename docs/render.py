"""Render the docs' result tables from the records in results/: `python docs/render.py` (`make docs` runs it).

A page asks for a table with a marker pair; everything between the two is replaced on every run:

    <!-- results: command=bench-serve table=served -->       the newest records of `make bench-serve`
    <!-- results: record=imported/2026-11-28-bench-serve-full-run -->   one record (path under results/)
    <!-- results: headline -->                                 README's headline table (HEADLINES below)
    <!-- /results -->

Options: `table=NAME` (one of the record's tables), `latest=N` (command=: at most N records, default 3).
Each table comes with what the record says about where it was measured: date, CPU and its ISA class,
GPU, load, versions, commit and the exact command; an imported record (an earlier README's table) is
labelled as coming from an earlier version and, where it says so, another machine.
It also draws the plots in PLOTS from their records into docs/pages/img/.
`--check` changes nothing and exits 1 when a page is not what the records render (tests/test_docs.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python docs/render.py`: bench/ is not an installed package
from bench.record import read_records  # noqa: E402  (a command's records, a day's in order: first, -2, -3...)

RESULTS = ROOT / "results"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs" / "pages").rglob("*.md"))]
MARKER = re.compile(r"(<!-- results: (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)

# README's headline results: (what, record, table, row filter, the figure's column, the ratio's column[, the
# machine, where the record holds rows of several]).
# Each row must name a figure measured against a baseline of the same run.
HEADLINES = [
    ("Test accuracy of the default config, 3 seeds (bf16 autocast on this CPU)",
     "2026-12-07-bench-train-avx512-vnni-3", "time to accuracy", {"config": "default"}, "test accuracy (%)", "s total"),
    ("Served req/s at 64 connections through TorchServe", "imported/2026-11-28-bench-serve-full-run", "served",
     {"setup": "project", "conc.": "64"}, "req/s", "vs baseline"),
    ("Wild digits: all 13 transforms, first 1000 test digits each", "imported/undated-eval-wild-wild", "transforms",
     {"transform": "**all wild**"}, "accuracy", "vs clean"),
    ("Ensemble of 5 deepest members, 10k test digits over HTTP", "imported/undated-ensemble-diary-diary", "runs",
     {"model": "that ensemble **over HTTP**",
      "test accuracy": "**99.72%** (single default model in the same run: 99.46%)"}, "test accuracy", None,
     "AMD EPYC, 2 cores (the record's CPU rows)"),
    ("CUDA training, one H100 (not the pinned torch)", "imported/2026-11-28-gpu-check-h100", "checks",
     {"check": "bench-train cuda-bf16"}, "measured", None),
]


# README's quick-start timings: (what, command whose newest record to read, or an imported record, its table,
# the row's "what").
TIMINGS = [
    ("`make setup` (every Python target runs it first), from nothing", "setup", "make setup from nothing", "wall time"),
    ("`make demo`, setup already done", "demo", "make demo", "wall time, setup already done"),
    ("`make test`, in CI", "imported/2026-11-28-test-suite", "suite", "make test in CI"),
]


def shell_line(record: dict[str, Any], argv: list[str]) -> str:
    """A record's argv as a command to paste: the program as written, each argument quoted where the shell
    needs it. An imported record's argv holds whole command lines as its source wrote them: joined as they are."""
    if record.get("imported"):
        return " ".join(argv)
    return " ".join([argv[0], *(shlex.quote(a) for a in argv[1:])])


def load(ref: str) -> dict[str, Any]:
    path = RESULTS / f"{ref}.json"
    return {**json.loads(path.read_text()), "file": path.relative_to(ROOT).as_posix()}


def native_records(command: str) -> list[dict[str, Any]]:
    """`command`'s own records (not the imported ones), newest first."""
    return [{**r, "file": f"results/{r['file']}"} for r in reversed(read_records(command, RESULTS))]


def cell(value: Any) -> str:
    text = "" if value is None else f"{value:,}" if isinstance(value, int) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def table(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(cell(c) or " " for c in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]


def versions(found: dict[str, Any]) -> str:
    names = {"torch": "torch", "torchserve": "TorchServe", "onnxruntime": "ONNX Runtime", "kserve": "KServe"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in found.items() if v)


def where(record: dict[str, Any]) -> str:
    """Date, machine, versions, commit and command, as the record states them."""
    m = record.get("machine") or {}
    stated = m.get("cpu") or "not stated"
    cpu = "CPU " + stated if stated.startswith("not stated") else stated
    parts = [cpu + (f", {m['cores']} cores" if m.get("cores") else "")]
    if m.get("isa_class"):
        caps = ", ".join(f"{k}={v}" for k, v in (m.get("caps") or {}).items())
        parts[-1] += f" ({m['isa_class']}" + (f"; capped: {caps}" if caps else "") + ")"
    if m.get("native_bf16"):
        parts.append("native bf16")
    parts.append(f"GPU: {m['gpu']}" if m.get("gpu") else "no GPU" if "isa_class" in m else "")
    load_average = m.get("load_average")
    if load_average:
        shown = "/".join(map(str, load_average)) if isinstance(load_average, list) else load_average
        parts.append(f"load average {shown}")
    if m.get("note"):
        parts.append(m["note"])
    if m.get("versions") and versions(m["versions"]):
        parts.append(versions(m["versions"]))
    date = (record.get("date") or "")[:10] or "date not stated"
    commit = f"commit {record['commit']}" if record.get("commit") else ""
    command = shell_line(record, record.get("argv") or [record["command"]])
    return (f"Measured on {'; '.join(p for p in parts if p)}; {date}"
            + (f"; {commit}" if commit else "") + f". Command: `{command.replace('`', '')}`.")


def render_record(record: dict[str, Any], only: str | None) -> list[str]:
    out = [f"*{where(record)}*", ""]
    if record.get("imported"):
        out += [f"*From an earlier version of this project ({record['source']}): other code, and possibly "
                "another machine, than today's. Compare figures within this table, not with other tables.*", ""]
    figures = record.get("figures") or {}
    tables = figures.get("tables") or {}
    if only is not None and only not in tables:
        raise SystemExit(f"{record['file']} has no table {only!r} (it has {sorted(tables)})")
    for name, rows in tables.items():
        if only is None or name == only:
            out += [*table(rows), ""]
    if "report" in figures and only is None:  # make chaos prints its own Markdown
        out += [figures["report"].strip(), ""]
    if record.get("note"):
        out += [f"Note: {record['note']}.", ""]
    if record.get("baseline"):
        shown = {k: format(v, ".4g") if isinstance(v, float) else v for k, v in record["baseline"].items()}
        base = "; ".join(f"{k}: {v}" for k, v in shown.items() if not isinstance(v, (dict, list)))
        if base:
            out += [f"Baseline, same run: {base}.", ""]
    return [*out, f"Record: `{record['file']}`", ""]


def render_headline() -> list[str]:
    out = ["| result | figure | vs the same run's baseline | machine, date | command and record |",
           "|---|---|---|---|---|"]
    imported = []  # row numbers
    for number, (what, ref, name, match, figure, ratio, *where_measured) in enumerate(HEADLINES, 1):
        record = load(ref)
        if record.get("imported"):
            imported.append(number)
        rows = [r for r in record["figures"]["tables"][name] if all(r.get(k) == v for k, v in match.items())]
        if len(rows) != 1:
            raise SystemExit(f"headline {what!r}: {len(rows)} rows of {ref} match {match}")
        row, m = rows[0], record["machine"]
        machine = where_measured[0] if where_measured else ", ".join(str(m[k]) for k in ("cpu", "gpu") if m.get(k))
        command = row.get("where, command") or "`" + shell_line(record, record["argv"]) + "`"
        versus = (f"{ratio}: {row[ratio]}" if ratio else
                  "; ".join(str(v) for v in (record.get("baseline") or {}).values()))
        out.append("| " + " | ".join(cell(x) for x in (
            what, row[figure], versus, f"{machine}; {(record['date'] or '')[:10] or 'date not stated'}",
            f"{command}; `{record['file']}`")) + " |")
    which = "All rows come" if len(imported) == len(HEADLINES) else f"Rows {', '.join(map(str, imported))} come"
    note = (f"*{which} from an earlier version of this project (imported from its README; the GPU row ran torch "
            "2.11): [Benchmarks](docs/pages/benchmarks.md) has every table and how to measure yours.*"
            if imported else "*[Benchmarks](docs/pages/benchmarks.md) has every table and how to measure yours.*")
    return [*out, "", note, ""]


def render_timings() -> list[str]:
    out = ["| command | took | measured on, date | record |", "|---|---|---|---|"]
    for what, ref, name, row_name in TIMINGS:
        records = native_records(ref) if "/" not in ref else [load(ref)]
        if not records:
            out.append(f"| {what} | not measured by this version yet | | |")
            continue
        record = records[0]
        row = next(r for r in record["figures"]["tables"][name] if r.get("what", r.get("run")) == row_name)
        m = record.get("machine") or {}
        load_average = m.get("load_average")
        shown = "/".join(map(str, load_average)) if isinstance(load_average, list) else load_average
        machine = ", ".join(str(x) for x in (m.get("cpu") or "CPU not stated",
                                               f"{m['cores']} cores" if m.get("cores") else None,
                                               f"load average {shown}" if shown else None) if x)
        took = row.get("figure", row.get("seconds", "")) + (" s" if "seconds" in row else "")
        out.append("| " + " | ".join(cell(x) for x in (
            what, took, f"{machine}; {(record.get('date') or '')[:10] or 'date not stated'}",
            f"`{record['file']}`" + (" (imported)" if record.get("imported") else ""))) + " |")
    return [*out, ""]


def render_output(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return ["*Not run by this version yet: `make demo` writes its record under `results/`.*", ""]
    record = records[0]
    return ["```json", record["figures"]["output"], "```", "", f"*{where(record)}*", ""]


def render(spec: str) -> str:
    options = dict(item.split("=", 1) if "=" in item else (item, "") for item in spec.split())
    if "headline" in options:
        lines = render_headline()
    elif "timings" in options:
        lines = render_timings()
    elif options.get("show") == "output":
        lines = render_output(native_records(options["command"]))
    elif "record" in options:
        lines = render_record(load(options["record"]), options.get("table"))
    elif "command" in options:
        records = native_records(options["command"])[: int(options.get("latest", 3))]
        lines = [line for r in records for line in render_record(r, options.get("table"))] or [
            f"*No record of `{options['command']}` measured by this version yet: running it writes one under "
            "`results/`, and `make docs` puts it here.*", ""]
    else:
        raise SystemExit(f"results marker without record=, command= or headline: {spec!r}")
    return "\n" + "\n".join(lines)


def rendered(text: str) -> str:
    return MARKER.sub(lambda m: m.group(1) + render(m.group("spec")) + m.group(4), text)


def number(text: str) -> float:
    return float(re.sub(r"[^0-9.eE+-]", "", text.split()[0]))


def plot_served(ax: Any, record: dict[str, Any]) -> None:
    rows = record["figures"]["tables"]["served"]
    for setup in dict.fromkeys(r["setup"] for r in rows):
        points = [(int(r["conc."]), number(r["req/s"])) for r in rows if r["setup"] == setup]
        ax.plot(*zip(*points, strict=True), marker="o", label=setup)
    ax.set(xscale="log", yscale="log", xlabel="concurrent connections (wrk)", ylabel="requests/s",
           title="Served throughput, one run")
    ax.set_xticks([1, 8, 64, 256], labels=["1", "8", "64", "256"])


def plot_deletion(ax: Any, record: dict[str, Any]) -> None:
    rows = record["figures"]["tables"]["deletion"]
    ks = [int(k.removeprefix("k=")) for k in rows[0] if k.removeprefix("k=").isdigit()]
    for row in rows:
        ax.plot(ks, [number(row[k if k in row else f"k={k}"]) for k in map(str, ks)], marker="o",
                label=row["ranking"].replace("**", ""))
    ax.set(xlabel="pixels set to black (top-k of each ranking)", ylabel="mean probability of the true digit",
           title="Deletion test: a faithful map drops fastest")


def plot_hybrid(ax: Any, record: dict[str, Any]) -> None:
    rows = [r for r in record["figures"]["tables"]["hybrid"] if not r["threshold"].startswith("(")]
    for name in dict.fromkeys(r["set"] for r in rows):
        points = [(number(r["answered on the edge"]), number(r["edge accuracy (its share)"])) for r in rows
                  if r["set"] == name]
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set(xlabel="% answered on the edge (threshold lowered →)", ylabel="% right among those answered on the edge",
           title="Edge first, server when unsure")


def plot_feedback(ax: Any, record: dict[str, Any]) -> None:
    runs, base = record["figures"]["runs"], record["baseline"]
    sizes = sorted({r["corrections"] for r in runs})
    for key, name, before in (("eval", "user-style digits (evaluation part)", base["eval_accuracy"]),
                              ("mnist", "MNIST test", base["mnist_test_accuracy"])):
        after = [[100 * r[key] for r in runs if r["corrections"] == n] for n in sizes]
        line = ax.errorbar(sizes, [sum(a) / len(a) for a in after],
                           yerr=[(max(a) - min(a)) / 2 for a in after], marker="o", capsize=3, label=f"{name}, after")
        ax.axhline(100 * before, linestyle="--", color=line[0].get_color(), label=f"{name}, before")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.legend(fontsize=8)
    ax.set(xlabel="corrections fine-tuned on", ylabel="accuracy (%)", title="Fine-tuning on a user's hand")


# Plots drawn from records (docs/pages/img/, committed): the page that shows each, and what draws it.
PLOTS = {"served-throughput.png": ("imported/2026-11-28-bench-serve-full-run", plot_served),
         "deletion-curves.png": ("imported/undated-explain-eval-deletion", plot_deletion),
         "hybrid-edge.png": ("imported/undated-bench-hybrid-hybrid", plot_hybrid),
         "feedback-finetune.png": ("2026-12-07-bench-feedback-avx512-vnni", plot_feedback)}


def draw_plots() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, (ref, draw) in PLOTS.items():
        record = load(ref)
        fig, ax = plt.subplots(figsize=(6.4, 4))
        draw(ax, record)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        m = record.get("machine") or {}
        source = (f"{record['file']}: {m.get('cpu') or 'CPU not stated'}, {(record.get('date') or 'undated')[:10]}"
                  + (" (imported: an earlier version)" if record.get("imported") else ""))
        fig.text(0.01, 0.01, source, fontsize=6, color="gray")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        fig.savefig(ROOT / "docs" / "pages" / "img" / name, dpi=110, metadata={"Software": None})
        plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python docs/render.py", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page is out of date")
    args = parser.parse_args(argv)
    stale = []
    for page in PAGES:
        text = page.read_text()
        new = rendered(text)
        if new != text:
            stale.append(page.relative_to(ROOT).as_posix())
            if not args.check:
                page.write_text(new)
    if not args.check:
        draw_plots()
    if args.check and stale:
        print(f"out of date with results/: {', '.join(stale)} (run `make docs`)", file=sys.stderr)
        return 1
    print(f"rendered {sum(MARKER.findall(p.read_text()).__len__() for p in PAGES)} result tables"
          + (f"; updated {', '.join(stale)}" if stale and not args.check else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
