"""dmde: Deep Mixture of Diverse Experts for large-scale visual recognition.

Modules follow the paper: :mod:`dmde.hierarchy.wordnet` and :mod:`dmde.hierarchy.semantic` (§III, Eq. 1),
:mod:`dmde.hierarchy.ontology` (§III), :mod:`dmde.hierarchy.groups` (§IV-A), :mod:`dmde.experts.multitask` and
:mod:`dmde.experts.similarity` (§IV-B, Eqs. 2–6), :mod:`dmde.fusion.stacking` and :mod:`dmde.fusion.mixture`
(§IV-C, Eqs. 7–13).
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load"]


def load(path: str, **kwargs):
    """A finished run directory or an export (``dmde export``), ready for prediction:
    ``dmde.load(path).predict(images)``; images are files, PIL images, numpy arrays or tensors."""
    from dmde.run.export import is_export, load_export
    from dmde.run.predict import Predictor

    if is_export(path):
        return load_export(path, **{k: v for k, v in kwargs.items() if k == "device"})
    return Predictor.from_run(path, **kwargs)
