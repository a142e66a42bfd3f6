"""One expert per task group (§IV-B): the backbone registry, the multi-task head and its loss
(Eqs. 2–6), the visual similarity S (Eq. 3), and the training of every expert."""
