"""The partitioner: ``gnnscale.partition`` (this folder is installed under that name)."""

from __future__ import annotations

from .assign import METHODS, OBJECTIVES, assign_parts, assign_parts_csc
from .build import GraphArrays, PartitionOptions, partition_graph, partition_spec, write_partition
from .format import FORMAT_VERSION, Partition, load_partition, read_meta
from .report import format_table, part_stats, plot_report, summary

__all__ = [
    "FORMAT_VERSION", "METHODS", "OBJECTIVES", "GraphArrays", "Partition", "PartitionOptions",
    "assign_parts", "assign_parts_csc", "format_table", "load_partition", "part_stats",
    "partition_graph", "partition_spec", "plot_report", "read_meta", "summary", "write_partition",
]
