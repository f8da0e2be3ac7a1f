"""Tests of the token groupings."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from data_modules.groupings import (
    Chunks,
    CorrelationClusters,
    GeneSets,
    GenomicBins,
    VarColumn,
    bundled_hallmark_gmt,
    chromosome_rank,
    read_gmt,
)
from morpheus_pl.errors import InputError


def var_of(names, **columns) -> pd.DataFrame:
    return pd.DataFrame(columns, index=pd.Index(names))


def write_gmt(path, sets):
    path.write_text("".join(f"{name}\tdesc\t" + "\t".join(genes) + "\n" for name, genes in sets.items()))
    return str(path)


def test_bundled_hallmark_counts():
    sets = read_gmt(bundled_hallmark_gmt())
    assert len(sets) == 50
    assert len({g for genes in sets.values() for g in genes}) == 4168
    assert sum(len(genes) for genes in sets.values()) == 7010


def test_gene_sets_match_and_count_unmatched(tmp_path):
    gmt = write_gmt(tmp_path / "s.gmt", {"A": ["TP53", "EGFR", "NOPE"], "B": ["EGFR", "MYC"]})
    var = var_of(["EGFR", "MYC", "TP53", "KRAS"])
    groups = GeneSets(gmt)(var, np.zeros((2, 4)), "rna")
    assert groups.names == ["A", "B"]
    assert groups.members == [[2, 0], [0, 1]]
    assert groups.n_unmatched == 1
    assert groups.used_features().tolist() == [0, 1, 2]


def test_gene_sets_exclusive(tmp_path):
    gmt = write_gmt(tmp_path / "s.gmt", {"A": ["TP53", "EGFR"], "B": ["EGFR", "MYC"]})
    groups = GeneSets(gmt, exclusive=True)(var_of(["EGFR", "MYC", "TP53"]), np.zeros((2, 3)), "rna")
    assert groups.members == [[2, 0], [1]]


def test_gene_sets_symbol_column_and_case(tmp_path):
    gmt = write_gmt(tmp_path / "s.gmt", {"A": ["tp53"]})
    var = var_of(["ENSG1", "ENSG2"], symbol=["MYC", "TP53"])
    groups = GeneSets(gmt, symbol_column="symbol")(var, np.zeros((1, 2)), "rna")
    assert groups.members == [[1]]


def test_gene_sets_no_match_names_the_file(tmp_path):
    gmt = write_gmt(tmp_path / "s.gmt", {"A": ["TP53"]})
    with pytest.raises(InputError, match=r"s\.gmt: no gene of its 1 set\(s\) matches .*symbol_column"):
        GeneSets(gmt)(var_of(["cg0001", "cg0002"]), np.zeros((1, 2)), "dnam")


def test_empty_group_dropped_with_warning(tmp_path, caplog):
    gmt = write_gmt(tmp_path / "s.gmt", {"A": ["TP53"], "B": ["NOPE"]})
    with caplog.at_level(logging.WARNING):
        groups = GeneSets(gmt)(var_of(["TP53"]), np.zeros((1, 1)), "rna")
    assert groups.names == ["A"]
    assert "1 empty group(s) dropped (B)" in caplog.text


def test_gmt_malformed_line(tmp_path):
    path = tmp_path / "bad.gmt"
    path.write_text("ONLY_NAME\n")
    with pytest.raises(InputError, match="line 1"):
        read_gmt(path)


def test_var_column_groups_and_missing():
    var = var_of(list("abcde"), group=["x", "y", "x", None, "y"])
    groups = VarColumn("group")(var, np.zeros((1, 5)), "m")
    assert groups.names == ["x", "y"]
    assert groups.members == [[0, 2], [1, 4]]
    assert groups.n_unmatched == 1


def test_var_column_missing_column():
    with pytest.raises(InputError, match="no column 'grp'"):
        VarColumn("grp")(var_of(["a"]), np.zeros((1, 1)), "m")


def test_chunks_genomic_order():
    var = var_of(list("abcdef"), chrom=["chr2", "chrX", "chr1", "chr10", "chr1", "chr2"], start=[5, 1, 9, 1, 2, 1])
    groups = Chunks(n_groups=3, order="genomic")(var, np.zeros((1, 6)), "cnv")
    # chr1:2 (e), chr1:9 (c) | chr2:1 (f), chr2:5 (a) | chr10:1 (d), chrX:1 (b)
    assert groups.members == [[4, 2], [5, 0], [3, 1]]


def test_chunks_cover_all_features_once():
    groups = Chunks(n_groups=7)(var_of([f"f{i}" for i in range(50)]), np.zeros((1, 50)), "m")
    flat = sorted(i for m in groups.members for i in m)
    assert flat == list(range(50))
    assert max(map(len, groups.members)) - min(map(len, groups.members)) <= 1


def test_chunks_too_few_features():
    with pytest.raises(InputError, match="lower n_groups"):
        Chunks(n_groups=10)(var_of(list("abc")), np.zeros((1, 3)), "m")


def test_genomic_bins():
    var = var_of(list("abcd"), chrom=["1", "1", "2", "1"], start=[10, 25, 5, 12])
    groups = GenomicBins(bin_size=20)(var, np.zeros((1, 4)), "cnv")
    assert groups.names == ["1:0", "1:20", "2:0"]
    assert groups.members == [[0, 3], [1], [2]]


def test_chromosome_rank_natural_order():
    names = ["chrX", "2", "chr10", "1", "MT", "weird"]
    assert sorted(names, key=chromosome_rank) == ["1", "2", "chr10", "chrX", "MT", "weird"]


def test_correlation_clusters_recover_blocks():
    rng = np.random.default_rng(0)
    factors = rng.normal(size=(200, 3))
    # Features 0-3 follow factor 0, 4-7 factor 1, 8-11 factor 2.
    values = np.repeat(factors, 4, axis=1) + 0.05 * rng.normal(size=(200, 12))
    values[5, 2] = np.nan
    groups = CorrelationClusters(n_groups=3, seed=0)(var_of([f"f{i}" for i in range(12)]), values, "m")
    assert sorted(map(sorted, groups.members)) == [list(range(0, 4)), list(range(4, 8)), list(range(8, 12))]
    assert groups.members[0][0] == 0


def test_genomic_chunks_leave_out_unplaced_features():
    var = var_of(list("abcdef"), chrom=["1", "1", None, "2", "2", "1"], start=[5, 1, 3, None, 2, 9])
    groups = Chunks(n_groups=2, order="genomic")(var, np.zeros((1, 6)), "cnv")
    assert groups.members == [[1, 0], [5, 4]]
    assert groups.n_unmatched == 2
