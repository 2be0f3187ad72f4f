"""Sensor backends: read the world, decide nothing."""
