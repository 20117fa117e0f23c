"""Datasets, splits and the shared MONAI transforms."""

from medtl.data.shift import (PRESET_PROFILES, AcquisitionProfile, SimulateAcquisitiond, resample_prevalence,
                              simulate_acquisition, simulate_hospitals, tone_curve)

__all__ = ["PRESET_PROFILES", "AcquisitionProfile", "SimulateAcquisitiond", "resample_prevalence",
           "simulate_acquisition", "simulate_hospitals", "tone_curve"]
