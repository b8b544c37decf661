"""kernelscope's sketch core: sketch operators, kernel statistics and entropy estimators.

Pure math, no I/O: ``service/`` and ``clients/`` build on it.  Definitions: docs/math.md;
the sketch, bit for bit: docs/sketch.md; every returned number: docs/estimators.md.

The names below load on first use: importing one light submodule (``sketch.names``, say, from
the HTTP client) must not compile the numba loops that the operators pull in.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sketch.base import Sketcher, SketchKind
    from sketch.countsketch import CountSketch
    from sketch.entropy import EntropyChange, Estimator, entropy_change
    from sketch.exact import ExactSketch
    from sketch.gaussian import GaussianSketch
    from sketch.groups import GroupedSketcher
    from sketch.kronecker import KroneckerSketch
    from sketch.names import parse_tensor_name
    from sketch.rademacher import RademacherSketch
    from sketch.sequences import Geometry, Normalization, Role, StepSequences
    from sketch.spec import GroupSpec, SketchSpec, build_sketcher

_HOME = {
    "CountSketch": "sketch.countsketch",
    "EntropyChange": "sketch.entropy",
    "Estimator": "sketch.entropy",
    "ExactSketch": "sketch.exact",
    "GaussianSketch": "sketch.gaussian",
    "Geometry": "sketch.sequences",
    "GroupSpec": "sketch.spec",
    "GroupedSketcher": "sketch.groups",
    "KroneckerSketch": "sketch.kronecker",
    "Normalization": "sketch.sequences",
    "RademacherSketch": "sketch.rademacher",
    "Role": "sketch.sequences",
    "SketchKind": "sketch.base",
    "SketchSpec": "sketch.spec",
    "Sketcher": "sketch.base",
    "StepSequences": "sketch.sequences",
    "build_sketcher": "sketch.spec",
    "entropy_change": "sketch.entropy",
    "parse_tensor_name": "sketch.names",
}

__all__ = [
    "CountSketch",
    "EntropyChange",
    "Estimator",
    "ExactSketch",
    "GaussianSketch",
    "Geometry",
    "GroupSpec",
    "GroupedSketcher",
    "KroneckerSketch",
    "Normalization",
    "RademacherSketch",
    "Role",
    "SketchKind",
    "SketchSpec",
    "Sketcher",
    "StepSequences",
    "build_sketcher",
    "entropy_change",
    "parse_tensor_name",
]


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'sketch' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value
