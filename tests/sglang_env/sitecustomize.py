"""Stand-ins for the two modules SGLang 0.5.23 imports that have no usable wheel for a CPU torch 2.13.

This folder is on PYTHONPATH of every SGLang process the tests start (the launcher and each process SGLang spawns),
so Python runs this file at start-up in each of them. It installs an import hook for exactly:

- ``torchvision`` and its submodules: SGLang imports it unconditionally (multimodal processors, configs of vision
  models); the PyPI wheel is built for a CUDA torch and its operators fail to register on a CPU torch 2.13. No
  torchvision code runs for a text-only Llama: any use of the stand-in raises.
- ``vllm._custom_ops``: SGLang's rotary embedding imports ``rotary_embedding`` from it while building the model on a
  platform that is neither CUDA nor SGLang's Xeon engine; the forward pass on CPU uses SGLang's native rotary
  embedding, so calling the stand-in raises.

A stand-in module answers any attribute with a placeholder that raises when called, and has no ``__file__`` and a
version of 0.0, so transformers treats torchvision as too old to use.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


class _Placeholder:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self._name} is a test stand-in (tests/sglang_env/sitecustomize.py) and was called")

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (object,)


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr: str) -> _Placeholder:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self.__name__}.{attr}")


class _StandInFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        root = name.partition(".")[0]
        if root == "torchvision" or name in ("vllm", "vllm._custom_ops"):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _StandInModule(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []
        if module.__name__ == "torchvision":
            module.__version__ = "0.0"


# last on the meta path: a real installation, if there ever is one, wins
sys.meta_path.append(_StandInFinder())
