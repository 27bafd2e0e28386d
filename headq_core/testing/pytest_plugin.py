"""Where the headq pytest plugin lived before it moved to :mod:`headq_pytest` (outside this package,
so that pytest does not import headq with every run): its names, for test suites that import them
from here."""

from headq_pytest import Conformance, Side, headq_conformance

__all__ = ["Conformance", "Side", "headq_conformance"]
