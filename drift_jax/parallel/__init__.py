"""Devices and processes: meshes, shardings, multi-host helpers."""
