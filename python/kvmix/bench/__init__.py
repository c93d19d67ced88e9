"""Benchmarks of kvmix against the implementations users have today.

Run one from the command line; each subcommand prints a table and can save JSON::

    python -m kvmix.bench quantization --tokens 16384 --repeats 10

Benchmarks measure ratios within one run on one machine; they are never timed assertions
in the test suite.
"""
