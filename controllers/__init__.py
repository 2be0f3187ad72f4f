"""Pure control decisions over plain data: thermal model, identification, MPC, safety, baselines."""
