"""Helpers shared by the tests and the benchmarks (no pytest imports here: ``benchmarks/`` uses them too).

``server``: a real ``python -m service`` process on a free loopback port. ``images``: the test photos and
hand-built image payloads.
"""
