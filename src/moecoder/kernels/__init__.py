"""Optional native kernels (built at first use; PyTorch is the fallback)."""
