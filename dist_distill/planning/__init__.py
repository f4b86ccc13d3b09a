"""Before the first GPU hour: per-GPU memory plans, meta-device dry runs and the cluster's rank layout."""
