"""kernelscope's sketch core: sketch operators, kernel statistics and entropy estimators.

Pure math, no I/O: ``service/`` and ``clients/`` build on it.  Definitions: docs/math.md;
the sketch, bit for bit: docs/sketch.md; every returned number: docs/estimators.md.
"""

from sketch.base import Sketcher, SketchKind, parse_tensor_name
from sketch.countsketch import CountSketch
from sketch.entropy import EntropyChange, Estimator, entropy_change
from sketch.exact import ExactSketch
from sketch.gaussian import GaussianSketch
from sketch.groups import GroupedSketcher
from sketch.kronecker import KroneckerSketch
from sketch.rademacher import RademacherSketch
from sketch.sequences import Geometry, Normalization, Role, StepSequences
from sketch.spec import GroupSpec, SketchSpec, build_sketcher

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
