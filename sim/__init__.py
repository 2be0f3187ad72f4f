"""The simulated plant: GPUs, servers and coolant loop on the far side of a real node's interfaces."""
