"""Images in: datasets (Tiny-ImageNet directory or zip, ImageFolder, Fashion-MNIST IDX, synthetic),
their splits, tensor transforms, and a task group's view of a dataset (an expert's training set,
§IV-B). Stands on :mod:`dmde.core` only."""
