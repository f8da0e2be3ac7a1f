"""Command line of the data converters: ``convert-slides`` and ``convert-omics``.

The work happens in :mod:`data_modules.converters`; this module parses arguments and
prints the final summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from data_modules.converters.omics import (
    DUPLICATE_RULES,
    ORIENTATIONS,
    RECIPES,
    AnnotationColumns,
    OmicsOptions,
    convert_omics_file,
)
from data_modules.converters.slides import LAYOUTS_EXPECTED, convert_slides
from morpheus_pl.errors import InputError

COMMANDS = ("convert-slides", "convert-omics")


def _slides_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m morpheus_pl convert-slides",
        description=(
            "Convert per-slide patch-feature files into a patch-feature store (zarr). Each file "
            f"is {LAYOUTS_EXPECTED}. The slide id is the file stem. Re-running resumes an "
            "interrupted conversion: slides already complete in the store are skipped."
        ),
    )
    parser.add_argument("--src", type=Path, required=True, metavar="DIR", help="folder of slide files")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="STORE.zarr",
        help="store to create or extend (a .zarr folder)",
    )
    parser.add_argument(
        "--encoder",
        default=None,
        metavar="NAME",
        help="patch encoder name stored with the features (for example uni2-h); required when "
        "the files declare none, and must equal the files' name when they declare one",
    )
    parser.add_argument(
        "--slide-table",
        type=Path,
        default=None,
        metavar="TABLE",
        help="CSV, TSV or parquet with slide_id and patient_id columns; without it the patient "
        "is the TCGA barcode in the slide id (TCGA-XX-XXXX)",
    )
    parser.add_argument(
        "--pattern",
        default=None,
        metavar="GLOB",
        help="glob relative to --src selecting the slide files (for example '*.h5' or "
        "'**/*.h5'); default: the .h5, .hdf5 and .pt files directly in --src",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="base seed of the per-slide row permutations (default 1999, or the existing "
        "store's); each slide's seed is derived from it and the slide id",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default=None,
        help="storage dtype of a new store (default float16; an existing store keeps its own)",
    )
    parser.add_argument(
        "--skip-empty",
        action="store_true",
        help="leave out files with 0 bytes or 0 patches and list them in the summary "
        "(default: they are an error)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _omics_parser() -> argparse.ArgumentParser:
    recipes = "; ".join(f"{name}: {text}" for name, text in RECIPES.items())
    rules = "; ".join(f"{name}: {text}" for name, text in DUPLICATE_RULES.items())
    parser = argparse.ArgumentParser(
        prog="python -m morpheus_pl convert-omics",
        description=(
            "Convert one omics matrix (tab-separated unless the name ends in .csv, optionally "
            "gzipped; ids in the first column) into an AnnData file with one row per patient. "
            "Every step is recorded in uns['preprocessing']."
        ),
    )
    parser.add_argument(
        "--modality", required=True, metavar="NAME", help="modality name (for example rna, dnam, cnv)"
    )
    parser.add_argument(
        "--src", type=Path, required=True, metavar="MATRIX", help="matrix file (.tsv, .tsv.gz, .csv, ...)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, metavar="NAME.h5ad", help="output .h5ad file, replaced if present"
    )
    parser.add_argument(
        "--orientation",
        choices=ORIENTATIONS,
        default="features-by-samples",
        help="features-by-samples (default; UCSC Xena: one row per gene or probe, one column "
        "per sample) or samples-by-features",
    )

    parser.add_argument(
        "--recipe", choices=tuple(RECIPES), default="none", help=f"value transform. {recipes}"
    )
    parser.add_argument(
        "--max-missing",
        type=float,
        default=0.1,
        metavar="FRACTION",
        help="methylation recipe: drop probes missing in more than this fraction of the "
        "patients (default 0.1)",
    )
    parser.add_argument(
        "--top-variable",
        type=int,
        default=None,
        metavar="N",
        help="keep the N features of largest variance across all patients of the file (after "
        "the recipe); default: keep all",
    )

    parser.add_argument(
        "--duplicates",
        choices=tuple(DUPLICATE_RULES),
        default="first",
        help=f"patients with several samples. {rules}",
    )
    parser.add_argument(
        "--sample-types",
        default=None,
        metavar="CODES",
        help="comma-separated TCGA sample type codes to keep (for example 01,02,03,05,06); "
        "ids without a sample type are kept; default: all",
    )

    parser.add_argument(
        "--cohort",
        type=Path,
        default=None,
        metavar="TABLE",
        help="cohort table (CSV, TSV or parquet); only its patients are kept, and a matrix "
        "matching none of them is an error",
    )
    parser.add_argument(
        "--patient-column",
        default="patient_id",
        metavar="NAME",
        help="patient id column of --cohort (default patient_id)",
    )

    parser.add_argument(
        "--annotation",
        type=Path,
        default=None,
        metavar="TABLE",
        help="feature annotation table (tab-separated unless .csv or .parquet; a UCSC Xena "
        "probeMap works as is) that fills var['chrom'], var['start'] and, when present, "
        "var['symbol']",
    )
    parser.add_argument(
        "--annotation-id-column",
        default=None,
        metavar="NAME",
        help="feature id column of --annotation (default: the first)",
    )
    parser.add_argument(
        "--annotation-chrom-column",
        default=None,
        metavar="NAME",
        help="chromosome column (default: the first of chrom, chromosome, chr, seqname)",
    )
    parser.add_argument(
        "--annotation-start-column",
        default=None,
        metavar="NAME",
        help="start position column in base pairs (default: the first of chromStart, start, "
        "chrom_start, start_position)",
    )
    parser.add_argument(
        "--annotation-symbol-column",
        default=None,
        metavar="NAME",
        help="gene symbol column copied to var['symbol'] (default: the first of gene, symbol, "
        "gene_name, gene_symbol, if any)",
    )
    return parser


def convert_slides_command(argv: list[str]) -> None:
    """Run ``convert-slides`` with the arguments after the command name."""
    args = _slides_parser().parse_args(argv)
    summary = convert_slides(
        args.src,
        args.out,
        encoder=args.encoder,
        slide_table=args.slide_table,
        pattern=args.pattern,
        seed=args.seed,
        dtype=args.dtype,
        skip_empty=args.skip_empty,
        progress=not args.no_progress,
    )
    print(summary.format())


def convert_omics_command(argv: list[str]) -> None:
    """Run ``convert-omics`` with the arguments after the command name."""
    args = _omics_parser().parse_args(argv)
    sample_types = None
    if args.sample_types is not None:
        sample_types = tuple(code.strip() for code in args.sample_types.split(",") if code.strip())
    options = OmicsOptions(
        recipe=args.recipe,
        top_variable=args.top_variable,
        max_missing=args.max_missing,
        duplicates=args.duplicates,
        sample_types=sample_types,
    )
    columns = AnnotationColumns(
        id=args.annotation_id_column,
        chrom=args.annotation_chrom_column,
        start=args.annotation_start_column,
        symbol=args.annotation_symbol_column,
    )
    adata = convert_omics_file(
        args.src,
        args.out,
        args.modality,
        options,
        orientation=args.orientation,
        cohort=args.cohort,
        patient_column=args.patient_column,
        annotation=args.annotation,
        annotation_columns=columns,
    )
    steps = adata.uns["preprocessing"]["steps"]
    print(
        f"{args.out}: {adata.n_obs} patients x {adata.n_vars} features "
        f"(modality {args.modality}; steps: {', '.join(steps) if len(steps) else 'none'})"
    )


def main(argv: list[str]) -> None:
    """Run a converter; ``argv[0]`` is ``convert-slides`` or ``convert-omics``.

    Raises:
        InputError: Invalid input; the message names the file and the fix.
    """
    if not argv or argv[0] not in COMMANDS:
        raise InputError(f"unknown converter {argv[0] if argv else ''!r}; choose one of {list(COMMANDS)}")
    if argv[0] == "convert-slides":
        convert_slides_command(argv[1:])
    else:
        convert_omics_command(argv[1:])


if __name__ == "__main__":
    # Stand-alone use (python -m morpheus_pl.convert convert-slides ...), with the
    # exit status of the main command line: 2 for invalid input.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        main(sys.argv[1:])
    except InputError as error:
        logging.getLogger("morpheus_pl").error("%s", error)
        sys.exit(2)
