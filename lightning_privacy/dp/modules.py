"""Which modules break per-sample gradients, and replacing them when the user asks."""

from __future__ import annotations

from opacus.validators import ModuleValidator
from torch import nn

from lightning_privacy.errors import IncompatibleModuleError


def incompatible_modules(model: nn.Module) -> dict[str, str]:
    """``{qualified name: reason}`` for every submodule Opacus' validator rejects (BatchNorm, LSTM, ...)."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(module))
        if validator is None:
            continue
        errors = validator(module)
        if errors:
            found[name] = "; ".join(str(e) for e in errors)
    return found


def check_modules(model: nn.Module) -> None:
    """Raise :class:`IncompatibleModuleError` listing every module that breaks per-sample gradients."""
    found = incompatible_modules(model)
    if found:
        listing = "\n".join(f"  - {name or '<the model itself>'}: {reason}" for name, reason in found.items())
        raise IncompatibleModuleError(
            f"{len(found)} module(s) break per-sample gradients, so DP-SGD's guarantee would not hold:\n"
            f"{listing}\nReplace them (e.g. BatchNorm -> GroupNorm, LSTM -> opacus.layers.DPLSTM), or pass "
            "fix_modules=True to replace them automatically."
        )


def fix_modules(model: nn.Module) -> list[str]:
    """Replace, in place, each rejected submodule by Opacus' fixer for it; return the replaced names.

    The model object stays the same (a LightningModule keeps its identity); only children change.
    """
    replaced = []
    for name in list(incompatible_modules(model)):
        if not name:
            raise IncompatibleModuleError(
                f"The model itself ({type(model).__name__}) breaks per-sample gradients; wrap it in a module."
            )
        module = model.get_submodule(name)
        fixer = ModuleValidator.FIXERS.get(type(module))
        if fixer is None:
            raise IncompatibleModuleError(
                f"{name} ({type(module).__name__}) breaks per-sample gradients and has no automatic "
                "replacement; replace it by hand."
            )
        replacement = fixer(module)
        device = next(module.parameters(), None)
        if device is not None:
            replacement.to(device.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
        replaced.append(f"{name} ({type(module).__name__} -> {type(replacement).__name__})")
    return replaced
