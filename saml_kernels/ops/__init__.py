"""Custom ops (torch.library) with autograd; one module per op."""
