"""Op wrappers: torch.library custom ops and autograd over the kernels, and backend records."""
