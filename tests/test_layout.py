import importlib
import tomllib

from conftest import ROOT


def test_platform_folder_does_not_shadow_stdlib():
    assert not (ROOT / "platform" / "__init__.py").exists()
    import platform

    assert hasattr(platform, "python_version")  # the standard library, not our folder


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"athanor" + ("." + ".".join(p.parent.relative_to(ROOT / "platform" / "athanor").parts)
                          if p.parent != ROOT / "platform" / "athanor" else "")
             for p in (ROOT / "platform" / "athanor").rglob("__init__.py")}
    found.add("athanor.kernels")
    assert found <= listed, f"add to pyproject packages: {sorted(found - listed)}"
    for name in listed:
        importlib.import_module(name)
