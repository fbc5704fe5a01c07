"""Check that everything the code imports comes from a lock. Run it in an environment that holds only that lock:

    pip install torch==2.13.0 -r requirements.txt && python scripts/check_imports.py
    pip install torch==2.13.0 -r requirements-test.txt && python scripts/check_imports.py --lock requirements-test.txt \
        --paths bench tests

The import statements of the Python files under --paths are read from their syntax trees (the imports inside
functions too), following the repository's own modules they import. Each imported module is then imported in a fresh
subprocess; a `from X import Y` also imports `X.Y` when Y is a submodule (`sentencepiece.sentencepiece_model_pb2`).
Every module that an import newly loads is mapped to the distribution that installed it
(`importlib.metadata.packages_distributions`). The check fails when that distribution is not in the lock (nor torch,
which is installed on its own), when a loaded module belongs to no distribution and is not the standard library's,
or when an import fails.

Why: a package that only the tests install can satisfy a runtime import by accident. protobuf, which
`sentencepiece.sentencepiece_model_pb2` needs, came in through tensorboard, a test requirement, and the README's first
command failed on a fresh machine. CI runs this check in the environment built from the runtime lock alone.
"""

import ast
import json
import site
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.lock_requirements import locked_versions, normalize
from utils import UserError, cli

ROOT = Path(__file__).resolve().parent.parent
# imported only when a user asks for them, and deliberately in no lock
OPTIONAL_MODULES = {
    "flash_attn": "flash-attn, the optional CUDA attention kernel (else model.py uses scaled_dot_product_attention)",
    "wandb": "Weights & Biases, imported only for --wandb_project",
    "triton": "Triton, which torch's CUDA wheels bring: quantized_kernels.py's CUDA int8 kernel (without it "
              "quantize.py runs torch-only kernels)",
}
# installed by its own command, never locked (scripts/lock_requirements.py)
UNLOCKED_DISTRIBUTIONS = {"torch"}
SITE_DIRS = sorted({Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages(),
                                                   sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]})
STDLIB_DIRS = sorted({Path(sysconfig.get_path(name)).resolve() for name in ("stdlib", "platstdlib")})
RUNTIME_PATHS = ("*.py", "eval", "finetune", "generate", "inheritune", "prepare_data", "pretrain", "scripts")

# run in the subprocess: import the module, then each named submodule; print the files of the modules each step newly
# loaded ("" for the module itself), or the step that failed and its error
PROBE = """
import importlib, importlib.util, json, sys
module, names = sys.argv[1], json.loads(sys.argv[2])
loaded = {}
def step(name, submodule):
    before = set(sys.modules)
    try:
        importlib.import_module(submodule)
    except Exception as error:
        print(json.dumps({"failed": name, "error": f"{type(error).__name__}: {error}"}))
        sys.exit()
    loaded[name] = [getattr(sys.modules[new], "__file__", None) for new in set(sys.modules) - before]
step("", module)
for name in names:
    try:
        is_submodule = importlib.util.find_spec(f"{module}.{name}") is not None
    except ModuleNotFoundError:  # the parent is a module, not a package
        is_submodule = False
    if is_submodule:
        step(name, f"{module}.{name}")
print(json.dumps({"loaded": {name: [file for file in files if file] for name, files in loaded.items()}}))
"""


@dataclass(frozen=True)
class Import:
    module: str  # `a.b` of `import a.b` or of `from a.b import c`
    names: tuple  # `c` of `from a.b import c`: possibly submodules
    file: Path
    line: int


def main(lock: Path = Path("requirements.txt"), paths: Optional[List[str]] = None, root: Path = ROOT) -> None:
    """Import what the code imports, each in a fresh subprocess, and fail on a package the lock does not hold.

    Args:
        lock: the lock whose packages may be imported (torch is always allowed)
        paths: files, folders or globs relative to root whose imports are checked; default the runtime code: the
            root modules and the script folders (bench/ and tests/ import the test lock's references)
        root: the repository root: its modules are followed, not imported
    """
    root = Path(root).resolve()
    lock_path = lock if Path(lock).is_absolute() else root / lock
    allowed = locked_distributions(lock_path) | UNLOCKED_DISTRIBUTIONS
    files = python_files(root, paths or RUNTIME_PATHS)
    imports = external_imports(root, files)
    by_module: Dict[str, Set[str]] = {}
    for imp in imports:
        by_module.setdefault(imp.module, set()).update(imp.names)
    distributions = top_level_distributions()
    with ThreadPoolExecutor(max_workers=2) as pool:  # each probe is a process of its own
        loaded = dict(zip(by_module, pool.map(lambda m: probe(m, sorted(by_module[m])), by_module)))

    failures, unlocked = [], {}  # unlocked: what a module loads that the lock lacks -> the imports that load it
    for module, outcome in loaded.items():
        if "failed" in outcome:
            name = ".".join(filter(None, (module, outcome["failed"])))
            where = ", ".join(locations(imports, module, root, outcome["failed"]))
            failures.append(f"import {name} fails ({where}): {outcome['error']}")
            continue
        for submodule, loaded_files in outcome["loaded"].items():
            name = f"{module}.{submodule}" if submodule else module
            for top in {installed_top_level(file) for file in loaded_files} - {None}:
                owners = distributions.get(top, [])
                if not {normalize(owner) for owner in owners} & allowed:
                    what = f"{top!r} of {' or '.join(sorted(owners))}" if owners else f"{top} (no distribution's)"
                    where = ", ".join(locations(imports, module, root, submodule))
                    unlocked.setdefault(what, []).append(f"import {name} ({where})")
    print(f"{len(by_module)} modules imported by {len(files)} files checked against {lock_path.name} "
          f"({len(allowed)} distributions)")
    problems = failures + [f"{what} is loaded by {'; '.join(sorted(by))}: {lock_path.name} does not hold it (add it "
                           f"to {lock_path.stem}.in, then python scripts/lock_requirements.py)"
                           for what, by in sorted(unlocked.items())]
    if problems:
        raise UserError(f"{len(problems)} problem(s) with what the code imports:\n  " + "\n  ".join(problems))


def locations(imports: List[Import], module: str, root: Path, submodule: str = "") -> List[str]:
    """`file:line` of the statements importing `module` (or, given, its `submodule`)."""
    return sorted({f"{imp.file.relative_to(root)}:{imp.line}" for imp in imports
                   if imp.module == module and (not submodule or submodule in imp.names)})


def locked_distributions(lock: Path) -> Set[str]:
    if not lock.is_file():
        raise UserError(f"--lock {lock}: no such file; expected a lock such as requirements.txt")
    names = set(locked_versions(lock.read_text()))
    if not names:
        raise UserError(f"--lock {lock} pins no package (expected lines such as 'numpy==2.4.6')")
    return names


def python_files(root: Path, paths) -> List[Path]:
    files = set()
    for pattern in paths:
        matches = list(root.glob(pattern))
        if not matches:
            raise UserError(f"--paths {pattern}: nothing matches under {root}")
        for match in matches:
            files.update(match.rglob("*.py") if match.is_dir() else [match])
    return sorted(files)


def external_imports(root: Path, files: List[Path]) -> List[Import]:
    """The imports of `files` and of the repository modules they import (transitively) that are not the repository's."""
    seen, queue, found = set(files), list(files), []
    while queue:
        file = queue.pop()
        for imp in imports_of(file):
            local = local_module_file(root, file, imp)
            if local is None:
                found.append(imp)
            elif local not in seen:
                seen.add(local)
                queue.append(local)
    return [imp for imp in found if imp.module.split(".")[0] not in OPTIONAL_MODULES]


def imports_of(file: Path) -> Iterator[Import]:
    try:
        tree = ast.parse(file.read_bytes(), filename=str(file))
    except SyntaxError as error:
        raise UserError(f"{file} does not parse: {error}") from None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, (), file, node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield Import(node.module, tuple(alias.name for alias in node.names if alias.name != "*"), file,
                         node.lineno)


def local_module_file(root: Path, importer: Path, imp: Import) -> Optional[Path]:
    """The repository file an import names (a root module, a package or a module beside the importer), else None."""
    parts = imp.module.split(".")
    for base in (root, importer.parent):
        candidate = base.joinpath(*parts)
        for file in (candidate.with_suffix(".py"), candidate / "__init__.py"):
            if file.is_file():
                return file
    return None


def installed_top_level(file: str) -> Optional[str]:
    """The top-level name (`google` of .../site-packages/google/protobuf/message.py) under which a loaded module's
    file is installed; None for the standard library's; the path itself when it is in neither place."""
    if not Path(file).is_absolute():  # a module made at run time (torch.ops' "_ops.py"), no file of its own
        return None
    path = Path(file).resolve()
    for site_dir in SITE_DIRS:
        if path.is_relative_to(site_dir):
            return path.relative_to(site_dir).parts[0].split(".")[0]
    if any(path.is_relative_to(stdlib) for stdlib in STDLIB_DIRS):
        return None
    return str(path)


def top_level_distributions() -> Dict[str, List[str]]:
    import importlib.metadata

    return importlib.metadata.packages_distributions()


def probe(module: str, names: List[str]) -> dict:
    """{"loaded": {step: files}}: the files of the modules that importing `module` ("") and then each submodule among
    `names` newly loads, in a fresh interpreter started outside the repository; or {"failed": step, "error": ...}."""
    result = subprocess.run([sys.executable, "-c", PROBE, module, json.dumps(names)], capture_output=True, text=True,
                            cwd="/")
    if result.returncode != 0:  # the interpreter itself died (a crash in an extension module)
        return {"failed": "", "error": (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    cli(main)
