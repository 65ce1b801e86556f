"""Print pins from pyproject.toml for the shell installer: `python scripts/pins.py NAME...`
prints `NAME==VERSION` per name from [tool.steerkernel.pins]; `--requirements GROUP...`
prints the requirements of each group, one per line (`core`: the package's own dependencies;
any other name: that optional-dependency group).  Standard library only."""
import os
import re
import sys

PYPROJECT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         "pyproject.toml")


def load():
    with open(PYPROJECT, "rb") as f:
        try:
            import tomllib
        except ImportError:  # Python 3.10
            import tomli as tomllib  # type: ignore[no-redef]
        return tomllib.load(f)


def main(argv):
    data = load()
    if argv[:1] == ["--requirements"]:
        project = data["project"]
        for group in argv[1:]:
            reqs = (project["dependencies"] if group == "core"
                    else project["optional-dependencies"].get(group))
            if reqs is None:
                print(f"pins.py: no requirement group {group!r}", file=sys.stderr)
                return 2
            for req in reqs:
                print(req.split("#")[0].strip())
        return 0
    pins = data["tool"]["steerkernel"]["pins"]
    for name in argv:
        if name not in pins:
            print(f"pins.py: no pin named {name!r} in {PYPROJECT}", file=sys.stderr)
            return 2
        pkg = re.sub(r"-(cpu|interpreter)$", "", name) if name in (
            "torch-cpu", "triton-interpreter") else name
        print(f"{pkg}=={pins[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
