-- One lake table as a DuckDB view: every Parquet file under the table's directory, hive partition
-- columns kept as text (as DataFusion reads them), files of older schemas aligned by column name.
-- {table} and {glob} are replaced by the quoted table name and file pattern.
CREATE VIEW {table} AS
SELECT * FROM read_parquet({glob}, hive_partitioning = true, hive_types_autocast = false, union_by_name = true);
