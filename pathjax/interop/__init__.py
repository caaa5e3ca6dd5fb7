"""Other tools' files: TRIDENT / CLAM / STAMP patch-feature files (h5) and QuPath GeoJSON."""
