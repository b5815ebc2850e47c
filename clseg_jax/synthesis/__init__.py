"""Data-free replay images inverted from a frozen model: DeepInversion (`deepinversion`) and
CCSI's class impressions (`impressions`), each optimisation one compiled program on device."""
