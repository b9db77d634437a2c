"""Benchmarks of the archive worker (``make bench``; not part of the tests).

Scenarios (one module each): ``render`` (pipeline vs bare Playwright print),
``throughput`` (jobs of 1/10/50 attempts and 8x10 at once, 1 and 2 slots),
``admission`` (the bridge under 50 concurrent clients and at the queue
limit), ``scale`` (two worker processes vs one; NATS cost per job) and
``profile`` (py-spy on a worker during a 50-attempt job).  See
the README section "Benchmarks" for the method and the figures.
"""
