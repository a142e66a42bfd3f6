"""What a reader sees: the paper's experiment suite and its REPORT.md, the figures, and the
demo's narration."""
