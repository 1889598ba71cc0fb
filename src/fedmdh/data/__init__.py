"""Loading, validation, featurization, partitioning and heterogeneity metrics (nothing about training)."""
