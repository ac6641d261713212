"""Reference implementations used as test oracles (diffusers, k-diffusion).

k-diffusion's package ``__init__`` imports torchvision, CLIP and more; its samplers need none of
that. ``k_sampling()`` loads ``k_diffusion/sampling.py`` and ``utils.py`` on their own, giving
``utils`` a tiny stand-in for the one torchvision import it makes at module level when torchvision
is not installed (it is only used by image-augmentation helpers we never call).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import cache

import pytest


@cache
def k_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = list(spec.submodule_search_locations)[0]
    try:  # import diffusers first: it probes torchvision with find_spec, which a stand-in would confuse
        import diffusers  # noqa: F401
    except ImportError:
        pass
    stubbed = False
    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        stubbed = True
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        tv.transforms.functional = types.ModuleType("torchvision.transforms.functional")
        sys.modules.update(
            {
                "torchvision": tv,
                "torchvision.transforms": tv.transforms,
                "torchvision.transforms.functional": tv.transforms.functional,
            }
        )
    pkg = types.ModuleType("k_diffusion")
    pkg.__path__ = [root]
    sys.modules.setdefault("k_diffusion", pkg)
    for name in ("utils", "sampling"):
        full = f"k_diffusion.{name}"
        if full in sys.modules:
            continue
        s = importlib.util.spec_from_file_location(full, f"{root}/{name}.py")
        mod = importlib.util.module_from_spec(s)
        sys.modules[full] = mod
        s.loader.exec_module(mod)
        setattr(sys.modules["k_diffusion"], name, mod)
    if stubbed:  # the stand-in was needed only while utils.py was imported
        for m in ("torchvision.transforms.functional", "torchvision.transforms", "torchvision"):
            sys.modules.pop(m, None)
    return sys.modules["k_diffusion.sampling"]
