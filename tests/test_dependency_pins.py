"""pyproject.toml's lower bounds allow no torch that lacks an API the code calls."""
from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.version import Version

from conftest import ROOT

# APIs the package calls, with the torch release that introduced them
TORCH_APIS = {"is_bf16_supported(including_emulation=": Version("2.4"), "torch.amp.GradScaler(": Version("2.3")}
TORCHVISION_OF_TORCH = {Version("2.3"): Version("0.18"), Version("2.4"): Version("0.19")}


def _minimum(name: str) -> Version:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [requirement] = [Requirement(r) for r in project["dependencies"] if Requirement(r).name == name]
    [lower] = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return lower


def test_torch_minimum_has_every_api_the_code_calls():
    source = "\n".join(p.read_text() for p in (ROOT / "deit_train").rglob("*.py"))
    needed = max(version for api, version in TORCH_APIS.items() if re.search(re.escape(api), source))
    assert _minimum("torch") >= needed
    assert _minimum("torchvision") >= TORCHVISION_OF_TORCH[needed]
