"""The README and the docs name only what exists, and what the code offers is documented somewhere.

Forward: every `make TARGET`, `make VAR=`, file path, environment variable, `python -m MODULE` and CLI
flag that README.md or docs/pages/ mention must exist (a Makefile target or variable, a file, a variable
the code or a script reads, a module, a flag its parser declares). Backward: every make target and every
environment variable the code reads must be mentioned. Also: the README stays short, the result tables
are what the records in results/ render, and no sentence speaks of how the work was organised.
Static (no imports of the project, no server): it runs in a second.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs" / "pages").rglob("*.md"))]
CODE_DIRS = ("training", "serving", "bench", "edge", "deploy", "docs")

# Flags of tools that are not this project's: their own docs cover them.
EXTERNAL_COMMANDS = ("curl", "docker ", "kubectl", "pip ", "pytest", ".venv/bin/python -m pytest", "buildah",
                     "sha256sum", "lscpu", "torchserve", "install -d", "time ", "/usr/bin/time", "apt-get", "sudo",
                     "du ", "PIP_NO_CACHE_DIR")
TORCHRUN_FLAGS = {"--nnodes", "--node-rank", "--nproc-per-node", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
                  "--rdzv-conf", "--local-addr", "--standalone", "--max-restarts"}
# Read by the tools the project drives (torchrun, KServe, Kubeflow, pip, MkDocs), not by its own code.
EXTERNAL_ENV = {"GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "TS_SERVICE_ENVELOPE", "PIP_NO_CACHE_DIR",
                "PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "NO_MKDOCS_2_WARNING"}
# Read under a computed name (`os.environ.get(kind.upper() + "_ADDRESS")`): the name, and the file and the
# lower-case key that show it is still read there.
COMPUTED_ENV = {"GRPC_INFERENCE_PORT": ("serving/ports.py", "grpc_inference_port"),
                "GRPC_MANAGEMENT_PORT": ("serving/ports.py", "grpc_management_port"),
                "INFERENCE_ADDRESS": ("serving/ports.py", "_ADDRESS"),
                "MANAGEMENT_ADDRESS": ("serving/ports.py", "_ADDRESS"),
                "METRICS_ADDRESS": ("serving/ports.py", "_ADDRESS")}
SHELL_ENV = {"HOME", "PWD", "PATH", "BASH_SOURCE", "SECONDS", "TMPDIR"}
# Paths the docs mention that commands create (outputs), not files of the repository.
OUTPUT_DIRS = ("artifacts/", "logs/", "model_store/", "data/", "docs/_site", "/", "~", "$", "<", ".venv/")


def text_of(path: Path) -> str:
    return path.read_text()


def code_texts(text: str) -> list[str]:
    """Fenced blocks (line by line) and inline code spans: where commands, paths and names are written."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
    rest = re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.S | re.M)
    # A comment after a command is prose: "# serve ... adds --gpus all" is not a flag of the command.
    lines = [re.split(r"\s#\s", line)[0] for block in blocks for line in block.splitlines()]
    # A fenced line continued with "\" is one command.
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()
    return joined + re.findall(r"`([^`\n]+)`", rest)


ALL_CODE = {path: code_texts(text_of(path)) for path in DOCS}
ALL_TEXT = "\n".join(text_of(path) for path in DOCS)


def makefile() -> str:
    return (ROOT / "Makefile").read_text()


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", makefile(), re.M))


def documented_targets() -> set[str]:
    """The targets `make help` lists."""
    return set(re.findall(r"^([a-z][a-z0-9-]*):.*## ", makefile(), re.M))


def make_variables() -> set[str]:
    return set(re.findall(r"^(?:export\s+)?([A-Z][A-Z0-9_]*)\s*[?:]?=", makefile(), re.M))


def env_reads(paths: list[Path]) -> set[str]:
    """Environment variables read by Python (os.environ / os.getenv, literal or module constant) and shell."""
    return _env_reads(tuple(paths))


@functools.cache
def _env_reads(paths: tuple[Path, ...]) -> set[str]:
    found = {name for name, (file, key) in COMPUTED_ENV.items()
             if ROOT / file in paths and key in (ROOT / file).read_text()}
    for path in paths:
        text = path.read_text(errors="replace")
        if path.suffix == ".py":
            constants = dict(re.findall(r'^([A-Z_]+)\s*=\s*"([A-Z][A-Z0-9_]+)"', text, re.M))
            calls = r'(?:environ\.get|getenv|environ\.pop|environ\.setdefault)\(\s*("?[A-Za-z_]+"?)'
            for arg in re.findall(calls, text) + \
                    re.findall(r'environ\[("?[A-Za-z_]+"?)\]', text) + re.findall(r'("[A-Z_]+") in os\.environ', text):
                name = arg.strip('"') if arg.startswith('"') else constants.get(arg)
                if name and re.fullmatch(r"[A-Z][A-Z0-9_]+", name):
                    found.add(name)
        else:
            found |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)[:-]", text))
    return found - SHELL_ENV


def code_files(*dirs: str, suffixes: tuple[str, ...] = (".py",)) -> list[Path]:
    return [p for d in dirs for p in (ROOT / d).rglob("*") if p.suffix in suffixes and p.is_file()]


def module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] == "mnist_edge":
        parts = ["edge", *parts]
    for candidate in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__main__.py")):
        if candidate.is_file():
            return candidate
    return None


def config_flags() -> set[str]:
    """The trainer's flags come from its config dataclasses: --field, --model.field (training/config.py)."""
    classes = {}
    for path in code_files("training"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in ("TrainConfig", "ModelConfig"):
                classes[node.name] = [s.target.id for s in node.body
                                      if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
    flags = {"--" + f.replace("_", "-") for f in classes.get("TrainConfig", []) if f != "model"}
    return flags | {"--model." + f.replace("_", "-") for f in classes.get("ModelConfig", [])}


@functools.cache
def module_flags(module: str) -> set[str]:
    path = module_file(module)
    assert path is not None, f"the docs run `python -m {module}`, which does not exist"
    text = path.read_text()
    flags = {"--help", "-h"} | set(re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9.-]*)\"", text))
    flags |= set(re.findall(r"add_argument\(\s*\"-[a-z]\",\s*\"(--[a-z][a-z0-9.-]*)\"", text))
    return flags | (config_flags() if "add_flags(" in text or module == "training.train" else set())


def target_module(target: str) -> str | None:
    """The module a make target runs (`$(PY) -m MODULE` in its recipe), for flags passed through ARGS."""
    match = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n)+)", makefile(), re.M)
    modules = re.findall(r"-m ([a-z_][a-z0-9_.]*)", match.group(1)) if match else []
    return modules[0] if modules else None


ALL_FLAGS = set().union(*(module_flags(".".join(p.relative_to(ROOT).with_suffix("").parts))
                          for p in code_files("training", "serving", "bench") if "add_argument" in p.read_text()),
                        module_flags("mnist_edge.cli"), TORCHRUN_FLAGS,
                        *(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", p.read_text()) for p in code_files(
                            "docker", suffixes=(".sh",))))  # the scripts' own flags and the docker flags they pass


def test_the_readme_is_a_front_door_not_an_archive():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines"
    first = "\n".join(lines[:150])
    assert "curl" in first and "/predictions/mnist" in first, "the first 150 lines must reach a curl answer"
    assert "configs/train.yaml" in first and 'ARGS="--' in first, "...and say how to change a hyperparameter"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_make_target_and_variable_mentioned_exists(path):
    targets, variables = make_targets(), make_variables()
    for code in ALL_CODE[path]:
        for command in re.findall(r"(?:^|[;&|(]\s*|\$\()\s*(?:[A-Z_]+=\S+\s+)*make\s+([^;&|)#]*)", code):
            words = command.split()
            names = [w for w in words if re.fullmatch(r"[a-z][a-z0-9-]*", w)]
            assert not names or names[0] in targets or names[0] in {"the"}, f"{path.name}: `make {command}`"
            for var in re.findall(r"\b([A-Z][A-Z0-9_]*)=", command):
                assert var in variables or var in env_reads(code_files(*CODE_DIRS)), \
                    f"{path.name}: `make ... {var}=` is not a Makefile variable (in `{code}`)"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_file_path_mentioned_exists(path):
    pattern = r"(?<![\w./-])((?:\.ci|training|serving|bench|configs|tests|docker|deploy|edge|docs|results)/[\w./-]*)"
    for code in ALL_CODE[path]:
        for found in re.findall(pattern, code):
            relative = found.split("::")[0].rstrip(".,:")
            if any(c in relative for c in "*{<…") or relative.endswith(".explain.png"):
                continue
            assert (ROOT / relative).exists(), f"{path.name} mentions {relative}, which does not exist"
    for link in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text_of(path)):
        if not re.match(r"[a-z]+://", link):
            assert (path.parent / link).exists(), f"{path.name} links to {link}, which does not exist"


def heading_slugs(path: Path) -> set[str]:
    """The anchors Python-Markdown's toc gives a page's headings."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M), re.M)
    return {re.sub(r"[^\w\s-]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_readme_links_point_at_existing_headings():
    """MkDocs checks the pages' anchors (`--strict`); this checks the README's, into itself and the pages."""
    readme = ROOT / "README.md"
    for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", readme.read_text()):
        page = readme.parent / target if target else readme
        assert anchor in heading_slugs(page), f"README links to {target}#{anchor}, which is no heading there"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_environment_variable_mentioned_is_read_somewhere(path):
    known = (env_reads(code_files(*CODE_DIRS, "tests") + code_files("docker", suffixes=(".sh", ".yaml")))
             | make_variables() | EXTERNAL_ENV)
    for code in ALL_CODE[path]:
        names = set(re.findall(r"\$\{?([A-Z][A-Z0-9]*_[A-Z0-9_]+)", code))
        names |= set(re.findall(r"(?:^|\s)([A-Z][A-Z0-9]*_[A-Z0-9_]+)=", code))
        names |= {code} if re.fullmatch(r"[A-Z][A-Z0-9]*_[A-Z0-9_]+", code) else set()
        for name in names:
            assert name in known, f"{path.name} mentions ${name}, which nothing reads"


FLAG = r"(?<![\w-])(--[a-z][a-z0-9.-]*)"


def unquoted_flags(text: str) -> tuple[set[str], set[str]]:
    """Flags outside quotes (the command's own) and inside them (passed on to another command)."""
    quoted = re.findall(r"\"[^\"]*\"|'[^']*'", text)
    return set(re.findall(FLAG, re.sub(r"\"[^\"]*\"|'[^']*'", "", text))), set(re.findall(FLAG, " ".join(quoted)))


def check_command(name: str, segment: str) -> None:
    """One command of a code line: its flags must be its program's."""
    if re.sub(r"^\s*(?:[A-Z_]+=(?:\$\([^)]*\)|\S+)\s+)*", "", segment).startswith(EXTERNAL_COMMANDS):
        return
    if "torchrun" in segment and "-m training.train" in segment:
        own, passed = unquoted_flags(segment.split("-m training.train", 1)[1])
        missing = (own - module_flags("training.train")) | (passed - ALL_FLAGS)
        assert not missing, f"{name}: training.train has no {sorted(missing)}"
        return
    if module := re.search(r"python -m ([a-z_][a-z0-9_.]*)", segment):
        if module.group(1).split(".")[0] not in ("training", "serving", "bench", "mnist_edge"):
            return
        own, passed = unquoted_flags(segment.split(module.group(0), 1)[1])
        missing = (own - module_flags(module.group(1))) | (passed - ALL_FLAGS)
        assert not missing, f"{name}: `python -m {module.group(1)}` has no {sorted(missing)} (in `{segment}`)"
        return
    if make := re.search(r"\bmake\s+(?:-\w+\s+)*([a-z][a-z0-9-]*)\b.*?ARGS=(\"[^\"]*\"|'[^']*'|\S+)", segment):
        module = target_module(make.group(1))
        offered = module_flags(module) if module else ALL_FLAGS
        missing = set(re.findall(FLAG, make.group(2))) - offered - (ALL_FLAGS if module != "training.train" else set())
        assert not missing, f"{name}: `make {make.group(1)}` runs {module}, which has no {sorted(missing)}"
        return
    flags = set(re.findall(FLAG, segment))
    if segment.lstrip().startswith(("docker/", "DRY_RUN=1 docker/")):
        script = ROOT / next(w for w in segment.split() if w.startswith("docker/"))
        missing = {f for f in flags if f not in script.read_text()}
        assert not missing, f"{name}: {script.name} has no {sorted(missing)}"
    elif segment.lstrip().startswith("mnist-edge"):
        missing = flags - module_flags("mnist_edge.cli")
        assert not missing, f"{name}: mnist-edge has no {sorted(missing)}"
    elif not segment.lstrip().startswith("make"):
        missing = flags - ALL_FLAGS
        assert not missing, f"{name}: no command of this project has {sorted(missing)} (in `{segment}`)"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_module_and_flag_mentioned_exists(path):
    for code in ALL_CODE[path]:
        for segment in re.split(r"&&|;|\|(?!\|)|\s(?=make\s)|\s(?=python -m\s)", code):
            check_command(path.name, segment)


def test_every_make_target_is_documented():
    mentioned = set(re.findall(r"\bmake\s+(?:-s\s+)?([a-z][a-z0-9-]*)", ALL_TEXT))
    table = set(re.findall(r"`([a-z][a-z0-9-]*)`", (ROOT / "README.md").read_text()))
    missing = documented_targets() - mentioned - table
    assert not missing, f"make targets documented nowhere: {sorted(missing)}"


def test_every_environment_variable_the_code_reads_is_documented():
    read = env_reads(code_files("training", "serving", "bench", "edge") + code_files("docker", suffixes=(".sh",)))
    missing = {name for name in read if not re.search(rf"\b{name}\b", ALL_TEXT)}
    assert not missing, f"environment variables read by the code but documented nowhere: {sorted(missing)}"


def test_the_result_tables_are_what_the_records_render():
    result = subprocess.run([sys.executable, str(ROOT / "docs" / "render.py"), "--check"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_no_sentence_speaks_of_how_the_work_was_organised():
    for path in DOCS:
        for word in re.findall(r"\b(issues?\s*\d*|the mission|mission's|this session|asked for|the issue asks)\b",
                               text_of(path), re.I):
            pytest.fail(f"{path.relative_to(ROOT)} says {word!r}: say what the project does instead")


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "docs" / "mkdocs.yml").read_text()
    pages = ROOT / "docs" / "pages"
    for page in pages.rglob("*.md"):
        assert page.relative_to(pages).as_posix() in nav, f"{page.relative_to(ROOT)} is not in docs/mkdocs.yml's nav"


def test_the_site_builds_strict(tmp_path):
    """What `make lint` runs: a broken link or anchor, or a page missing from the nav, fails the build."""
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run([str(mkdocs), "build", "--strict", "-f", str(ROOT / "docs" / "mkdocs.yml"),
                             "--site-dir", str(tmp_path / "site")], capture_output=True, text=True,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_record_command_renders_as_a_line_to_paste():
    sys.path.insert(0, str(ROOT / "docs"))
    from render import shell_line

    native = ["python -m bench.train", "--config", "fp32-only=--amp false", "--seeds", "3"]
    assert shell_line({}, native) == "python -m bench.train --config 'fp32-only=--amp false' --seeds 3"
    imported = ["make train ARGS=\"--epochs 3\"", "python -m bench.plain"]  # whole lines, as the source wrote them
    assert shell_line({"imported": True}, imported) == "make train ARGS=\"--epochs 3\" python -m bench.plain"
