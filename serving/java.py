"""TorchServe's frontend is Java: find it and check its version before starting anything."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from serving.errors import ServerError


def java_major_version() -> int | None:
    java = shutil.which("java", path=os.path.join(os.environ["JAVA_HOME"], "bin")) if os.environ.get("JAVA_HOME") \
        else shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 else major  # "1.8" means Java 8


def check_java() -> None:
    major = java_major_version()
    if major is None or major < 11:
        found = "no java on PATH" if major is None else f"Java {major}"
        raise ServerError(f"TorchServe needs Java 11+ (17 recommended), found {found}: "
                          "install it, e.g. `sudo apt-get install openjdk-17-jre-headless`")
