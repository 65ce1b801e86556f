"""Built-in data files of steerkernel: the emotion corpus and the demo scenarios."""
