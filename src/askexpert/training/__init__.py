"""Training stages: the generalist, the partition, and expert schedules (one loop for all)."""
