"""Clients of the beamline lock: Python client, lockctl CLI, ophyd gating, ACF generator."""
