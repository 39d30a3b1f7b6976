"""The host agent: owns the drivers of one hypervisor host, applies launch requests,
reconciles the kernel with the desired state, and reports per-vNIC metrics."""
