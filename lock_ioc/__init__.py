"""beamline-lock: an EPICS Channel Access soft IOC that owns the beamline lock."""
__version__ = "0.1.0"
