"""Reversible swaps of objects inside flash-linear-attention's (fla's) modules.

fla binds its functions by name in many modules (`from fla.ops.gla import chunk_gla` in
fla.layers.gla, fla.layers.hgrn2, ...). A Patch replaces a function in every fla module that
holds it (found by identity, not by name), and replaces attributes of classes; undo() puts back
exactly the objects that were there (a class attribute that was inherited is deleted again,
not copied down). An fla module imported while a patch is on imports the replacements from
the (patched) modules it reads; undo() finds those by identity too and puts the originals in.
"""
from __future__ import annotations

import sys
import threading

__all__ = ["Patch"]

_MISSING = object()


def _fla_modules():
    return [m for name, m in list(sys.modules.items())
            if m is not None and (name == "fla" or name.startswith("fla."))]


class Patch:
    """A set of swaps applied together and undone together (thread-safe)."""

    def __init__(self):
        self._lock = threading.RLock()
        self._functions = []        # (original, replacement)
        self._saved = []            # (owner, name, previous raw value or _MISSING)

    # --- building -----------------------------------------------------------------------
    def replace_function(self, original, replacement):
        """Swap `original` for `replacement` in every fla module that binds it."""
        with self._lock:
            self._functions.append((original, replacement))
            for module in _fla_modules():
                self._swap_in_module(module, original, replacement)

    def replace_attribute(self, owner, name, replacement):
        """Set owner.name (a class or module attribute) to replacement."""
        with self._lock:
            self._set(owner, name, replacement)

    # --- undoing ------------------------------------------------------------------------
    def undo(self):
        with self._lock:
            for owner, name, previous in reversed(self._saved):
                if previous is _MISSING:
                    delattr(owner, name)
                else:
                    setattr(owner, name, previous)
            self._saved.clear()
            # modules loaded while patched bound the replacements themselves
            for module in _fla_modules():
                for original, replacement in self._functions:
                    for name, value in list(vars(module).items()):
                        if value is replacement:
                            setattr(module, name, original)
            self._functions.clear()

    # --- internals ----------------------------------------------------------------------
    def _set(self, owner, name, value):
        previous = vars(owner).get(name, _MISSING)   # the raw object (staticmethod, ...)
        self._saved.append((owner, name, previous))
        setattr(owner, name, value)

    def _swap_in_module(self, module, original, replacement):
        for name, value in list(vars(module).items()):
            if value is original:
                self._set(module, name, replacement)

