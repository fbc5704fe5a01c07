"""The locks (exact versions within the .in files' ranges, no torch build) and the runtime-import check, which must
catch a package that the code imports but the lock lacks even when something else installed it."""

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from scripts.check_imports import main as check_imports
from scripts.lock_requirements import LOCKS, locked_versions, normalize, torch_build_lines
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent


def requirements(in_file: Path) -> list:
    """The requirements of a .in file, with those of the files it includes with -r."""
    found = []
    for line in in_file.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("-r "):
            found += requirements(in_file.parent / line[3:].strip())
        elif line and not line.startswith("-"):
            found.append(Requirement(line))
    return found


def test_torch_build_packages_are_recognised_and_every_line_must_be_pinned():
    lock = "numpy==2.4.6\ntorch==2.13.0\n    # via lightning-fabric\nnvidia-cublas-cu12==12.8.4.1\ntriton==3.6.0\n"
    assert torch_build_lines(lock) == ["torch", "nvidia-cublas-cu12", "triton"]
    with pytest.raises(UserError, match="'numpy>=2' is not pinned with =="):
        locked_versions("numpy>=2\n")


@pytest.mark.parametrize("in_name, lock_name", LOCKS)
def test_each_lock_pins_every_requirement_within_its_range_and_no_torch_build(in_name, lock_name):
    lock = ROOT / lock_name
    assert torch_build_lines(lock.read_text()) == []
    assert re.match(r"# Locked for Python 3\.11 ", lock.read_text())
    pinned = locked_versions(lock.read_text())
    for requirement in requirements(ROOT / in_name):
        name = normalize(requirement.name)
        if name != "torch":  # installed by its own command
            assert name in pinned, f"{lock_name} does not pin {name}: python scripts/lock_requirements.py"
            assert requirement.specifier.contains(pinned[name]), (name, pinned[name], str(requirement.specifier))


def test_the_test_lock_keeps_the_runtime_locks_versions():
    runtime, test = (locked_versions((ROOT / name).read_text()) for name in ("requirements.txt",
                                                                              "requirements-test.txt"))
    assert {name: test.get(name) for name in runtime} == runtime


@pytest.fixture
def fake_repository(tmp_path):
    """A script importing a submodule that needs protobuf, and a local module importing yaml inside a function."""
    (tmp_path / "app.py").write_text("from sentencepiece import sentencepiece_model_pb2\nimport helper\n")
    (tmp_path / "helper.py").write_text("def load():\n    import yaml\n")
    (tmp_path / "broken.py").write_text("import json\nimport no_such_module_anywhere\n")
    return tmp_path


def lock_file(directory: Path, *distributions: str) -> Path:
    path = directory / "lock.txt"
    path.write_text("".join(f"{name}==1.0\n" for name in distributions))
    return path


def test_import_check_passes_when_the_lock_holds_what_the_imports_load(fake_repository, capsys):
    lock = lock_file(fake_repository, "sentencepiece", "protobuf", "PyYAML")
    check_imports(lock=lock, paths=["app.py"], root=fake_repository)
    assert "2 modules imported by 1 files checked against lock.txt" in capsys.readouterr().out


def test_import_check_names_an_installed_package_that_the_lock_lacks(fake_repository):
    """protobuf is installed here (the test lock holds it), as tensorboard once installed it: still refused."""
    with pytest.raises(UserError, match=r"'google' of protobuf is loaded by import "
                                        r"sentencepiece\.sentencepiece_model_pb2 \(app\.py:1\): lock\.txt does not"):
        check_imports(lock=lock_file(fake_repository, "sentencepiece", "pyyaml"), paths=["app.py"],
                      root=fake_repository)
    with pytest.raises(UserError, match=r"(?s)1 problem.*'yaml' of PyYAML is loaded by import yaml \(helper\.py:2\)"):
        check_imports(lock=lock_file(fake_repository, "sentencepiece", "protobuf"), paths=["app.py"],
                      root=fake_repository)


def test_import_check_names_an_import_that_fails(fake_repository):
    with pytest.raises(UserError, match=r"import no_such_module_anywhere fails \(broken\.py:2\): ModuleNotFoundError"):
        check_imports(lock=lock_file(fake_repository, "numpy"), paths=["broken.py"], root=fake_repository)
