"""Converters from the files that feature extractors and omics portals write.

* :mod:`data_modules.converters.slides`: per-slide patch-feature files (HDF5, .pt)
  into the zarr patch-feature store.
* :mod:`data_modules.converters.omics`: omics matrices (UCSC Xena and similar) into
  one AnnData file per modality.

The command-line front end is ``python -m morpheus_pl convert-slides|convert-omics``
(:mod:`morpheus_pl.convert`); the demo builder calls these functions directly.
"""

from data_modules.converters.omics import (
    AnnotationColumns,
    OmicsMatrix,
    OmicsOptions,
    convert_omics_file,
    convert_omics_matrix,
    write_h5ad_atomic,
)
from data_modules.converters.slides import (
    SlideConversionSummary,
    SlideRecord,
    convert_slides,
    open_store,
    slide_seed,
    write_slide_record,
)

__all__ = [
    "AnnotationColumns",
    "OmicsMatrix",
    "OmicsOptions",
    "SlideConversionSummary",
    "SlideRecord",
    "convert_omics_file",
    "convert_omics_matrix",
    "convert_slides",
    "open_store",
    "slide_seed",
    "write_h5ad_atomic",
    "write_slide_record",
]
