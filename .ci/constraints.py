"""Print constraints.txt: the installed version of every package vlm-compress[dev] needs, recursively.

Run after the test suite passed on the installed versions: python .ci/constraints.py > constraints.txt
"""

from __future__ import annotations

import importlib.metadata as md
import re

from packaging.requirements import Requirement


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(name: str, extras: tuple[str, ...], seen: dict[str, str]) -> None:
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return
    seen[_key(name)] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
            continue
        if _key(req.name) not in seen and _key(req.name) != "vlm-compress":
            closure(req.name, tuple(req.extras), seen)


if __name__ == "__main__":
    found: dict[str, str] = {}
    closure("vlm-compress", ("dev", "onnx", "nf4", "tensorrt", "optuna"), found)
    found.pop("vlm-compress", None)
    found.pop("torch", None)  # pinned in pyproject (the CPU wheel on disk)
    print("# The versions the test suite last passed with. CI installs with them (.ci/run: pip install -c")
    print("# constraints.txt); a plain install takes the newest releases. Regenerate after the suite passes on")
    print("# newer ones: python .ci/constraints.py > constraints.txt")
    for key in sorted(found):
        print(f"{key}=={found[key]}")
