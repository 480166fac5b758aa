"""Paged attention kernels: decode attention reading K/V through block tables (torch reference, C, Triton)."""
