"""Device kernels: gradient statistics (compiled on the CPU, multi-tensor on accelerators)."""
