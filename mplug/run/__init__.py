"""Running: ``python -m mplug.run.train`` / ``python -m mplug.run.evaluate``, their run configurations, runtime,
training state, metrics and data."""
