"""lockstep's hand-written Triton kernels, one op per file (kernel, checked launcher, torch reference)."""
