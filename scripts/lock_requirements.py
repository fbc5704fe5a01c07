"""Lock requirements.in and requirements-test.in into requirements.txt and requirements-test.txt: the exact version of
every package but torch, for Python 3.11 on Linux x86_64, compiled by uv.

    pip install uv && python scripts/lock_requirements.py            # add what the .in files gained, keep the rest
    python scripts/lock_requirements.py --upgrade                    # today's newest versions within the .in ranges

torch's build depends on the machine (CPU or a CUDA version), so it is installed by its own command and the locks hold
no torch, nor the `nvidia-*` and `triton` packages of its CUDA builds. They are resolved against torch's CPU wheel
(`--torch_version`, looked up in `--torch_find_links`, a folder or a page of wheels), so the resolver never picks the
newest CUDA build from PyPI. The test lock is constrained by the runtime lock: the packages both hold have one version.

A refreshed lock is a change like any other: CI installs it into a new environment and runs the tests before it lands.
"""

import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import UserError, cli

ROOT = Path(__file__).resolve().parent.parent
# (input, lock): the runtime lock first, since the test lock is constrained by it
LOCKS = (("requirements.in", "requirements.txt"), ("requirements-test.in", "requirements-test.txt"))
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-unknown-linux-gnu"
# packages that come with torch and belong to its build, never to a lock
TORCH_BUILD_PACKAGES = ("torch", "triton")
TORCH_BUILD_PREFIXES = ("nvidia-",)


def main(torch_version: str = "2.13.0", torch_find_links: str = "/opt/wheels", upgrade: bool = False) -> None:
    """Compile the locks.

    Args:
        torch_version: the torch the locks are resolved against (installed by its own command, never locked)
        torch_find_links: a folder or page holding that torch's CPU wheel (on this project's CPU machines it lies in
            /opt/wheels; elsewhere `pip download torch==2.13.0 --no-deps -d DIR --index-url
            https://download.pytorch.org/whl/cpu` fills DIR)
        upgrade: take the newest versions the .in files allow, instead of keeping the locked ones
    """
    if not re.fullmatch(r"\d+(\.\d+)+", torch_version):
        raise UserError(f"--torch_version {torch_version!r}: expected a release such as 2.13.0")
    if "://" not in torch_find_links and not Path(torch_find_links).is_dir():
        raise FileNotFoundError(f"--torch_find_links {torch_find_links}: no such folder (give a folder or the address "
                                f"of a page holding torch=={torch_version}'s CPU wheel)")
    if importlib.util.find_spec("uv") is None:
        raise UserError("scripts/lock_requirements.py compiles the locks with uv: pip install uv")
    with tempfile.TemporaryDirectory() as tmp:
        torch_constraint = Path(tmp) / "torch.txt"
        torch_constraint.write_text(f"torch=={torch_version}\n")
        for source, lock in LOCKS:
            command = [
                sys.executable, "-m", "uv", "pip", "compile", source, "--output-file", lock,
                "--constraint", str(torch_constraint), "--find-links", torch_find_links,
                "--python-version", PYTHON_VERSION, "--python-platform", PLATFORM,
                "--no-emit-package", "torch", "--custom-compile-command", "python scripts/lock_requirements.py",
                "--quiet",
            ]
            if upgrade:
                command.append("--upgrade")
            if subprocess.run(command, cwd=ROOT).returncode != 0:
                raise UserError(f"uv could not lock {source} (its message is above); with --torch_find_links "
                                f"{torch_find_links}, is torch=={torch_version}'s CPU wheel there?")
            text = (ROOT / lock).read_text()
            emitted = torch_build_lines(text)
            if emitted:
                raise UserError(f"{lock} pins packages of a torch build: {', '.join(emitted)}. Was torch "
                                f"{torch_version}'s CPU wheel in --torch_find_links {torch_find_links}?")
            (ROOT / lock).write_text(lock_header(torch_version) + text)
            print(f"wrote {lock} (Python {PYTHON_VERSION}, {PLATFORM}, resolved with torch=={torch_version})")


def lock_header(torch_version: str) -> str:
    return (f"# Locked for Python {PYTHON_VERSION} on {PLATFORM}. No torch: install it by its own command "
            f"(torch=={torch_version} on the\n# CPU machines, the build for your CUDA on a GPU machine).\n")


def torch_build_lines(lock_text: str) -> list:
    """The packages of a lock that are torch or part of its CUDA builds."""
    return [name for name in locked_versions(lock_text)
            if name in TORCH_BUILD_PACKAGES or name.startswith(TORCH_BUILD_PREFIXES)]


def locked_versions(lock_text: str) -> Dict[str, str]:
    """{normalized distribution name: version} of a lock's `name==version` lines; any other requirement line (a range,
    a URL) is refused: a lock pins everything."""
    pinned = {}
    for line in lock_text.splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "-")):
            name, separator, version = line.partition("==")
            if not separator:
                raise UserError(f"{line.strip()!r} is not pinned with ==: relock with "
                                "python scripts/lock_requirements.py")
            pinned[normalize(name)] = version.strip()
    return pinned


def normalize(distribution: str) -> str:
    """A distribution's name as PEP 503 compares it: `PyYAML`, `pyyaml` and `py_yaml` are one."""
    return re.sub(r"[-_.]+", "-", distribution.strip()).lower()


if __name__ == "__main__":
    cli(main)
