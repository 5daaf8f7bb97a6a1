-- One lake table as a DuckDB view: every Parquet file under the table's directory, hive partition
-- columns kept as text (as DataFusion reads them), files of older schemas aligned by column name.
-- Timestamps are stored in UTC; they are read as plain TIMESTAMP (UTC) because time-zone-aware
-- arithmetic needs DuckDB's ICU extension, which the bundled build does not have.
-- {table}, {glob} and {replace} are replaced by the quoted table name, the file pattern and the
-- `REPLACE (CAST(col AS TIMESTAMP) AS col, …)` list (or nothing).
CREATE VIEW {table} AS
SELECT * {replace} FROM read_parquet({glob}, hive_partitioning = true, hive_types_autocast = false, union_by_name = true);
