"""On-device tensor statistics: the summary row layout, the plain-torch path and the fused kernels."""
