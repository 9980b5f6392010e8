"""Job submission other than Slurm: Kubernetes manifests (`python -m launch.k8s`)."""
