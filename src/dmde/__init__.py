"""dmde: Deep Mixture of Diverse Experts for large-scale visual recognition.

Modules follow the paper: :mod:`dmde.wordnet` and :mod:`dmde.semantic` (§III, Eq. 1),
:mod:`dmde.ontology` (§III), :mod:`dmde.groups` (§IV-A), :mod:`dmde.multitask` and
:mod:`dmde.similarity` (§IV-B, Eqs. 2–6), :mod:`dmde.stacking` and :mod:`dmde.fusion`
(§IV-C, Eqs. 7–13).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(run_dir: str, **kwargs):
    """Load a finished run directory for prediction: ``dmde.load(run).predict(images)``."""
    from dmde.predict import Predictor

    return Predictor.from_run(run_dir, **kwargs)
