"""What TorchServe's frontend jar bundles, read from the jar, and which known fixes its versions lack.

TorchServe 0.12's `ts/frontend/model-server.jar` is one fat jar (25k entries) without Maven's
`pom.properties`, so each version comes from what the jar does record: netty's
`META-INF/io.netty.versions.properties`, the version constant compiled into grpc-java's `GrpcUtil`,
log4j's `META-INF/DEPENDENCIES`, Groovy's release file. Libraries that record none are listed as
present, version unknown. No Java vulnerability database is reachable from these machines: the
fixes compared against are the small table KNOWN_FIXES below, not a feed.
"""

from __future__ import annotations

import importlib.util
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# (library, CVE, versions that fix it (one per maintained line), what it is: where TorchServe meets it).
# Only issues reachable over a TorchServe port are listed. Left out on purpose, though present in the
# jar: local temp-file disclosure (CVE-2021-21290, CVE-2022-24823), Windows-only (CVE-2024-47535),
# codecs TorchServe never puts in its pipeline (Bzip2/Snappy CVE-2021-37136/37137, HAProxy
# CVE-2022-41881) and TLS-only ones (SniHandler CVE-2023-34462; these ports run without TLS).
# Log4Shell and its follow-ups stay in to show that they are fixed. Written in 2026-12 from the netty,
# grpc-java and log4j advisories: an advisory published later is not in it until someone adds it.
KNOWN_FIXES: list[tuple[str, str, tuple[str, ...], str]] = [
    ("netty", "CVE-2021-43797", ("4.1.71.Final",), "control characters in header names: smuggling via a proxy"),
    ("netty", "CVE-2024-29025", ("4.1.108.Final",), "multipart decoder keeps fields without bound"),
    ("netty", "CVE-2026-33870", ("4.1.132.Final",), "chunk-extension quoting: smuggling via a proxy"),
    ("netty", "CVE-2023-44487", ("4.1.100.Final",), "HTTP/2 Rapid Reset (gRPC ports)"),
    ("netty", "CVE-2025-55163", ("4.1.124.Final",), "HTTP/2 MadeYouReset (gRPC ports)"),
    ("netty", "CVE-2026-33871", ("4.1.132.Final",), "HTTP/2 CONTINUATION flood (gRPC ports)"),
    ("grpc-java", "CVE-2023-44487", ("1.56.3", "1.57.3", "1.58.1"), "HTTP/2 Rapid Reset (gRPC ports)"),
    ("grpc-java", "CVE-2025-55163", ("1.75.0",), "HTTP/2 MadeYouReset (gRPC ports)"),
    ("log4j-core", "CVE-2021-44228", ("2.15.0",), "Log4Shell: JNDI lookups in logged text"),
    ("log4j-core", "CVE-2021-45046", ("2.16.0",), "Log4Shell: the first fix incomplete"),
    ("log4j-core", "CVE-2021-45105", ("2.17.0",), "recursive lookups: denial of service"),
    ("log4j-core", "CVE-2021-44832", ("2.17.1",), "JDBC appender in an attacker-written config"),
]
# Present in the jar without a recorded version: (name, path prefix of its classes).
UNVERSIONED = [("gson", "com/google/gson/"), ("guava", "com/google/common/"), ("protobuf-java", "com/google/protobuf/"),
               ("snakeyaml", "org/yaml/snakeyaml/"), ("commons-compress", "org/apache/commons/compress/"),
               ("commons-io", "org/apache/commons/io/"), ("jackson", "com/fasterxml/jackson/")]
# netty 4.1.100 added this decoder to limit RST_STREAM frames (the Rapid Reset fix): its absence is direct
# evidence for the copy of netty grpc-java shades, whose version the jar does not record.
RST_LIMIT = "io/netty/handler/codec/http2/Http2MaxRstFrameDecoder.class"
SHADED = "io/grpc/netty/shaded/"


class JarError(Exception):
    """The jar is missing or unreadable."""


@dataclass(frozen=True)
class Library:
    name: str
    version: str | None  # None: present, version not recorded in the jar
    evidence: str        # where in the jar the version was read


@dataclass(frozen=True)
class JarFinding:
    id: str
    package: str
    version: str
    fixed_in: tuple[str, ...]
    summary: str
    affected: bool


@dataclass(frozen=True)
class Inventory:
    jar: Path
    entries: int
    libraries: list[Library]
    rst_limit: dict[str, bool]  # netty copy → has the Rapid Reset decoder


def installed_jar() -> Path:
    """The frontend jar of the installed TorchServe (found without importing `ts`)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise JarError("TorchServe (the `ts` package) is not installed: `make setup` installs it")
    return Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version))


def is_fixed(version: str, fixed_in: tuple[str, ...]) -> bool:
    """At or past the newest fix, or past the fix of its own major.minor line (a backport)."""
    v = version_key(version)
    if v >= max(version_key(f) for f in fixed_in):
        return True
    return any(v[:2] == version_key(f)[:2] and v >= version_key(f) for f in fixed_in)


def class_version_constant(data: bytes) -> str | None:
    """The first CONSTANT_Utf8 of a class file that is a bare version (grpc's GrpcUtil.IMPLEMENTATION_VERSION).

    A Utf8 constant is tag 1, a two-byte length, then the bytes: the length check keeps the match exact.
    """
    for match in re.finditer(rb"\x01\x00(.)(\d+\.\d+\.\d+(?:-SNAPSHOT)?)", data, re.S):
        if match.group(1)[0] == len(match.group(2)):
            return match.group(2).decode()
    return None


def read_inventory(jar: Path) -> Inventory:
    if not jar.is_file():
        raise JarError(f"{jar} does not exist: `make setup` installs TorchServe")
    try:
        with zipfile.ZipFile(jar) as zf:
            names = set(zf.namelist())

            def text(name: str) -> str:
                return zf.read(name).decode(errors="replace") if name in names else ""

            libraries = _versioned(names, text, zf)
    except zipfile.BadZipFile as err:
        raise JarError(f"{jar} is not a readable jar: {err}") from err
    libraries += [Library(name, None, prefix) for name, prefix in UNVERSIONED
                  if any(n.startswith(prefix) for n in names)]
    return Inventory(jar, len(names), libraries,
                     {"netty": RST_LIMIT in names, "grpc's shaded netty": SHADED + RST_LIMIT in names})


def _versioned(names: set[str], text: Callable[[str], str], zf: zipfile.ZipFile) -> list[Library]:
    found: list[Library] = []
    netty_file = "META-INF/io.netty.versions.properties"
    # A fat jar merges every netty module's file into one. Checked against the oldest version it names.
    netty = sorted(set(re.findall(r"^netty-(?!tcnative)[\w-]+\.version=(\S+)", text(netty_file), re.M)),
                   key=version_key)
    if netty:
        also = f" (also {', '.join(netty[1:])})" if len(netty) > 1 else ""
        found.append(Library("netty", netty[0], netty_file + also))
    grpc_class = "io/grpc/internal/GrpcUtil.class"
    if grpc_class in names:
        found.append(Library("grpc-java", class_version_constant(zf.read(grpc_class)), grpc_class))
    # log4j-slf4j-impl's DEPENDENCIES names the log4j-core it was built with, which must be its own version.
    if log4j := re.search(r"org\.apache\.logging\.log4j:log4j-core:jar:(\S+)", text("META-INF/DEPENDENCIES")):
        found.append(Library("log4j-core", log4j.group(1), "META-INF/DEPENDENCIES"))
    groovy_file = "META-INF/groovy-release-info.properties"
    if groovy := re.search(r"^ImplementationVersion=(\S+)", text(groovy_file), re.M):
        found.append(Library("groovy", groovy.group(1), groovy_file))
    for pom in sorted(n for n in names if re.fullmatch(r"META-INF/maven/[^/]+/[^/]+/pom\.properties", n)):
        props = dict(re.findall(r"^(\w+)=(\S+)", text(pom), re.M))
        if "artifactId" in props and "version" in props:
            found.append(Library(props["artifactId"], props["version"], pom))
    return found


def check(inventory: Inventory) -> list[JarFinding]:
    """Every KNOWN_FIXES row whose library the jar bundles with a known version: affected or not."""
    versions = {lib.name: lib.version for lib in inventory.libraries if lib.version}
    return [JarFinding(cve, name, versions[name], fixed_in, summary, not is_fixed(versions[name], fixed_in))
            for name, cve, fixed_in, summary in KNOWN_FIXES if name in versions]
