"""The partitioner: ``gnnscale.partition`` (this folder is installed under that name)."""

from __future__ import annotations

from .assign import METHODS, OBJECTIVES, assign_parts
from .build import PartitionOptions, partition_graph
from .format import FORMAT_VERSION, Partition, load_partition, read_meta
from .report import format_table, part_stats, plot_report, summary

__all__ = [
    "METHODS", "OBJECTIVES", "FORMAT_VERSION", "Partition", "PartitionOptions",
    "assign_parts", "format_table", "load_partition", "part_stats", "partition_graph",
    "plot_report", "read_meta", "summary",
]
