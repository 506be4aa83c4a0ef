"""Thin typed wrappers over torch.ops.sdft_kernels, with their fake (meta) and autograd registrations.
One module per op family."""
