"""A run: the stage configs composed into one, the run directory, the orchestration of the stages
(``dmde train``), evaluation, prediction and export."""
