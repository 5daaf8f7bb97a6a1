-- One lake table as a DuckDB view: the Parquet files of the table's current Delta snapshot, hive
-- partition columns kept as text (as DataFusion reads them), files of older schemas aligned by column name.
-- Timestamps are stored in UTC; they are read as plain TIMESTAMP (UTC) because time-zone-aware
-- arithmetic needs DuckDB's ICU extension, which the bundled build does not have.
-- {table}, {glob} and {replace} are replaced by the quoted table name, the list of snapshot files and the
-- `REPLACE (CAST(col AS TIMESTAMP) AS col, …)` list (or nothing).
CREATE VIEW {table} AS
SELECT * {replace} FROM read_parquet({glob}, hive_partitioning = true, hive_types_autocast = false, union_by_name = true);
