"""Every public class, function and method of the package says what it is for.

A docstring inherited from the method it overrides counts (``inspect.getdoc``): a task's
``plain_prompt`` is documented once, on :class:`~unmask.tasks.base.Task`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import unmask


def _public_modules() -> list[str]:
    names = [unmask.__name__]
    for info in pkgutil.walk_packages(unmask.__path__, prefix="unmask."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def _undocumented(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    missing = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module_name:
            continue
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not inspect.getdoc(obj):
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                target = member.fget if isinstance(member, property) else member
                target = getattr(target, "__func__", target)  # classmethod, staticmethod
                if inspect.isfunction(target) and not inspect.getdoc(getattr(obj, attr, target)):
                    missing.append(f"{name}.{attr}")
    return [f"{module_name}.{m}" for m in missing]


def test_every_public_definition_has_a_docstring():
    missing = [m for module in _public_modules() for m in _undocumented(module)]
    assert not missing, f"{len(missing)} undocumented:\n" + "\n".join(missing)
