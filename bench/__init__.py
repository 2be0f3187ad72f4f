"""Benchmarks: ``rackguard bench`` (controllers, agent, fleet) and the standalone measurements.

``harness`` + ``scenarios/`` score the controllers on the true-parameter plant (``bench controllers``);
``stepbench`` times one control step; ``agent`` and ``fleet`` measure what the daemon and a fleet of
them cost; ``nvml_vs_smi``, ``leak_latency`` and ``outbox_replay`` run as ``python3 -m rackguard.bench.<name>``.
``cli`` holds the ``rackguard bench`` argument parsing.
"""
