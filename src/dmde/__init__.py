"""dmde: Deep Mixture of Diverse Experts for large-scale visual recognition.

Modules follow the paper: :mod:`dmde.wordnet` and :mod:`dmde.semantic` (§III, Eq. 1),
:mod:`dmde.ontology` (§III), :mod:`dmde.groups` (§IV-A), :mod:`dmde.multitask` and
:mod:`dmde.similarity` (§IV-B, Eqs. 2–6), :mod:`dmde.stacking` and :mod:`dmde.fusion`
(§IV-C, Eqs. 7–13).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path: str, **kwargs):
    """A finished run directory or an export (``dmde export``), ready for prediction:
    ``dmde.load(path).predict(images)``; images are files, PIL images, numpy arrays or tensors."""
    from dmde.export import is_export, load_export
    from dmde.predict import Predictor

    if is_export(path):
        return load_export(path, **{k: v for k, v in kwargs.items() if k == "device"})
    return Predictor.from_run(path, **kwargs)
