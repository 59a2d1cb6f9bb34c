"""One evaluation of a sparse coder on a held-out run, whichever library trained it."""

from activault.evaluation.api import Evaluation, evaluate
from activault.evaluation.metrics import Reconstruction
from activault.evaluation.saved import load_sae
from activault.evaluation.splice import LMLoss

__all__ = ["Evaluation", "LMLoss", "Reconstruction", "evaluate", "load_sae"]
