"""The demo cohort: real TCGA-LGG omics and real H&E patch features from PyPI wheels."""
