"""Pure PyTorch/NumPy building blocks of the study: fastMRI data, models, losses and metrics.

Nothing in this package imports Ray, so it can be used and tested without a cluster.
"""
