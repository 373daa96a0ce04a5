"""``make bench``: side-by-side throughput, lateness and memory ratios of auto-trace.

(method documented below; filled in once the numbers are in)
"""
