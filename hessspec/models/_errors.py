"""Errors of the model builders (re-exported by :mod:`hessspec.models`)."""

from __future__ import annotations


class ModelError(ValueError):
    """A model could not be built from the given name and arguments."""


class UnknownModelError(ModelError):
    """The model name is neither in the zoo nor a ``tv:NAME`` / ``module:function`` spec."""
