"""Spectral calibration and RGB-HSI spatial co-registration."""
