"""The classes' structure (§III, §IV-A): WordNet 3.0, the semantic relationship Ψ (Eq. 1), the
two-layer ontology by spectral clustering, and the overlapping task groups cut from its order."""
