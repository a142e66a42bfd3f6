"""The experts fused (§IV-C): stacking functions Υ (Eqs. 7–9, 12–13, and the product of the
experts), calibration (of each expert, and of the fused scores), the N-way layer (Eq. 10), the
mixture and its end-to-end loss (Eq. 11), and all experts run in one pass."""
